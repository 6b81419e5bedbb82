"""The `botaclip` command line as a user runs it, on the tiny demo region."""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rioxarray  # noqa: F401  (registers .rio)
import xarray as xr
from typer.testing import CliRunner

from botaclip_core.catalog import load_catalog
from botaclip_core.demo import write_demo_region
from botaclip_core.models import build_dofa, save_dofa
from botaclip_core.pipeline import plan_region
from botaclip_core.store import SUCCESS, fingerprint_file
from flows.cli import app

# the tiny demo's feature sources: its maps, the spectral baseline, its covariate rasters
DEMO_SOURCES = ("dofa", "botaclip", "botasp", "spectral", "covariates", "botaclip+covariates")

ALL_STAGES = ["tile", "rasterize", "features", "finetune", "embed-dofa", "embed", "downstream"]
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DemoRun:
    """A finished `botaclip demo` run: its workdir, catalog, CLI output and report."""

    workdir: Path
    catalog: Path
    output: str
    report: dict


def invoke(*args: str) -> str:
    """Run the CLI in this process; fail with its output unless it exits 0."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        result = CliRunner().invoke(app, [str(a) for a in args])
    finally:
        # `--no-prefect` calls logging.basicConfig on the runner's stream, closed afterwards
        root.handlers[:] = handlers
    assert result.exit_code == 0, f"exit {result.exit_code}:\n{result.output}"
    return result.output


def flat(output: str) -> str:
    """CLI output without whitespace: rich wraps and folds long paths at the terminal width."""
    return "".join(output.split())


def run_demo(workdir: Path, *flags: str) -> DemoRun:
    output = invoke("demo", "--size", "tiny", "--workdir", workdir, *flags)
    report = json.loads((workdir / "reports" / "demo.json").read_text())
    return DemoRun(workdir, workdir / "data_catalog.yaml", output, report)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> DemoRun:
    """`botaclip demo --size tiny --no-prefect`, once for the module.

    Tests read its outputs and the report captured here. The ablation test adds its variants'
    outputs to the workdir (and rewrites ``reports/demo.json``, as every pipeline run does),
    and removes or changes nothing that the other tests read.
    """
    return run_demo(tmp_path_factory.mktemp("cli-demo"), "--no-prefect")


def embedding(store: str | Path) -> np.ndarray:
    return xr.open_zarr(store)["embedding"].values


def api(query):
    """Run ``query(client)`` against the Prefect API (the test harness's server)."""
    from prefect.client.orchestration import get_client

    async def main():
        async with get_client() as client:
            return await query(client)

    return asyncio.run(main())


def flow_runs_of(flow_name: str, **params: str) -> list:
    """Flow runs of ``flow_name`` whose ``params`` parameter has these values."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    runs = api(
        lambda c: c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))
    )
    return [r for r in runs if params.items() <= r.parameters["params"].items()]


def assert_demo_outputs(demo: DemoRun) -> None:
    """The report of a whole demo run and the stage folders it names."""
    assert flat(f"demo catalog: {demo.catalog}") in flat(demo.output)
    assert flat(f"report: {demo.workdir / 'reports' / 'demo.json'}") in flat(demo.output)
    report = demo.report
    assert report["region"] == "demo"
    assert report["report_path"] == str((demo.workdir / "reports" / "demo.json").resolve())
    assert (demo.workdir / "reports" / "demo.catalog.yaml").is_file()
    assert list(report["stages"]) == ALL_STAGES
    for name, stage in report["stages"].items():
        out = Path(stage["output"])
        assert stage["status"] == "completed", name
        assert out == (demo.workdir / name / stage["key"]).resolve(), name
        manifest = json.loads((out / SUCCESS).read_text())
        assert manifest["stage"] == name and manifest["key"] == stage["key"]
    assert set(report["embeddings"]) == {"dofa", "botaclip", "botasp"}
    for store in report["embeddings"].values():
        assert Path(store).is_dir() and Path(store).is_relative_to(demo.workdir.resolve())
    pairs = {(r["task"], r["features"]) for r in report["downstream"] if r["primary"]}
    assert pairs == {(t, f) for t in ("plants", "butterflies", "soil") for f in DEMO_SOURCES}
    assert Path(report["model_card"]).is_file()


def test_demo_in_process_writes_report_and_stage_folders(demo_run):
    assert_demo_outputs(demo_run)


@pytest.mark.slow  # 32 s; `botaclip run` under Prefect is in make test (test_flow, test_ops)
def test_demo_under_prefect_writes_the_same_and_records_the_flow_run(tmp_path, prefect_harness):
    demo = run_demo(tmp_path)
    assert_demo_outputs(demo)
    runs = flow_runs_of("botaclip-pipeline", catalog=str(demo.catalog.resolve()))
    assert len(runs) == 1 and runs[0].state.is_completed() and runs[0].name == "demo"


def test_validate_counts_the_orthophotos(demo_run):
    n_sheets = len(list((demo_run.workdir / "demo-data" / "ortho").glob("*.tif")))
    assert n_sheets == 4
    output = invoke("validate", demo_run.catalog)
    assert f"region demo: {n_sheets} orthophoto files" in output
    assert "catalog is valid" in output


def test_export_writes_a_cog_of_the_store(demo_run, tmp_path):
    store = Path(demo_run.report["embeddings"]["botaclip"])
    out = tmp_path / "botaclip.tif"
    output = invoke("export", store, out, "--variable", "embedding", "--bands", "0,1,2")
    assert "wrote" in output
    ds = xr.open_zarr(store)
    with rasterio.open(out) as cog:
        assert cog.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert cog.crs == ds.rio.crs and cog.crs.to_epsg() == 2154
        assert cog.transform == ds.rio.transform()
        assert (cog.count, cog.height, cog.width) == (3, ds.sizes["y"], ds.sizes["x"])
        values = cog.read()
    np.testing.assert_array_equal(values, ds["embedding"].values[[0, 1, 2]])


def test_run_with_weights_uses_that_checkpoint(demo_run, tmp_path):
    weights = save_dofa(build_dofa("tiny", seed=1234), tmp_path / "dofa_tiny_seed1234.pth")
    catalog = write_demo_region(tmp_path / "demo", size="tiny")
    invoke(
        "run",
        catalog,
        "--region",
        "demo",
        "--stages",
        "embed",
        "--no-prefect",
        "--weights",
        weights,
    )
    report = json.loads((tmp_path / "demo" / "reports" / "demo.json").read_text())
    named = str(weights.resolve())
    card = json.loads(Path(report["model_card"]).read_text())
    assert card["dofa"]["weights"] == named
    for stage in ("features", "finetune", "embed-dofa"):
        manifest = json.loads((Path(report["stages"][stage]["output"]) / SUCCESS).read_text())
        assert manifest["inputs"]["weights"]["path"] == named, stage
        assert manifest["inputs"]["weights"]["blake2b"] == fingerprint_file(weights)["blake2b"]
    dofa = xr.open_zarr(report["embeddings"]["dofa"])
    assert dofa.attrs["dofa_weights"] == named
    random = embedding(demo_run.report["embeddings"]["dofa"])
    assert dofa["embedding"].shape == random.shape
    assert not np.allclose(dofa["embedding"].values, random, equal_nan=True)


def test_run_on_a_dask_scheduler_equals_an_in_process_run(demo_run, tmp_path):
    from distributed import LocalCluster

    catalog = write_demo_region(tmp_path, size="tiny")
    args = ["run", catalog, "--region", "demo", "--stages", "embed-dofa", "--no-prefect"]
    with LocalCluster(n_workers=1, processes=True, dashboard_address=None) as cluster:
        invoke(*args, "--dask-address", cluster.scheduler_address)
        ran_there = sorted(cluster.scheduler.task_prefixes)
    assert ran_there, "no task ran on the scheduler given by --dask-address"
    report = json.loads((tmp_path / "reports" / "demo.json").read_text())
    settings = {
        stage: json.loads((Path(report["stages"][stage]["output"]) / SUCCESS).read_text())[
            "settings"
        ]
        for stage in ("tile", "embed-dofa")
    }
    assert settings["tile"]["dask"]["address"] == cluster.scheduler_address
    assert settings["embed-dofa"]["inference"]["dask"]["address"] == cluster.scheduler_address
    # a runtime setting: the keys of a plan without it, and the outputs of an in-process run
    # (of the demo elsewhere: keys name the files by path, so they differ from demo_run's)
    plan = plan_region(load_catalog(catalog), "demo", ["embed-dofa"])
    assert {k: v["key"] for k, v in report["stages"].items()} == {
        k: p.key for k, p in plan.stages.items()
    }
    image = [
        xr.open_zarr(Path(r["stages"]["tile"]["output"]) / "image.zarr")
        for r in (report, demo_run.report)
    ]
    xr.testing.assert_equal(image[0], image[1])  # values and coordinates; `sources` differ
    dofa = [xr.open_zarr(r["embeddings"]["dofa"]) for r in (report, demo_run.report)]
    xr.testing.assert_allclose(dofa[0], dofa[1], rtol=0, atol=1e-5)


def test_run_under_prefect_records_the_flow_run(demo_run, tmp_path, prefect_harness):
    report_path = tmp_path / "prefect.json"  # not the demo's own report, which others read
    invoke("run", demo_run.catalog, "--region", "demo", "--report", report_path)
    report = json.loads(report_path.read_text())
    assert {k: v["status"] for k, v in report["stages"].items()} == dict.fromkeys(
        ALL_STAGES, "cached"
    )
    assert report["downstream"] == demo_run.report["downstream"]
    runs = flow_runs_of("botaclip-pipeline", report=str(report_path))
    assert len(runs) == 1 and runs[0].state.is_completed() and runs[0].name == "demo"
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    of_run = TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[runs[0].id]))
    names = {t.name.split("-")[0] for t in api(lambda c: c.read_task_runs(task_run_filter=of_run))}
    assert {"tile", "rasterize", "features", "finetune", "embed", "downstream"} <= names


def test_serve_creates_the_scheduled_deployment(demo_run, tmp_path, prefect_harness):
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    async def deployment(client):
        try:
            return await client.read_deployment_by_name("botaclip-pipeline/botaclip-demo")
        except ObjectNotFound:
            return None

    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "flows.cli", "serve", str(demo_run.catalog), "--region", "demo"]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [*cmd, "--cron", "0 3 1 * *"], env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 120
        found = None
        while found is None:
            if proc.poll() is not None:
                pytest.fail(f"`botaclip serve` exited with {proc.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no deployment botaclip-demo after 120 s:\n{log.read_text()}")
            time.sleep(0.5)
            found = api(deployment)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert [s.schedule.cron for s in found.schedules] == ["0 3 1 * *"], log.read_text()
    assert found.parameters == {
        "params": {"catalog": str(demo_run.catalog.resolve()), "region": "demo"}
    }


@pytest.mark.slow  # 35 s: four variants of the demo (make test-slow)
def test_ablation_writes_one_row_per_variant_and_the_artifact(demo_run, prefect_harness):
    # on the demo's catalog, as the README does: the seed variant is the demo's own run, cached
    catalog, reports = demo_run.catalog, demo_run.workdir / "reports"
    args = ["ablation", catalog, "--region", "demo", "--losses", "infonce"]
    output = invoke(*args, "--regularizers", "l2sp,similarity")
    variants = ["adapter/infonce/l2sp (seed)", "adapter/infonce/similarity"]
    assert flat("ablation, region demo") in flat(output)  # rich wraps the variant columns
    rows = json.loads((reports / "demo-ablation.json").read_text())
    assert [r["variant"] for r in rows] == variants
    assert [(r["loss"], r["regularizer"], r["mode"]) for r in rows] == [
        ("infonce", "l2sp", "adapter"),
        ("infonce", "similarity", "adapter"),
    ]
    assert all(r["val_loss"] is not None and 0.0 <= r["plants:botaclip:auc"] <= 1.0 for r in rows)
    assert rows[0]["val_loss"] != rows[1]["val_loss"]  # the regularisers really differ
    demo = demo_run.report["downstream"]
    seed = {f"{r['task']}:{r['features']}:{r['metric']}": r["value"] for r in demo if r["primary"]}
    assert {k: rows[0][k] for k in seed} == seed  # the seed variant is the demo's settings
    with open(reports / "demo-ablation.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["variant"] for r in table] == variants
    assert float(table[1]["val_loss"]) == pytest.approx(rows[1]["val_loss"])

    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    (ablation,) = flow_runs_of("botaclip-ablation", catalog=str(catalog.resolve()))
    published_by_it = ArtifactFilter(
        key=ArtifactFilterKey(any_=["botaclip-ablation-demo"]),
        flow_run_id=ArtifactFilterFlowRunId(any_=[ablation.id]),
    )
    (artifact,) = api(lambda c: c.read_artifacts(artifact_filter=published_by_it))
    data = artifact.data
    published = json.loads(data) if isinstance(data, str) else data
    assert published == rows
