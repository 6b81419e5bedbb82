"""Prediction maps: a COG on the store's cell grid holding each predictor applied to its cells."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import rioxarray  # noqa: F401
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression

from botaclip_core.embedding_store import EmbeddingStore, create_embedding_store, open_embeddings
from botaclip_core.grid import RegionGrid
from botaclip_core.sdm.maps import predict_map

CELL_PX = 16
# 0.5 m pixels, 16-px cells; 23 × 17 cells, chunks of 8: partial chunks on both edges
GRID = RegionGrid("EPSG:2154", 0.5 * CELL_PX, 652_000.0, 6_862_000.0, 23, 17)


def _store(path: Path, dtype: str) -> Path:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(4, GRID.height, GRID.width)).astype(np.float32)
    feats[:, :3, :5] = np.nan  # a corner never embedded
    feats[:, rng.random(GRID.shape) < 0.1] = np.nan  # and scattered cells
    create_embedding_store(
        path,
        GRID,
        4,
        chunk=8,
        dtype=dtype,
        attrs={"tile_size_px": CELL_PX, "stride_px": CELL_PX},
    )
    EmbeddingStore(path, mode="r+").write(0, 0, feats)
    return path


@pytest.fixture(scope="module", params=["float32", "int8"])
def store(request, tmp_path_factory) -> Path:
    return _store(tmp_path_factory.mktemp("maps") / f"{request.param}.zarr", request.param)


def _models(store: Path):
    """A projector and two species: a known function and a fitted sklearn model."""
    rng = np.random.default_rng(1)
    landscape = rng.normal(size=(200, 4))
    pca = PCA(n_components=3).fit(landscape)
    z = pca.transform(landscape)
    clf = LogisticRegression().fit(z, z[:, 0] + 0.3 * rng.normal(size=200) > 0)
    return pca, {
        "Abies alba": lambda x: x[:, 0] * 2,
        "Fagus sylvatica": lambda x: clf.predict_proba(x)[:, 1],
    }


def test_map_is_a_cog_on_the_cell_grid_with_each_species_applied_to_the_cells(store, tmp_path):
    pca, predictors = _models(store)
    out = predict_map(store, predictors, tmp_path / "maps" / "task.tif", transform=pca.transform)
    assert out == tmp_path / "maps" / "task.tif"
    assert sorted(p.name for p in out.parent.iterdir()) == ["task.tif"]  # no temporary left
    src = EmbeddingStore(store)
    feats = src.read(slice(None), slice(None))
    covered = src.covered(slice(None), slice(None))
    assert 0 < covered.sum() < covered.size
    rows = pca.transform(feats[:, covered].T)
    with rasterio.open(out) as cog:
        assert cog.crs == open_embeddings(store).rio.crs and cog.crs.to_epsg() == 2154
        assert cog.transform == open_embeddings(store).rio.transform() == GRID.transform
        assert cog.transform.a == 0.5 * CELL_PX  # cells, not image pixels
        assert (cog.height, cog.width) == GRID.shape and cog.count == 2
        assert cog.descriptions == ("Abies alba", "Fagus sylvatica")
        assert cog.dtypes == ("float32", "float32") and np.isnan(cog.nodata)
        assert cog.profile["tiled"] and cog.overviews(1)
        assert cog.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        maps = cog.read()
    assert np.isnan(maps[:, ~covered]).all() and np.isfinite(maps[:, covered]).all()
    for band, predict in zip(maps, predictors.values(), strict=True):
        np.testing.assert_allclose(band[covered], predict(rows), rtol=1e-5, atol=1e-6)


def test_blocks_smaller_than_the_grid_give_the_same_map(store, tmp_path):
    pca, predictors = _models(store)
    one = predict_map(store, predictors, tmp_path / "one.tif", transform=pca.transform)
    many = predict_map(
        store, predictors, tmp_path / "many.tif", transform=pca.transform, block_cells=5
    )
    with rasterio.open(one) as a, rasterio.open(many) as b:
        np.testing.assert_array_equal(a.read(), b.read())
        assert a.transform == b.transform and a.descriptions == b.descriptions


def test_extra_features_are_appended_and_rows_without_them_are_not_mapped(store, tmp_path):
    src = EmbeddingStore(store)
    covariate = np.arange(GRID.height * GRID.width, dtype=np.float32).reshape(GRID.shape)
    covariate[-1] = np.nan  # a covariate raster that misses the last row of cells

    def extra(y0: int, x0: int, h: int, w: int) -> np.ndarray:
        return covariate[None, y0 : y0 + h, x0 : x0 + w]

    out = predict_map(
        store, {"sp": lambda x: x[:, -1] + x[:, 0]}, tmp_path / "m.tif", extra=extra, block_cells=7
    )
    feats = src.read(slice(None), slice(None))
    expected = covariate + feats[0]
    with rasterio.open(out) as cog:
        np.testing.assert_allclose(cog.read(1), expected, rtol=1e-6)
