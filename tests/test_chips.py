"""Chips around plots: from the tiled Zarr and straight from the sources agree."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from botaclip_core.chips import ChipReader, SourceChipReader, draw_augmentations
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
