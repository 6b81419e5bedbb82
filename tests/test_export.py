import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr

from botaclip_core.errors import InputDataError
from botaclip_core.export import export_cog
from botaclip_core.georef import georeferenced_dataset
from botaclip_core.grid import RegionGrid
from botaclip_core.tiling import open_image, region_grid_for_sources, tile_orthophotos

sys.path.insert(0, str(Path(__file__).parent / "data"))
from make_orthophotos import make_orthophotos  # noqa: E402

BANDS = ["blue", "green", "red", "nir"]


@pytest.fixture(scope="module")
def image_zarr(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    sources = make_orthophotos(root / "ortho", size=200)["aligned"]
    grid = region_grid_for_sources(sources, crs="EPSG:2154", resolution=0.5)
    result = tile_orthophotos(
        sources,
        root / "image.zarr",
        grid=grid,
        bands=BANDS,
        wavelengths_um=[0.49, 0.56, 0.665, 0.842],
        tile_size=64,
    )
    return result.path, grid


def assert_cog(path: Path) -> None:
    """A Cloud-Optimized GeoTIFF: GDAL's COG layout, 512 px tiles, overviews past one tile."""
    with rasterio.open(path) as ds:
        assert ds.profile["tiled"]
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert ds.block_shapes[0] == (512, 512)
        overviews = ds.overviews(1)
        if max(ds.width, ds.height) > 512:
            assert overviews, "a raster larger than one tile needs overviews"
            coarsest = overviews[-1]
            assert max(-(-ds.width // coarsest), -(-ds.height // coarsest)) <= 512
        else:
            assert overviews == []


def test_export_image_values_crs_transform(image_zarr, tmp_path):
    store, grid = image_zarr
    out = export_cog(store, "image", tmp_path / "image.tif")
    ds = open_image(store)
    with rasterio.open(out) as cog:
        assert cog.crs == grid.crs_obj
        assert cog.transform == grid.transform
        assert (cog.count, cog.height, cog.width) == (4, grid.height, grid.width)
        assert cog.dtypes[0] == "uint8"
        assert cog.nodata == 0
        assert cog.descriptions == tuple(BANDS)
        np.testing.assert_array_equal(cog.read(), ds["image"].values)
    assert_cog(out)


def test_export_valid_and_band_subset(image_zarr, tmp_path):
    store, grid = image_zarr
    ds = open_image(store)
    out = export_cog(store, "valid", tmp_path / "valid.tif")
    with rasterio.open(out) as cog:
        assert cog.count == 1 and cog.nodata is None
        np.testing.assert_array_equal(cog.read(1), ds["valid"].values)
    assert_cog(out)
    out = export_cog(store, "image", tmp_path / "nir_blue.tif", bands=[3, 0])
    with rasterio.open(out) as cog:
        assert cog.descriptions == ("nir", "blue")
        np.testing.assert_array_equal(cog.read(), ds["image"].values[[3, 0]])
    assert_cog(out)


def test_export_embedding_on_its_own_grid(image_zarr, tmp_path):
    _, grid = image_zarr
    coarse = grid.coarsen(16)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(6, coarse.height, coarse.width)).astype(np.float32)
    emb[:, 0, 0] = np.nan
    ds = georeferenced_dataset(
        coarse, {"embedding": (("feature", "y", "x"), emb)}, {"model": "test"}
    ).assign_coords(feature=np.arange(6))
    store = tmp_path / "dofa.zarr"
    ds.to_zarr(store, zarr_format=3, consolidated=False)
    out = export_cog(store, "embedding", tmp_path / "emb.tif", bands=[1, 4])
    with rasterio.open(out) as cog:
        assert cog.crs == coarse.crs_obj
        assert cog.transform == coarse.transform
        assert np.isnan(cog.nodata)
        np.testing.assert_array_equal(cog.read(), emb[[1, 4]])
    assert_cog(out)
    assert xr.open_zarr(store).rio.transform() == coarse.transform


def test_export_larger_than_a_tile_has_nearest_overviews(tmp_path):
    # 1300 x 1100 px: more than two 512 px tiles across, so GDAL must add overview levels
    grid = RegionGrid("EPSG:2154", 0.5, 652_000.0, 6_862_000.0, 1300, 1100)
    classes = np.random.default_rng(0).integers(1, 255, size=(2, 1100, 1300), dtype=np.uint8)
    ds = georeferenced_dataset(grid, {"classes": (("band", "y", "x"), classes)}, {})
    ds.to_zarr(tmp_path / "classes.zarr", zarr_format=3, consolidated=False)
    out = export_cog(tmp_path / "classes.zarr", "classes", tmp_path / "classes.tif")
    assert_cog(out)
    with rasterio.open(out) as cog:
        np.testing.assert_array_equal(cog.read(), classes)
        factors = cog.overviews(1)
        assert factors == cog.overviews(2) and factors[0] == 2
    for level, f in enumerate(factors):
        with rasterio.open(out, overview_level=level) as ovr:
            overview = ovr.read()
        assert overview.shape == (2, -(-1100 // f), -(-1300 // f))
        # nearest resampling: each overview pixel is one of the f x f source pixels it covers
        h, w = 1100 // f, 1300 // f
        cells = classes[:, : h * f, : w * f].reshape(2, h, f, w, f).transpose(0, 1, 3, 2, 4)
        hit = cells.reshape(2, h, w, f * f) == overview[:, :h, :w, None]
        assert hit.any(axis=-1).all(), f


def test_export_errors_name_store_and_fix(image_zarr, tmp_path):
    store, _ = image_zarr
    with pytest.raises(InputDataError, match=r"image\.zarr: no variable 'embedding'.*available"):
        export_cog(store, "embedding", tmp_path / "x.tif")
    with pytest.raises(InputDataError, match=r"bands: \[7\].*0\.\.3"):
        export_cog(store, "image", tmp_path / "x.tif", bands=[7])
    with pytest.raises(InputDataError, match="not a Zarr store"):
        export_cog(tmp_path / "missing.zarr", "image", tmp_path / "x.tif")
