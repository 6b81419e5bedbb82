"""Chips around plots: from the tiled Zarr and straight from the sources agree."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from botaclip_core.augment import Augmentation, draw_augmentations
from botaclip_core.chips import ChipReader, SourceChipReader
from botaclip_core.grid import RegionGrid
from botaclip_core.tiling import region_grid_for_sources, tile_orthophotos

sys.path.insert(0, str(Path(__file__).parent / "data"))
from make_orthophotos import make_orthophotos  # noqa: E402


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("chips")
    sets = make_orthophotos(root / "src", size=300)
    grid = region_grid_for_sources(sets["aligned"], crs="EPSG:2154", resolution=0.5)
    out = tile_orthophotos(
        sets["aligned"],
        root / "image.zarr",
        grid=grid,
        bands=list("rgbn"),
        wavelengths_um=[0.6] * 4,
    )
    return sets, grid, out.path


@pytest.mark.parametrize("aug_seed", [None, 3])
def test_source_chips_equal_zarr_chips_for_aligned_sources(tiled, aug_seed):
    sets, grid, zarr_path = tiled
    from_zarr = ChipReader(zarr_path, 64)
    from_src = SourceChipReader(sets["aligned"], grid, 64)
    augs = draw_augmentations(3, seed=aug_seed)[1:] if aug_seed is not None else [None]
    for row, col in [(40, 40), (150, 210), (grid.height - 5, 3)]:  # inside, overlap, edge
        for aug in augs:
            a = from_zarr.read(row, col) if aug is None else from_zarr.read(row, col, aug)
            b = from_src.read(row, col) if aug is None else from_src.read(row, col, aug)
            np.testing.assert_array_equal(a, b)
    chip, valid = from_src.read_with_mask(0, 0, 16)
    assert not valid[:8, :8].any() and (chip[:, :8, :8] == 0).all()  # outside the region
    from_src.close()


def chip_by_hand(image: np.ndarray, row: int, col: int, size: int, aug: Augmentation) -> np.ndarray:
    """The augmented chip written out: shifted window (0 outside), flip, rotation, brightness."""
    padded = np.pad(image, ((0, 0), (size, size), (size, size)))
    r0 = row + aug.shift_rows - size // 2 + size
    c0 = col + aug.shift_cols - size // 2 + size
    chip = padded[:, r0 : r0 + size, c0 : c0 + size]
    if aug.flip:
        chip = np.flip(chip, axis=2)  # columns reversed
    chip = np.rot90(chip, aug.rot90, axes=(1, 2)).astype(np.float64)  # counter-clockwise
    # nodata (0) stays 0, valid pixels stay in 1..255, truncated to whole DN
    bright = np.clip(np.floor(chip * aug.brightness), 1, 255)
    return np.where(chip > 0, bright, 0).astype(np.uint8)


AUGS = [
    Augmentation(flip=True, rot90=1, shift_rows=3, shift_cols=-2, brightness=1.1),
    Augmentation(flip=False, rot90=3, shift_rows=-4, shift_cols=5, brightness=0.9),
    Augmentation(flip=True, rot90=2, brightness=1.0),
    Augmentation(flip=False, rot90=0, shift_rows=2, shift_cols=2, brightness=1.04),
]


@pytest.mark.parametrize("aug", AUGS, ids=range(len(AUGS)))
def test_augmented_chips_equal_hand_built_chips(tiled, tmp_path, aug):
    sets, grid, zarr_path = tiled
    image = np.asarray(zarr.open_group(str(zarr_path), mode="r")["image"])
    from_src = SourceChipReader(sets["aligned"], grid, 24)
    bright = image.copy()
    bright[:, :3, :] = 255  # a factor above 1 saturates these
    zarr.open_group(str(tmp_path / "bright.zarr"), mode="w").create_array("image", data=bright)
    for path, pixels in [(zarr_path, image), (tmp_path / "bright.zarr", bright)]:
        reader = ChipReader(path, 24)
        for row, col in [(40, 40), (150, 210), (grid.height - 5, 3), (4, 100)]:
            expected = chip_by_hand(pixels, row, col, 24, aug)
            np.testing.assert_array_equal(reader.read(row, col, aug), expected)
            if pixels is image:
                np.testing.assert_array_equal(from_src.read(row, col, aug), expected)
    from_src.close()


def test_hand_built_chips_saturate_and_keep_nodata():
    image = np.full((1, 4, 4), 250, dtype=np.uint8)
    image[0, 0, 0] = 0
    chip = chip_by_hand(image, 2, 2, 4, Augmentation(brightness=1.1))
    assert chip[0, 0, 0] == 0 and (chip.ravel()[1:] == 255).all()
    chip = chip_by_hand(image, 2, 2, 4, Augmentation(brightness=0.9))
    assert chip[0, 0, 0] == 0 and (chip.ravel()[1:] == 225).all()


def test_source_chips_warp_other_crs(tiled):
    sets, grid, zarr_path = tiled
    warped = SourceChipReader(sets["reprojected"], grid, 32)
    reference = ChipReader(zarr_path, 32)
    chip, valid = warped.read_with_mask(120, 120)
    assert valid.all()
    # bilinear warp of the first sheet, back onto the grid: close to the sheet itself
    diff = np.abs(chip.astype(int) - reference.read(120, 120).astype(int))
    assert diff.mean() < 25  # noisy texture resampled twice
    assert isinstance(warped.grid, RegionGrid)
