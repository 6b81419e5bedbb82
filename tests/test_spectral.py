"""The spectral baseline store: per-cell statistics equal numpy on the source GeoTIFF's pixels."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import from_bounds

from botaclip_core import spectral
from botaclip_core.embed import embedding_grid, sample_embeddings
from botaclip_core.embedding_store import EmbeddingStore, create_embedding_store, open_embeddings
from botaclip_core.errors import InputDataError
from botaclip_core.grid import RegionGrid
from botaclip_core.spectral import spectral_store
from botaclip_core.tiling import tile_orthophotos

sys.path.insert(0, str(Path(__file__).parent / "data"))
from make_orthophotos import RESOLUTION, make_orthophotos  # noqa: E402

TILE = 32  # image chunk side and embedding window
CELL = 16  # stride: a cell's own block is smaller than its window
PAD = 40  # empty pixels left of the sheet: 2.5 cells, so a cell straddles the sheet's edge
WAVELENGTHS = [0.665, 0.56, 0.49, 0.842]


def _image(root: Path, sheet: Path, bands: list[str]) -> tuple[Path, RegionGrid]:
    with rasterio.open(sheet) as src:
        left, top = src.bounds.left, src.bounds.top
    # cut inside the sheet's valid area on the right and bottom: the last cells are clipped
    grid = RegionGrid("EPSG:2154", RESOLUTION, left - PAD * RESOLUTION, top, PAD + 270, 275)
    result = tile_orthophotos(
        [sheet],
        root / "image.zarr",
        grid=grid,
        bands=bands,
        wavelengths_um=WAVELENGTHS,
        tile_size=TILE,
        workers=1,
    )
    return result.path, grid


def _embedding_map(image_zarr: Path, image_grid: RegionGrid, out: Path) -> Path:
    """An empty map laid out as embed_region lays out a strided one (no backbone needed)."""
    create_embedding_store(
        out,
        embedding_grid(image_grid, CELL),
        8,
        chunk=4,
        attrs={"source": "dofa", "tile_size_px": TILE, "stride_px": CELL},
        like=image_zarr,
    )
    return out


@pytest.fixture(scope="module")
def sheet(tmp_path_factory) -> Path:
    return make_orthophotos(tmp_path_factory.mktemp("spectral_src"), size=300)["aligned"][0]


@pytest.fixture(scope="module")
def region(tmp_path_factory, sheet) -> tuple[Path, RegionGrid, Path]:
    root = tmp_path_factory.mktemp("spectral")
    image, grid = _image(root, sheet, ["red", "green", "blue", "nir"])
    return image, grid, _embedding_map(image, grid, root / "dofa.zarr")


def reference(sheet: Path, out: Path, image_grid: RegionGrid, bands: list[int], ndvi: bool):
    """Features of every cell from the GeoTIFF read at the cell's bounds (NaN: no valid pixel)."""
    cells = open_embeddings(out)
    transform = cells.rio.transform()
    h, w = cells.shape[1:]
    left, bottom, right, top = image_grid.bounds
    expected = np.full((2 * len(bands) + ndvi, h, w), np.nan)
    with rasterio.open(sheet) as src:
        for i in range(h):
            for j in range(w):
                x0, y1 = transform * (j, i)
                x1, y0 = transform * (j + 1, i + 1)
                box = (max(x0, left), max(y0, bottom), min(x1, right), min(y1, top))
                window = from_bounds(*box, transform=src.transform).round_offsets().round_lengths()
                pixels = src.read(window=window, boundless=True, fill_value=0).astype(np.float64)
                ok = (pixels != 0).any(axis=0)  # nodata 0 in every band: not a source pixel
                if not ok.any():
                    continue
                for k, b in enumerate(bands):
                    expected[2 * k, i, j] = pixels[b][ok].mean()
                    expected[2 * k + 1, i, j] = pixels[b][ok].std()
                if ndvi:
                    nir, red = pixels[3][ok], pixels[0][ok]
                    expected[-1, i, j] = np.mean((nir - red) / (nir + red))
    return expected


def test_cells_equal_statistics_of_the_source_pixels_at_their_bounds(region, sheet, tmp_path):
    image, grid, dofa = region
    out = spectral_store(image, dofa, tmp_path / "spectral.zarr", bands=["red", "green", "nir"])
    store = EmbeddingStore(out)
    assert store.attrs["features"] == [
        "red_mean",
        "red_sd",
        "green_mean",
        "green_sd",
        "nir_mean",
        "nir_sd",
        "ndvi",
    ]
    assert store.grid == EmbeddingStore(dofa).grid and store.cell_px == CELL
    assert store.chunk == EmbeddingStore(dofa).chunk and store.dtype == "float32"
    values = store.read(slice(None), slice(None))
    expected = reference(sheet, out, grid, [0, 1, 3], ndvi=True)
    covered = ~np.isnan(expected[0])
    # uncovered: the empty strip, the cell over the sheet's nodata margin; covered: the
    # straddling cell and the cells clipped at the grid's right and bottom edges
    assert not covered[:, :3].any() and covered[1:, 3].all()
    assert covered[1:, -1].all() and covered[-1, 3:].all()
    np.testing.assert_array_equal(store.covered(slice(None), slice(None)), covered)
    assert np.isnan(values[:, ~covered]).all()
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-4)
    # sampling at image pixels reads a cell's row, as on an embedding map
    rows, cols = np.array([5 * CELL + 3, 274]), np.array([10 * CELL + 15, 309])
    sampled = sample_embeddings(out, rows, cols)
    np.testing.assert_array_equal(sampled, values[:, rows // CELL, cols // CELL].T)


def test_without_a_nir_band_there_is_no_ndvi(sheet, tmp_path):
    image, grid = _image(tmp_path, sheet, ["red", "green", "blue", "swir"])
    dofa = _embedding_map(image, grid, tmp_path / "dofa.zarr")
    out = spectral_store(image, dofa, tmp_path / "spectral.zarr", bands=["blue"])
    store = EmbeddingStore(out)
    assert store.attrs["features"] == ["blue_mean", "blue_sd"] and store.dim == 2
    values = store.read(slice(None), slice(None))
    np.testing.assert_allclose(values, reference(sheet, out, grid, [2], ndvi=False), atol=1e-4)


def test_a_killed_run_leaves_no_store(region, tmp_path, monkeypatch):
    image, _, dofa = region
    calls = []

    def dies(*args):
        if calls:
            raise KeyboardInterrupt  # what a kill between two chunks looks like to the code
        calls.append(1)
        return real(*args)

    real = spectral._chunk_features
    monkeypatch.setattr(spectral, "_chunk_features", dies)
    with pytest.raises(KeyboardInterrupt):
        spectral_store(image, dofa, tmp_path / "spectral.zarr", bands=["red"])
    assert calls and list(tmp_path.iterdir()) == []


def test_unknown_band_is_named(region, tmp_path):
    image, _, dofa = region
    with pytest.raises(InputDataError, match=r"\['swir'\].*'red', 'green', 'blue', 'nir'"):
        spectral_store(image, dofa, tmp_path / "s.zarr", bands=["red", "swir"])
