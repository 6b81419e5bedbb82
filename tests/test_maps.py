"""Embedding maps as a product: points and boxes in any CRS, int8/float16 storage, strides, previews."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import rioxarray  # noqa: F401  (registers .rio)
import torch
import xarray as xr
import zarr
from PIL import Image
from pyproj import Transformer
from rasterio.windows import Window
from typer.testing import CliRunner

from botaclip_core.catalog import load_catalog
from botaclip_core.demo import write_demo_region
from botaclip_core.embed import BackboneSpec, embed_region
from botaclip_core.embedding_store import EmbeddingStore, open_embeddings, quantize_int8
from botaclip_core.errors import CatalogError, InputDataError
from botaclip_core.export import export_cog
from botaclip_core.grid import RegionGrid
from botaclip_core.models import build_dofa
from botaclip_core.pipeline import run_region
from botaclip_core.query import read_box, sample_points
from botaclip_core.tiling import tile_orthophotos
from flows.cli import app


def demo_run(root: Path, **overrides):
    """The tiny demo's maps (its stages up to ``embed``: these tests need no species models)."""
    catalog = write_demo_region(root, size="tiny", catalog_overrides=overrides or None)
    return catalog, run_region(load_catalog(catalog), "demo", stages=["embed"])


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    return demo_run(tmp_path_factory.mktemp("float32"))


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    return demo_run(tmp_path_factory.mktemp("int8"), embed={"dtype": "int8"})


def cells_by_rioxarray(store: str, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Reference: the cells holding map-CRS points, read with rioxarray's own coordinates."""
    da = xr.open_zarr(store)["embedding"]
    transform = da.rio.transform()
    cols = np.floor((xs - transform.c) / transform.a).astype(int)
    rows = np.floor((ys - transform.f) / transform.e).astype(int)
    return np.stack([da.values[:, r, c] for r, c in zip(rows, cols, strict=True)])


def test_quantize_int8_scheme_by_hand():
    x = np.array([[1.0, -0.5, np.nan, 0.0], [-2.54, 0.25, np.nan, 0.0]], dtype=np.float32)
    q, scale = quantize_int8(x)
    np.testing.assert_allclose(scale[:2], [2.54 / 127, 0.5 / 127], rtol=1e-6)
    assert np.isnan(scale[2]) and scale[3] == 0  # nothing embedded / an all-zero vector
    assert q[:, 0].tolist() == [50, -127] and q[:, 1].tolist() == [-127, 64]
    assert q[:, 2].tolist() == [0, 0] and q[:, 3].tolist() == [0, 0]


def test_sample_points_in_wgs84_equal_the_cells_that_hold_them(float_run, tmp_path):
    _, report = float_run
    store = report["embeddings"]["botaclip"]
    da = xr.open_zarr(store)["embedding"]
    t = da.rio.transform()
    rng = np.random.default_rng(3)
    n_y, n_x = da.shape[1:]
    xs = t.c + rng.uniform(0.01, n_x - 0.01, 20) * t.a  # map-CRS points inside the map
    ys = t.f + rng.uniform(0.01, n_y - 0.01, 20) * t.e
    lon, lat = Transformer.from_crs("EPSG:2154", "EPSG:4326", always_xy=True).transform(xs, ys)
    outside_lon, outside_lat = lon[0] + 1.0, lat[0]  # ~80 km east of the map
    points = pd.DataFrame(
        {
            "site": [f"s{i}" for i in range(21)],
            "lon": [*lon, outside_lon],
            "lat": [*lat, outside_lat],
        }
    )
    points.to_csv(tmp_path / "points.csv", index=False)
    out = tmp_path / "sampled.parquet"
    args = ["sample", store, str(tmp_path / "points.csv"), str(out), "--crs", "EPSG:4326"]
    result = CliRunner().invoke(app, [*args, "--x", "lon", "--y", "lat"])
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out)
    dim = da.shape[0]
    assert list(table.columns) == [
        "site",
        "lon",
        "lat",
        *[f"emb_{i}" for i in range(dim)],
        "status",
    ]
    assert table["status"].tolist() == ["ok"] * 20 + ["outside"]
    got = table[[f"emb_{i}" for i in range(dim)]].to_numpy()
    np.testing.assert_allclose(got[:20], cells_by_rioxarray(store, xs, ys), rtol=0, atol=1e-6)
    assert np.isnan(got[20]).all()


def test_sample_statuses_and_bilinear_between_cell_centres(float_run):
    _, report = float_run
    store = report["embeddings"]["dofa"]
    emb = xr.open_zarr(store)["embedding"]
    values, t = emb.values, emb.rio.transform()
    # the centre of cell (0, 0), and the midpoint between the centres of (0, 0) and (0, 1)
    cx, cy = t.c + 0.5 * t.a, t.f + 0.5 * t.e
    got, status = sample_points(store, [cx, cx + 0.5 * t.a], [cy, cy], method="bilinear")
    assert status.tolist() == ["ok", "ok"]
    np.testing.assert_allclose(got[0], values[:, 0, 0], atol=1e-6)
    np.testing.assert_allclose(got[1], (values[:, 0, 0] + values[:, 0, 1]) / 2, atol=1e-5)
    with pytest.raises(InputDataError, match="--method: 'cubic' is not nearest or bilinear"):
        sample_points(store, [cx], [cy], method="cubic")  # type: ignore[arg-type]


def test_int8_maps_stay_within_half_a_step(float_run, int8_run, tmp_path):
    (_, f32), (_, i8) = float_run, int8_run
    for name in ("dofa", "botaclip", "botasp"):
        store = EmbeddingStore(i8["embeddings"][name])
        assert store.dtype == "int8" and store.values.dtype == np.int8
        attrs = zarr.open_group(i8["embeddings"][name], mode="r").attrs.asdict()
        assert attrs["botaclip:quantization"]["scale"] == "scale"
        exact = open_embeddings(f32["embeddings"][name]).values
        decoded = open_embeddings(i8["embeddings"][name]).values
        scale = np.asarray(store.scale[:])
        assert np.array_equal(np.isnan(scale), np.isnan(exact).all(axis=0))
        err = np.abs(decoded - exact)
        assert np.nanmax(err - scale[None] / 2) <= 1e-6, name  # half a quantization step
        step = np.nanmax(np.abs(exact), axis=0) / 127  # GeoTessera's uncentred step, per cell
        assert np.nanmax(err - step[None] / 2) <= 1e-6, name
        assert open_embeddings(i8["embeddings"][name]).rio.crs.to_epsg() == 2154


def test_float16_maps_are_close_to_float32(float_run, tmp_path):
    _, f32 = float_run
    _, f16 = demo_run(tmp_path, embed={"dtype": "float16"}, regions={"demo": {"targets": []}})
    exact = open_embeddings(f32["embeddings"]["dofa"]).values
    half = open_embeddings(f16["embeddings"]["dofa"]).values
    assert EmbeddingStore(f16["embeddings"]["dofa"]).values.dtype == np.float16
    np.testing.assert_allclose(half, exact, rtol=2e-3, atol=1e-3)


def test_box_in_another_crs_exports_the_map_cells(int8_run, tmp_path):
    _, report = int8_run
    store = report["embeddings"]["botaclip"]
    full = open_embeddings(store)
    t = full.rio.transform()
    # the map-CRS box of cells (0..0, 1..1), given in WGS84: its reprojection covers cell col 1
    x0, x1 = t.c + 1.2 * t.a, t.c + 1.8 * t.a
    y0, y1 = t.f + 0.2 * t.e, t.f + 0.8 * t.e
    lon, lat = Transformer.from_crs("EPSG:2154", "EPSG:4326", always_xy=True).transform(
        [x0, x1], [y1, y0]
    )
    bbox = f"{lon[0]},{lat[0]},{lon[1]},{lat[1]}"
    out = tmp_path / "box.tif"
    args = ["export", store, str(out), "--variable", "embedding", "--bbox", bbox]
    result = CliRunner().invoke(app, [*args, "--crs", "EPSG:4326", "--bands", "0,1,2"])
    assert result.exit_code == 0, result.output
    box = read_box(store, (lon[0], lat[0], lon[1], lat[1]), crs="EPSG:4326")
    assert box.sizes["x"] >= 1 and box.sizes["y"] >= 1
    with rasterio.open(out) as ds:
        assert ds.crs.to_epsg() == 2154 and ds.count == 3
        col0 = round((ds.transform.c - t.c) / t.a)
        row0 = round((ds.transform.f - t.f) / t.e)
        assert (ds.transform.a, ds.transform.e) == (t.a, t.e)
        assert ds.transform.c == t.c + col0 * t.a and ds.transform.f == t.f + row0 * t.e
        expected = full.values[:3, row0 : row0 + ds.height, col0 : col0 + ds.width]
        np.testing.assert_allclose(ds.read(), expected, atol=1e-6)
        np.testing.assert_allclose(ds.read(), box.values[:3], atol=1e-6)
    with pytest.raises(InputDataError, match="does not intersect the map"):
        export_cog(Path(store), "embedding", tmp_path / "none.tif", bbox=(0, 0, 1, 1))


def test_demo_maps_have_previews_linked_from_the_report(float_run):
    _, report = float_run
    assert set(report["previews"]) == {"dofa", "botaclip", "botasp"}
    for name, png in report["previews"].items():
        image = np.asarray(Image.open(png))
        covered = ~np.isnan(xr.open_zarr(report["embeddings"][name])["embedding"].values[0])
        assert image.shape == (*covered.shape, 4)
        assert np.array_equal(image[..., 3] == 255, covered)  # nodata transparent
        assert image[covered][:, :3].std() > 0  # the components vary across the map


def test_stride_must_centre_windows_on_cells(tmp_path):
    with pytest.raises(CatalogError, match="differ by an odd number of pixels"):
        write_demo_region(tmp_path, size="tiny", catalog_overrides={"embed": {"stride": 111}})


def test_strided_map_of_a_real_orthophoto_equals_centred_windows(realdata, tmp_path):
    """Every cell = DOFA of the tile-sized window centred on it, read straight from NAIP."""
    source = realdata / "naip" / "m_4709963_se_14_1_20200831.tif"
    tile, stride = 32, 16
    with rasterio.open(source) as ds:  # a 200 × 160 px crop on the sheet's own pixel lattice
        t = ds.transform
        grid = RegionGrid(str(ds.crs), 5.0, t.c + 300 * 5.0, t.f - 250 * 5.0, 160, 200)
    image = tile_orthophotos(
        [source],
        tmp_path / "image.zarr",
        grid=grid,
        bands=["r", "g", "b", "n"],
        wavelengths_um=[0.665, 0.56, 0.49, 0.842],
        tile_size=tile,
    )
    spec = BackboneSpec("tiny", None, 5, (0.665, 0.56, 0.49, 0.842), (110.0,) * 4, (50.0,) * 4, 16)
    out = tmp_path / "strided.zarr"
    embed_region(image.path, out, spec=spec, dim=64, tile_size=tile, block_tiles=4, stride=stride)
    emb = xr.open_zarr(out)["embedding"]
    assert emb.shape == (64, 200 // stride + 1, 160 // stride)  # ceil(200 / 16) = 13
    assert emb.rio.transform().a == stride * 5.0 and emb.rio.transform().c == grid.left
    model = build_dofa("tiny", seed=5).eval()
    half = (tile - stride) // 2
    rows, cols = np.meshgrid(range(emb.shape[1]), range(emb.shape[2]), indexing="ij")
    with rasterio.open(source) as ds:
        r_off = round((ds.transform.f - grid.top) / 5.0)
        c_off = round((grid.left - ds.transform.c) / 5.0)
        windows, valid = [], []
        for r, c in zip(rows.ravel(), cols.ravel(), strict=True):
            r0, c0 = r * stride - half, c * stride - half  # grid pixel of the window's corner
            win = Window(c0 + c_off, r0 + r_off, tile, tile)
            pixels = ds.read(window=win, boundless=True, fill_value=0)
            inside = np.zeros((tile, tile), bool)  # grid pixels of the window inside the crop
            inside[max(0, -r0) : 200 - r0, max(0, -c0) : 160 - c0] = True
            valid.append(((pixels != 0).any(axis=0) & inside).any())
            windows.append(np.where(inside, pixels, 0))
    x = (torch.from_numpy(np.stack(windows)).float() - 110.0) / 50.0
    with torch.inference_mode():
        expected = model.forward_features(x, [0.665, 0.56, 0.49, 0.842]).numpy()
    got = emb.values.reshape(64, -1).T
    valid = np.array(valid)
    assert valid.sum() > 50 and np.isnan(got[~valid]).all()
    np.testing.assert_allclose(got[valid], expected[valid], rtol=1e-4, atol=1e-4)


def test_run_shows_progress_for_tiling_and_embedding(tmp_path):
    catalog = write_demo_region(tmp_path, size="tiny")
    args = ["run", str(catalog), "--region", "demo", "--stages", "embed", "--no-prefect"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "tiling image.zarr" in result.output and "embedding dofa.zarr" in result.output
    assert "4/4" in result.output and "tiles" in result.output


def test_flow_publishes_progress_artifacts(tmp_path, prefect_harness):
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.pipeline import PipelineParams, pipeline_flow

    catalog = write_demo_region(
        tmp_path,
        size="tiny",
        catalog_overrides={"regions": {"demo": {"releves": None, "targets": []}}},
    )
    state = pipeline_flow(PipelineParams(catalog=str(catalog), region="demo"), return_state=True)
    run_id = state.state_details.flow_run_id

    async def progress_artifacts():
        # this run's own: other tests' runs (some killed mid-way) share the harness's database
        async with get_client() as client:
            return [
                a
                for a in await client.read_artifacts()
                if a.type == "progress" and a.flow_run_id == run_id
            ]

    found = asyncio.run(progress_artifacts())
    described = [a.description or "" for a in found]
    assert any("tile: tiling image.zarr, 4 of 4 tiles" in d for d in described), described
    assert any("embed-dofa: embedding dofa.zarr" in d for d in described), described
    assert all(a.data == 100.0 for a in found if "of 4 tiles" in (a.description or ""))
    json.dumps(described)


def test_int8_store_is_under_a_third_of_float32(tmp_path):
    """A DOFA-Base-wide map (768 features) of 48 × 48 cells, features as a ViT gives them."""
    from botaclip_core.embedding_store import create_embedding_store

    grid = RegionGrid("EPSG:2154", 112.0, 900000.0, 6500000.0, 48, 48)
    rng = np.random.default_rng(0)
    values = rng.normal(0, 1, (768, 48, 48)).astype(np.float32) * rng.gamma(2, 0.5, (768, 1, 1))
    values[:, :5] = np.nan  # an uncovered strip
    sizes = {}
    for dtype in ("float32", "int8"):
        out = tmp_path / f"{dtype}.zarr"
        create_embedding_store(out, grid, 768, chunk=16, attrs={"tile_size_px": 224}, dtype=dtype)
        EmbeddingStore(out, mode="r+").write(0, 0, values)
        sizes[dtype] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        decoded = EmbeddingStore(out).read(slice(None), slice(None))
        assert np.array_equal(np.isnan(decoded), np.isnan(values))
    assert sizes["int8"] <= 0.3 * sizes["float32"], sizes


@pytest.mark.slow
def test_int8_maps_leave_downstream_scores_unchanged(tmp_path):
    """The 12 × 12-tile demo (tiny DOFA): scores from int8 maps equal float32 ones within 0.01.

    The Boyce index is the exception: a presence crossing a window edge moves it by a few
    hundredths (float32 against int8: up to 0.04 on this demo), so it gets 0.05; TSS and kappa,
    thresholded, get 0.03.
    """
    overrides = {
        "model": {"dofa": {"size": "tiny"}},
        "finetune": {"epochs": 5},
        # the maps' storage is the question, not the models: the default demo's five models on
        # six feature sources took over 10 minutes for the two runs
        "downstream": {
            "models": ["glm"],  # a forest's splits amplify any change of its inputs
            "random_cv_models": [],
            "feature_sources": ["dofa", "botaclip", "botasp"],
            # blocks sized from each map's own variograms differ between int8 and float32
            # (another range, other folds); one size for both isolates the storage
            "block_size_m": 300.0,
        },
    }
    catalog = write_demo_region(tmp_path, size="default", catalog_overrides=overrides)
    rows = {}
    for dtype in ("float32", "int8"):
        cat = load_catalog(catalog, {"embed": {"dtype": dtype}})
        report = run_region(cat, "demo", report_path=tmp_path / f"{dtype}.json")
        rows[dtype] = {
            (r["task"], r["features"], r["model"], r["validation"], r["metric"]): r["value"]
            for r in report["downstream"]
        }
    assert rows["int8"].keys() == rows["float32"].keys()
    for key, value in rows["float32"].items():
        # thresholded calls (TSS, kappa) jump by 1/n when one site crosses the threshold
        tolerance = {"boyce": 0.05, "tss": 0.03, "kappa": 0.03}.get(key[-1], 0.01)
        assert rows["int8"][key] == pytest.approx(value, abs=tolerance), key


def test_sample_geopackage_points_with_nodata_to_csv(tmp_path):
    import geopandas as gpd
    from shapely.geometry import Point

    from botaclip_core.embedding_store import create_embedding_store

    grid = RegionGrid("EPSG:2154", 100.0, 900000.0, 6500000.0, 6, 4)  # 6 × 4 cells of 100 m
    values = np.arange(3 * 4 * 6, dtype=np.float32).reshape(3, 4, 6) / 10
    values[:, 1, 2] = np.nan  # nothing embedded in cell (row 1, col 2)
    store = tmp_path / "map.zarr"
    create_embedding_store(store, grid, 3, chunk=2, attrs={"tile_size_px": 224}, dtype="int8")
    EmbeddingStore(store, mode="r+").write(0, 0, values)
    to_3857 = Transformer.from_crs("EPSG:2154", "EPSG:3857", always_xy=True)
    lambert = [
        (900050.0, 6499950.0),
        (900250.0, 6499850.0),
        (900350.0, 6499650.0),
        (899000.0, 6499950.0),
    ]
    points = gpd.GeoDataFrame(
        {"name": ["a", "b", "c", "d"]},
        geometry=[Point(*to_3857.transform(x, y)) for x, y in lambert],
        crs="EPSG:3857",
    )
    points.to_file(tmp_path / "points.gpkg", driver="GPKG")
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(
        app, ["sample", str(store), str(tmp_path / "points.gpkg"), str(out)]
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    assert table["name"].tolist() == ["a", "b", "c", "d"] and "geometry" in table.columns
    assert table["status"].tolist() == ["ok", "nodata", "ok", "outside"]
    emb = table[["emb_0", "emb_1", "emb_2"]].to_numpy()
    scale = np.abs(values).max(axis=0) / 127  # written without an offset: plain GeoTessera
    for i, (r, c) in {0: (0, 0), 2: (3, 3)}.items():
        np.testing.assert_allclose(emb[i], values[:, r, c], atol=scale[r, c] / 2 + 1e-6)
    assert np.isnan(emb[[1, 3]]).all()
    missing = CliRunner().invoke(
        app, ["sample", str(store), str(tmp_path / "points.gpkg"), str(tmp_path / "o.txt")]
    )
    assert missing.exit_code == 2 and "must be .parquet or .csv" in missing.output


def test_embed_keys_hold_the_precision_and_not_the_device(tmp_path):
    from botaclip_core.pipeline import plan_region

    catalog = load_catalog(write_demo_region(tmp_path, size="tiny"))

    def keys(**embed):
        cat = catalog.model_copy(update={"embed": catalog.embed.model_copy(update=embed)})
        plan = plan_region(cat, "demo", ["embed"])
        settings = plan.stages["embed-dofa"].settings
        return plan.stages["embed-dofa"].key, plan.stages["embed"].key, settings

    cpu = keys(device="cpu")
    assert cpu[2]["precision"] == "fp32" and cpu[2]["inference"]["device"] == "cpu"
    assert keys(device="cpu", batch_size=3)[:2] == cpu[:2]  # how, not what
    assert keys(device="cpu", precision="fp32")[:2] == cpu[:2]
    if not torch.cuda.is_available():
        assert keys(device="auto")[:2] == cpu[:2]
    # planned for GPU workers (bf16 follows the device): both maps get new keys
    gpu = keys(device="cuda")
    assert gpu[2]["precision"] == "bf16"
    assert gpu[0] != cpu[0] and gpu[1] != cpu[1]
    assert keys(device="cuda:1", batch_size=512)[:2] == gpu[:2]
    with pytest.raises(CatalogError, match="embed.precision is bf16 but the forward runs on cpu"):
        from botaclip_core.features import precision_context

        precision_context(torch.device("cpu"), "bf16")
