"""The whole pipeline in-process on the tiny demo region: report, georeferencing, caching, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rioxarray  # noqa: F401  (registers .rio)
import xarray as xr
import yaml

from botaclip_core.catalog import load_catalog
from botaclip_core.demo import write_demo_region
from botaclip_core.errors import CatalogError
from botaclip_core.pipeline import plan_region, resolve_stages, run_region
from botaclip_core.stages.context import PlanContext
from botaclip_core.store import ArtifactStore, fingerprint_file

# the tiny demo's feature sources: its maps, the spectral baseline, its covariate rasters
DEMO_SOURCES = ("dofa", "botaclip", "botasp", "spectral", "covariates", "botaclip+covariates")

ALL_STAGES = ["tile", "rasterize", "features", "finetune", "embed-dofa", "embed", "downstream"]


def run(catalog_path: Path, **kwargs):
    return run_region(load_catalog(catalog_path), "demo", catalog_path=catalog_path, **kwargs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny demo, run once: tests may add outputs, and put back any input they edit."""
    root = tmp_path_factory.mktemp("tiny-demo")
    catalog = write_demo_region(root, size="tiny")
    report = run(catalog)
    # later runs on this workdir rewrite reports/demo.json: keep the first run's as written
    shutil.copy2(report["report_path"], root / "first-report.json")
    return catalog, report


@pytest.fixture()
def restored_inputs(tiny, tmp_path):
    """The tiny demo's catalog and relevés, put back after the test (bytes and mtime)."""
    catalog, _ = tiny
    data = catalog.parent / "demo-data"
    inputs = [catalog, data / "releves.gpkg"]
    saved = [shutil.copy2(path, tmp_path / path.name) for path in inputs]
    before = [fingerprint_file(path) for path in inputs], sorted(os.listdir(data))
    yield tiny
    for copy, path in zip(saved, inputs, strict=True):
        shutil.copy2(copy, path)  # copystat keeps the mtime to the nanosecond
    # no journal left beside the GeoPackage either
    assert ([fingerprint_file(path) for path in inputs], sorted(os.listdir(data))) == before


def metric_table(report):
    return {
        (r["task"], r["features"], r["model"], r["metric"]): r["value"]
        for r in report["downstream"]
    }


def test_resolve_stages(tmp_path):
    def resolved(overrides, stages):
        catalog = write_demo_region(tmp_path, size="tiny", catalog_overrides=overrides)
        return resolve_stages(PlanContext(load_catalog(catalog), "demo"), stages)

    everything = {}
    no_releves = {"regions": {"demo": {"releves": None}}}
    bare = {"regions": {"demo": {"releves": None, "targets": []}}}
    assert resolved(everything, ["downstream"]) == ALL_STAGES
    assert resolved(bare, ["embed"]) == ["tile", "embed-dofa", "embed"]
    assert resolved(everything, ["finetune"]) == ["rasterize", "features", "finetune"]
    assert resolved(no_releves, None) == ["tile", "rasterize", "embed-dofa", "embed", "downstream"]
    with pytest.raises(CatalogError, match="unknown stage 'tiles'; stages are tile, rasterize"):
        resolved(everything, ["tiles"])
    with pytest.raises(CatalogError, match="stage 'finetune' needs the region's 'releves'"):
        resolved(no_releves, ["finetune"])
    with pytest.raises(CatalogError, match="stage 'downstream' needs the region's 'targets'"):
        resolved(bare, ["downstream"])


def test_report_follows_schema(tiny):
    catalog, report = tiny
    assert report["region"] == "demo"
    assert list(report["stages"]) == ALL_STAGES
    for stage in report["stages"].values():
        assert (
            stage["status"] == "completed"
            and stage["seconds"] >= 0
            and Path(stage["output"]).is_dir()
        )
    assert report["report_path"] == str(catalog.parent / "reports" / "demo.json")
    written = json.loads((catalog.parent / "first-report.json").read_text())
    assert written["downstream"] == report["downstream"]
    assert set(report["embeddings"]) == {"dofa", "botaclip", "botasp"}
    pairs = {(r["task"], r["features"]) for r in report["downstream"] if r["primary"]}
    assert pairs == {(t, f) for t in ("plants", "butterflies", "soil") for f in DEMO_SOURCES}
    for r in report["downstream"]:
        if r["value"] is None:  # a Boyce index with fewer than two windows
            assert r["metric"] == "boyce", r
            continue
        # R² and deviance explained fall below 0 where a model does worse than the mean
        lo = {"auc": 0.0, "tss": -1.0, "kappa": -1.0}.get(r["metric"], -np.inf)
        assert lo <= r["value"] <= 1.0 and r["n_targets"] > 0, r
    card = json.loads(Path(report["model_card"]).read_text())
    assert card["dofa"]["weights"].startswith("random") and card["data"]["n_plots"] >= 50


def test_outputs_are_georeferenced(tiny):
    _, report = tiny
    image = xr.open_zarr(Path(report["stages"]["tile"]["output"]) / "image.zarr")
    assert image.rio.crs.to_epsg() == 2154
    left, top = image.rio.transform().c, image.rio.transform().f
    assert image.rio.transform().a == 0.5 and image.rio.transform().e == -0.5
    assert image["image"].dims == ("band", "y", "x") and image["image"].dtype == np.uint8
    for name in ("dofa", "botaclip", "botasp"):
        emb = xr.open_zarr(report["embeddings"][name])
        t = emb.rio.crs, emb.rio.transform()
        assert t[0].to_epsg() == 2154
        assert (t[1].a, t[1].e, t[1].c, t[1].f) == (
            112.0,
            -112.0,
            left,
            top,
        )  # one cell per 224-px tile
        assert emb["embedding"].dims == ("feature", "y", "x")
        assert np.isfinite(emb["embedding"].values).any()


def test_store_coordinates_are_pixel_centres(tiny):
    catalog, report = tiny
    cat = load_catalog(catalog)
    left, bottom, right, top = cat.region("demo").bounds
    pixel = cat.region("demo").resolution
    cell = cat.tiling.tile_size * pixel  # one embedding per tile
    stores = {"image": (Path(report["stages"]["tile"]["output"]) / "image.zarr", pixel)}
    for name in ("dofa", "botaclip", "botasp"):
        stores[name] = (Path(report["embeddings"][name]), cell)
    for name, (store, res) in stores.items():
        ds = xr.open_zarr(store)
        nx, ny = round((right - left) / res), round((top - bottom) / res)
        assert (ds.sizes["x"], ds.sizes["y"]) == (nx, ny), name
        x = left + (np.arange(nx) + 0.5) * res
        y = top - (np.arange(ny) + 0.5) * res
        np.testing.assert_allclose(ds["x"].values, x, rtol=0, atol=1e-6, err_msg=f"{name} x")
        np.testing.assert_allclose(ds["y"].values, y, rtol=0, atol=1e-6, err_msg=f"{name} y")


def tile_only(catalog: Path, name: str) -> tuple[dict, np.ndarray]:
    """Run only ``tile``: its report entry and the image it wrote."""
    report = run(catalog, stages=["tile"], report_path=catalog.parent / f"{name}.json")
    stage = report["stages"]["tile"]
    return stage, xr.open_zarr(Path(stage["output"]) / "image.zarr")["image"].values


def planned_keys(catalog: Path) -> dict[str, str]:
    return {n: p.key for n, p in plan_region(load_catalog(catalog), "demo").stages.items()}


def test_touched_orthophoto_reruns_tile(tmp_path):
    catalog = write_demo_region(tmp_path, size="tiny")
    first, pixels = tile_only(catalog, "first")
    planned = planned_keys(catalog)
    sheet = sorted((tmp_path / "demo-data" / "ortho").glob("*.tif"))[0]
    original = fingerprint_file(sheet)

    # Same bytes, a new mtime. The key hashes each orthophoto's fingerprint, mtime included
    # (store.fingerprint_file), so tile reruns under a new key; the content hash is computed
    # again (size and mtime no longer match the remembered fingerprint) and is equal.
    touched_ns = original["mtime_ns"] + 10**9
    os.utime(sheet, ns=(touched_ns, touched_ns))
    touched, touched_pixels = tile_only(catalog, "touched")
    assert touched["status"] == "completed" and touched["key"] != first["key"]
    remembered = ArtifactStore(tmp_path).load_fingerprints()[original["path"]]
    assert remembered == {**original, "mtime_ns": touched_ns}
    np.testing.assert_array_equal(touched_pixels, pixels)
    # tile's content key hashes the fingerprints too, so every stage after it is re-keyed, the
    # costly embed-dofa included; only rasterize, which reads no orthophoto, keeps its key
    replanned = planned_keys(catalog)
    assert [n for n in ALL_STAGES if replanned[n] == planned[n]] == ["rasterize"]
    assert tile_only(catalog, "again")[0]["status"] == "cached"


def test_changed_orthophoto_reruns_tile_with_its_new_pixels(tmp_path):
    # one tiling thread, so that whatever the core count the second run reads the sheet in the
    # thread whose GDAL handle the first run left open: it must not serve the old pixels
    catalog = write_demo_region(tmp_path, size="tiny", catalog_overrides={"tiling": {"workers": 1}})
    first, pixels = tile_only(catalog, "first")
    sheet = sorted((tmp_path / "demo-data" / "ortho").glob("*.tif"))[0]  # first: it wins overlaps
    original = fingerprint_file(sheet)
    with rasterio.open(sheet, "r+") as ds:
        data = ds.read()
        new = np.where(data > 0, 255 - data, data)  # the nodata collar kept
        ds.write(new)
        left, top, res = ds.transform.c, ds.transform.f, ds.transform.a
    changed, changed_pixels = tile_only(catalog, "changed")
    assert fingerprint_file(sheet)["blake2b"] != original["blake2b"]
    assert changed["status"] == "completed" and changed["key"] != first["key"]
    cat = load_catalog(catalog)
    grid_left, _, _, grid_top = cat.region("demo").bounds
    row0, col0 = round((grid_top - top) / res), round((left - grid_left) / res)
    on_grid = changed_pixels[:, row0 : row0 + new.shape[1], col0 : col0 + new.shape[2]]
    valid = (new > 0).all(axis=0)
    assert valid.mean() > 0.5
    np.testing.assert_array_equal(on_grid[:, valid], new[:, valid])
    assert not np.array_equal(changed_pixels, pixels)


def test_rerun_is_cached_and_identical(tiny):
    catalog, first = tiny
    again = run(catalog)
    assert {s["status"] for s in again["stages"].values()} == {"cached"}
    assert metric_table(again) == metric_table(first)


def test_pixel_mode_embeds_region_with_tuned_backbone(tiny):
    catalog, first = tiny
    overrides = {"finetune": {"mode": "partial", "lora_rank": 4, "epochs": 2, "botasp": False}}
    report = run_region(
        load_catalog(catalog, overrides),
        "demo",
        catalog_path=catalog,
        report_path=catalog.parent / "lora.json",
    )
    status = {k: v["status"] for k, v in report["stages"].items()}
    assert status["tile"] == "cached" and status["finetune"] == "completed"
    card = json.loads(Path(report["model_card"]).read_text())
    assert (
        card["mode"] == "partial"
        and Path(report["stages"]["finetune"]["output"], "backbone.pt").is_file()
    )
    assert set(report["embeddings"]) == {"dofa", "botaclip"}
    tuned = xr.open_zarr(report["embeddings"]["botaclip"])["embedding"].values
    frozen = xr.open_zarr(report["embeddings"]["dofa"])["embedding"].values
    assert tuned.shape == frozen.shape and not np.allclose(tuned, frozen, equal_nan=True)


def test_changes_rerun_only_what_they_affect(restored_inputs):
    catalog, first = restored_inputs
    data = yaml.safe_load(catalog.read_text())
    data["downstream"]["model_params"] = {"C": 0.5}
    catalog.write_text(yaml.safe_dump(data))
    report = run(catalog)
    status = {k: v["status"] for k, v in report["stages"].items()}
    assert status == {**dict.fromkeys(ALL_STAGES, "cached"), "downstream": "completed"}

    releves = catalog.parent / "demo-data" / "releves.gpkg"
    frame = gpd.read_file(releves, layer="releves")
    frame = frame[frame["plot_id"] != frame["plot_id"].iloc[0]]
    frame.to_file(releves, layer="releves", driver="GPKG")
    report = run(catalog)
    status = {k: v["status"] for k, v in report["stages"].items()}
    assert status == {
        **dict.fromkeys(ALL_STAGES, "completed"),
        "tile": "cached",
        "embed-dofa": "cached",  # the DOFA map of the region, the costly part, is reused
    }
    assert (
        report["embeddings"]["dofa"] == first["embeddings"]["dofa"]
    )  # the DOFA features were reused
    assert report["embeddings"]["botaclip"] != first["embeddings"]["botaclip"]


def test_killed_run_resumes_without_redoing_completed_stages(tmp_path, tiny):
    _, reference = tiny
    catalog = write_demo_region(tmp_path, size="tiny")
    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        str(catalog),
        "--region",
        "demo",
        "--no-prefect",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    log = tmp_path / "killed-run.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
    work = tmp_path
    deadline = time.monotonic() + 300
    try:
        while not list(work.glob("features/*")):  # tile and rasterize are done: kill it now
            if proc.poll() is not None:
                pytest.fail(
                    f"the run exited with {proc.returncode} before features:\n{log.read_text()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"no features/ after 300 s:\n{log.read_text()}")
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()
    assert list(work.glob("tile/*/_SUCCESS.json")), log.read_text()
    assert not list(work.glob("downstream/*/_SUCCESS.json")), log.read_text()
    report = run(catalog)
    assert report["stages"]["tile"]["status"] == "cached"
    assert report["stages"]["rasterize"]["status"] == "cached"
    assert report["stages"]["downstream"]["status"] == "completed"
    # deterministic whatever the workdir: the same metrics as the uninterrupted run elsewhere
    assert metric_table(report) == metric_table(reference)


def test_storage_only_change_reruns_tile_only(tiny):
    catalog, _ = tiny
    first = run(catalog)  # all cached, whichever tests ran before
    overrides = {"tiling": {"zstd_level": 3}}
    report = run_region(
        load_catalog(catalog, overrides),
        "demo",
        catalog_path=catalog,
        report_path=catalog.parent / "zstd3.json",
    )
    status = {k: v["status"] for k, v in report["stages"].items()}
    assert status == {**dict.fromkeys(ALL_STAGES, "cached"), "tile": "completed"}
    assert report["stages"]["tile"]["key"] != first["stages"]["tile"]["key"]
    new = xr.open_zarr(Path(report["stages"]["tile"]["output"]) / "image.zarr")["image"].values
    old = xr.open_zarr(Path(first["stages"]["tile"]["output"]) / "image.zarr")["image"].values
    np.testing.assert_array_equal(new, old)  # the same pixels, stored differently
    assert report["embeddings"] == first["embeddings"]
