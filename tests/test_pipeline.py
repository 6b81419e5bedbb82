"""The whole pipeline in-process on the tiny demo region: report, georeferencing, caching, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rioxarray  # noqa: F401  (registers .rio)
import xarray as xr
import yaml

from botaclip_core.catalog import load_catalog
from botaclip_core.demo import write_demo_region
from botaclip_core.errors import CatalogError
from botaclip_core.pipeline import resolve_stages, run_region
from botaclip_core.stages.context import PlanContext

ALL_STAGES = ["tile", "rasterize", "features", "finetune", "embed-dofa", "embed", "downstream"]


def run(catalog_path: Path, **kwargs):
    return run_region(load_catalog(catalog_path), "demo", catalog_path=catalog_path, **kwargs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-demo")
    catalog = write_demo_region(root, size="tiny")
    return catalog, run(catalog)


def metric_table(report):
    return {(r["task"], r["features"], r["metric"]): r["value"] for r in report["downstream"]}


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
    written = json.loads((catalog.parent / "reports" / "demo.json").read_text())
    assert written["downstream"] == report["downstream"]
    assert set(report["embeddings"]) == {"dofa", "botaclip", "botasp"}
    pairs = {(r["task"], r["features"]) for r in report["downstream"] if r["primary"]}
    assert pairs == {
        (t, f) for t in ("plants", "butterflies", "soil") for f in ("dofa", "botaclip", "botasp")
    }
    for r in report["downstream"]:
        lo = -1.0 if r["metric"] in ("spearman", "boyce") else 0.0
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


def test_changes_rerun_only_what_they_affect(tiny):
    catalog, first = tiny
    data = yaml.safe_load(catalog.read_text())
    data["downstream"]["C"] = 0.5
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
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = tmp_path
    deadline = time.time() + 300
    while time.time() < deadline and not list(work.glob("features/*")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(work.glob("tile/*/_SUCCESS.json")) and not list(
        work.glob("downstream/*/_SUCCESS.json")
    )
    report = run(catalog)
    assert report["stages"]["tile"]["status"] == "cached"
    assert report["stages"]["rasterize"]["status"] == "cached"
    assert report["stages"]["downstream"]["status"] == "completed"
    # deterministic whatever the workdir: the same metrics as the uninterrupted run elsewhere
    assert metric_table(report) == metric_table(reference)


def test_storage_only_change_reruns_tile_only(tiny):
    catalog, _ = tiny
    first = run(catalog)  # as the catalog stands after the other tests' edits: all cached
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
