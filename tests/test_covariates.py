"""Covariate rasters as a feature source, and scores on an independent test set."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from pyproj import Transformer
from rasterio.transform import from_origin
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from botaclip_core.catalog import DownstreamSettings, parse_catalog
from botaclip_core.downstream import Sites, evaluate_test_set
from botaclip_core.errors import CatalogError, InputDataError
from botaclip_core.sdm.covariates import Encoder, Layer, sample_layers

LAMBERT = "EPSG:2154"


def _raster(path, data, *, crs="EPSG:4326", transform=None, nodata=None):
    transform = transform or from_origin(6.0, 45.01, 0.001, 0.001)
    with rasterio.open(
        path, "w", driver="GTiff", width=data.shape[1], height=data.shape[0], count=1,
        dtype=data.dtype, crs=crs, transform=transform, nodata=nodata,
    ) as dst:  # fmt: skip
        dst.write(data, 1)
    return path


def test_points_in_the_region_crs_sample_a_raster_in_another(tmp_path):
    values = (np.arange(10)[:, None] * 100 + np.arange(10)[None, :]).astype(np.float32)
    values[3, 4] = -1  # nodata
    path = _raster(tmp_path / "dem.tif", values, nodata=-1)
    lon = np.array([6.0005, 6.0045, 6.0095, 6.0045, 5.9])  # the last one off the raster
    lat = np.array([45.0095, 45.0035, 45.0015, 45.0065, 45.0])
    x, y = Transformer.from_crs("EPSG:4326", LAMBERT, always_xy=True).transform(lon, lat)
    got = sample_layers([Layer("dem", path)], np.column_stack([x, y]), LAMBERT)[:, 0]
    # the reference: rasterio's own point sampler, given WGS84 coordinates
    with rasterio.open(path) as ds:
        want = [float(v[0]) for v in ds.sample(zip(lon[:4], lat[:4], strict=True))]
    assert want[3] == -1  # (row 3, col 4) is the nodata pixel
    np.testing.assert_allclose(got[[0, 1, 2]], want[:3])
    assert np.isnan(got[3]) and np.isnan(got[4])  # nodata, outside


def test_encoder_z_scores_and_one_hot_from_the_background():
    layers = [Layer("elevation", "e.tif"), Layer("geology", "g.tif", categorical=True)]
    background = np.array([[100.0, 1], [200.0, 2], [300.0, 2], [np.nan, 3]])
    enc = Encoder.fit(layers, background)
    assert enc.columns == ["elevation", "geology=1", "geology=2", "geology=3"]
    out = enc.transform(np.array([[200.0, 3], [100.0, 7], [np.nan, 1]]))
    sd = np.std([100.0, 200.0, 300.0])
    np.testing.assert_allclose(out[0], [0.0, 0, 0, 1])
    np.testing.assert_allclose(out[1], [-100 / sd, 0, 0, 0])  # an unseen class: no column set
    assert np.isnan(out[2]).all()  # a point without elevation has no covariates


def test_covariate_errors_name_the_file_and_the_fix(tmp_path):
    no_crs = _raster(tmp_path / "nocrs.tif", np.ones((4, 4), np.float32), crs=None)
    with pytest.raises(InputDataError, match=r"nocrs\.tif has no CRS.*a_srs"):
        sample_layers([Layer("x", no_crs)], np.zeros((1, 2)), LAMBERT)
    one_band = _raster(tmp_path / "one.tif", np.ones((4, 4), np.float32))
    with pytest.raises(InputDataError, match=r"one\.tif has 1 band\(s\), not band 2"):
        sample_layers([Layer("x", one_band, band=2)], np.zeros((1, 2)), LAMBERT)
    with pytest.raises(InputDataError, match="no value at any of the 2 background points"):
        Encoder.fit([Layer("x", one_band)], np.full((2, 1), np.nan))
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    with pytest.raises(InputDataError, match=r"bad\.tif cannot be read as a raster"):
        sample_layers([Layer("x", tmp_path / "bad.tif")], np.zeros((1, 2)), LAMBERT)


def _tss_at_best(y: np.ndarray, score: np.ndarray) -> float:
    """The threshold maximising TSS on (y, score), by trying every score as a cut."""
    best, cut = -2.0, 0.0
    for t in np.unique(score):
        call = score >= t
        tss = call[y == 1].mean() + (~call[y == 0]).mean() - 1
        if tss > best:
            best, cut = tss, t
    return cut


def test_test_set_scores_equal_a_model_fitted_by_hand():
    rng = np.random.default_rng(3)
    X_train, X_test = rng.normal(size=(300, 3)), rng.normal(size=(200, 3))

    def observe(X):
        p = 1 / (1 + np.exp(-(2 * X[:, 0] - X[:, 1])))
        return np.column_stack([rng.random(len(X)) < p, rng.random(len(X)) < 0.3]).astype(int)

    Y_train, Y_test = observe(X_train), observe(X_test)
    settings = DownstreamSettings(models=["glm"], bootstrap=50, jobs=1)
    scores = evaluate_test_set(
        Sites(X_train, Y_train, ["a", "b"], "presence_absence"),
        Sites(X_test, Y_test[:, ::-1], ["b", "a"], "presence_absence"),  # matched by name
        rng.normal(size=(50, 3)),
        settings,
    )["glm"]
    model = LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000)
    model.fit(X_train, Y_train[:, 0])
    score = model.predict_proba(X_test)[:, 1]
    cut = _tss_at_best(Y_train[:, 0], model.predict_proba(X_train)[:, 1])
    call = score >= cut
    y = Y_test[:, 0]
    assert scores.per_target["a"]["auc"] == pytest.approx(roc_auc_score(y, score), abs=1e-9)
    want_tss = call[y == 1].mean() + (~call[y == 0]).mean() - 1
    assert scores.per_target["a"]["tss"] == pytest.approx(want_tss, abs=1e-9)
    assert scores.per_target["a"]["auc"] > 0.8 and abs(scores.per_target["b"]["auc"] - 0.5) < 0.15
    lo, hi = scores.per_target_intervals["a"]["auc"]
    assert lo < scores.per_target["a"]["auc"] < hi


def test_presence_only_training_scored_on_presence_absence_sites():
    rng = np.random.default_rng(4)
    background = rng.normal(size=(400, 2))
    presences = rng.normal(loc=[1.5, 0.0], size=(60, 2))
    X_test = rng.normal(size=(300, 2))
    y_test = (rng.random(300) < 1 / (1 + np.exp(-3 * (X_test[:, 0] - 1)))).astype(int)
    scores = evaluate_test_set(
        Sites(presences, np.ones((60, 1)), ["sp"], "presence_only"),
        Sites(X_test, y_test[:, None], ["sp"], "presence_absence"),
        background,
        DownstreamSettings(models=["glm", "rf"], bootstrap=0, jobs=1),
    )
    for model in ("glm", "rf"):
        assert set(scores[model].per_target["sp"]) == {"auc", "tss", "kappa", "cor"}
        assert scores[model].metrics["auc"] > 0.75, model


def _catalog(tmp_path, **overrides):
    mapping = {
        "regions": {
            "r": {
                "crs": LAMBERT,
                "resolution": 1.0,
                "orthophotos": {"paths": ["*.tif"], "bands": ["red"], "wavelengths_um": [0.66]},
                "targets": ["po"],
                "covariates": [{"name": "dem", "path": "dem.tif"}],
            }
        },
        "datasets": {
            "po": {"kind": "presence_only", "path": "po.gpkg", "test": "pa"},
            "pa": {"kind": "presence_absence", "path": "pa.gpkg", "value": "present"},
            "soil": {"kind": "abundance", "path": "s.gpkg", "value": "n"},
        },
    }
    for dotted, value in overrides.items():
        *head, last = dotted.split("__")
        node = mapping
        for key in head:
            node = node[key]
        node[last] = value
    return parse_catalog(mapping, base_dir=tmp_path, source="test")


def test_catalog_test_sets_and_feature_sources(tmp_path):
    catalog = _catalog(tmp_path)
    assert catalog.site_datasets("r") == ["po", "pa"]  # the test set is rasterized too
    assert catalog.downstream.sources_for(True)[-2:] == ["covariates", "botaclip+covariates"]
    assert "covariates" not in catalog.downstream.sources_for(False)
    with pytest.raises(CatalogError, match=r"datasets\.po\.test: dataset 'soil' has kind "):
        _catalog(tmp_path, datasets__po__test="soil")
    with pytest.raises(CatalogError, match="'pa' is also a target of region 'r'"):
        _catalog(tmp_path, regions__r__targets=["po", "pa"])
    with pytest.raises(CatalogError, match="names dataset 'nope'"):
        _catalog(tmp_path, datasets__po__test="nope")
    with pytest.raises(CatalogError, match=r"feature source 'botaclip\+dem'"):
        _catalog(tmp_path, downstream={"feature_sources": ["botaclip+dem"]})
    dup = [{"name": "dem", "path": "a.tif"}, {"name": "dem", "path": "b.tif"}]
    with pytest.raises(CatalogError, match="covariates: names must be unique"):
        _catalog(tmp_path, regions__r__covariates=dup)


def test_covariate_map_samples_each_cell_at_its_centre(tmp_path):
    """A map of the covariates alone, read back at the COG's own cell centres."""
    from botaclip_core.embedding_store import EmbeddingStore, create_embedding_store
    from botaclip_core.grid import RegionGrid
    from botaclip_core.sdm.maps import predict_map
    from botaclip_core.sdm.sources import Background, CovariateSource

    cell_px, res = 16, 0.5
    cells = RegionGrid(LAMBERT, res * cell_px, 652_000.0, 6_862_000.0, 23, 17)
    pixels = RegionGrid(LAMBERT, res, 652_000.0, 6_862_000.0, 23 * cell_px, 17 * cell_px)
    store = tmp_path / "cells.zarr"
    create_embedding_store(
        store, cells, 2, chunk=8, attrs={"tile_size_px": cell_px, "stride_px": cell_px}
    )
    EmbeddingStore(store, mode="r+").write(0, 0, np.ones((2, 17, 23), np.float32))
    to_wgs84 = Transformer.from_crs(LAMBERT, "EPSG:4326", always_xy=True)
    lon0, lat1 = to_wgs84.transform(651_990.0, 6_862_010.0)
    lon1, lat0 = to_wgs84.transform(652_200.0, 6_861_850.0)
    n_lat, n_lon = int((lat1 - lat0) / 1e-5) + 1, int((lon1 - lon0) / 1e-5) + 1
    field = (np.arange(n_lat)[:, None] * 7.0 + np.arange(n_lon)[None, :] * 0.5).astype(np.float32)
    dem = _raster(tmp_path / "dem.tif", field, transform=from_origin(lon0, lat1, 1e-5, 1e-5))
    rng = np.random.default_rng(0)
    bg_xy = np.column_stack(
        [rng.uniform(652_000, 652_184, 300), rng.uniform(6_861_864, 6_862_000, 300)]
    )
    source = CovariateSource(
        [Layer("dem", dem)], pixels, Background(np.zeros(300), np.zeros(300), bg_xy), store
    )
    mapping = source.map_inputs()
    out = predict_map(
        mapping.store, {"dem": lambda x: x[:, 0]}, tmp_path / "dem_map.tif",
        transform=mapping.transform, extra=mapping.extra,
    )  # fmt: skip
    with rasterio.open(out) as cog:
        got = cog.read(1)
        rows, cols = np.mgrid[0 : cog.height, 0 : cog.width]
        xs, ys = rasterio.transform.xy(cog.transform, rows.ravel(), cols.ravel())
    lon, lat = to_wgs84.transform(np.asarray(xs), np.asarray(ys))
    with rasterio.open(dem) as ds:
        want = np.array([v[0] for v in ds.sample(zip(lon, lat, strict=True))], dtype=float)
    enc = source.encoder
    np.testing.assert_allclose(got.ravel(), (want - enc.mean[0]) / enc.scale[0], rtol=1e-5)
