"""Operations: the tiny demo against a real Prefect server, the server command, a real cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from light_demo import LIGHT_SOURCES, tiny_demo
from prefect_server import REPO, free_port, prefect_server, stop

from botaclip_core.run_report import run_report_markdown, stage_facts
from botaclip_core.store import SUCCESS
from flows.server import mask_password, server_spec

ALL_STAGES = ["tile", "rasterize", "features", "finetune", "embed-dofa", "embed", "downstream"]


def _data(artifact):
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def test_tiny_demo_against_a_real_server_shows_the_run_its_stages_and_artifacts(tmp_path):
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowFilter,
        FlowFilterName,
        LogFilter,
        LogFilterFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    workdir = tmp_path / "demo"
    catalog = tiny_demo(workdir)
    with prefect_server(tmp_path / "server") as server:
        output = server.run("run", catalog, "--region", "demo")
        assert "report:" in output
        of_pipeline = FlowFilter(name=FlowFilterName(any_=["botaclip-pipeline"]))
        (run,) = server.api(lambda c: c.read_flow_runs(flow_filter=of_pipeline))
        of_run = TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[run.id]))
        tasks = server.api(lambda c: c.read_task_runs(task_run_filter=of_run))
        artifacts = server.api(
            lambda c: c.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
            )
        )
        logs = server.api(
            lambda c: c.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))
            )
        )
        # a rerun with nothing changed: every stage cached, in seconds
        started = time.perf_counter()
        server.run(
            "run",
            catalog,
            "--region",
            "demo",
            "--report",
            tmp_path / "again.json",
        )
        rerun_s = time.perf_counter() - started
    assert "Prefect UI: http://127.0.0.1:" in server.log.read_text()

    assert run.state.is_completed() and run.name == "demo"
    assert {"botaclip", "region:demo", "model:dofa-tiny", "model:adapter/infonce/l2sp"} <= set(
        run.tags
    )
    stages = {t.name: t for t in tasks if t.name in ALL_STAGES}
    assert sorted(
        t.name for t in tasks if t.name != "plan" and not t.name.startswith("plan-")
    ) == sorted(ALL_STAGES), [
        t.name for t in tasks
    ]  # one task run per stage, features and embed-dofa included
    assert all(t.state.is_completed() for t in stages.values())
    for name, t in stages.items():
        assert {"region:demo", f"stage:{name}", "model:dofa-tiny"} <= set(t.tags), t.tags
    # the graph's edges: each stage waits for exactly the stages it needs
    ids = {t.id: t.name for t in stages.values()}
    upstream = {
        name: {ids[i.id] for i in t.task_inputs.get("wait_for", []) if i.id in ids}
        for name, t in stages.items()
    }
    assert upstream["embed"] == {"tile", "embed-dofa", "finetune"}
    assert upstream["finetune"] == {"rasterize", "features"}
    assert upstream["embed-dofa"] == {"tile"} and upstream["tile"] == set()

    by_key = {a.key: a for a in artifacts if a.key}
    metrics = _data(by_key["botaclip-metrics-demo"])
    assert {r["features"] for r in metrics} == set(LIGHT_SOURCES)
    assert len(_data(by_key["botaclip-training-demo"])) >= 1  # the training curve
    report = json.loads((workdir / "reports" / "demo.json").read_text())
    markdown = by_key["botaclip-report-demo"]
    assert markdown.type == "markdown"
    assert markdown.data == run_report_markdown(report)
    for name in ALL_STAGES:
        assert f"| {name} | completed |" in markdown.data
    assert report["previews"]["botaclip"] in markdown.data
    progress = [a for a in artifacts if a.type == "progress"]
    described = " ".join(a.description or "" for a in progress)
    assert "tile:" in described and "embed-dofa:" in described
    assert all(float(a.data) == pytest.approx(100.0) for a in progress)
    # the key facts of each stage's manifest, in the run's logs
    messages = "\n".join(r.message for r in logs)
    for name, stage in report["stages"].items():
        assert f"{name}: completed" in messages and stage["key"] in messages, name
    assert "tiles_embedded=" in messages and "best_val_loss=" in messages

    again = json.loads((tmp_path / "again.json").read_text())
    assert {s["status"] for s in again["stages"].values()} == {"cached"}
    assert again["seconds"] < 15 and rerun_s < 60, (again["seconds"], rerun_s)


def test_server_spec_is_loopback_quiet_and_masks_the_database_password(tmp_path):
    spec = server_spec(port=4321, environ={"PREFECT_HOME": str(tmp_path)})
    assert spec.command[-6:] == ["server", "start", "--host", "127.0.0.1", "--port", "4321"]
    assert spec.ui_url == "http://127.0.0.1:4321"
    assert spec.api_url == "http://127.0.0.1:4321/api" == spec.env["PREFECT_UI_API_URL"]
    assert spec.env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert spec.database == f"SQLite, {tmp_path / 'prefect.db'}"
    url = "postgresql+asyncpg://prefect:s3cr3t@db:5432/prefect"
    spec = server_spec(environ={"PREFECT_API_DATABASE_CONNECTION_URL": url})
    assert spec.database == "postgresql+asyncpg://prefect:***@db:5432/prefect"
    assert spec.env["PREFECT_API_DATABASE_CONNECTION_URL"] == url  # the server gets the real one
    assert mask_password("sqlite+aiosqlite:///x.db") == "sqlite+aiosqlite:///x.db"


def test_run_report_markdown_lists_stages_maps_and_metrics():
    report = {
        "region": "r",
        "seconds": 3.25,
        "report_path": "/w/reports/r.json",
        "stages": {
            "tile": {"status": "cached", "seconds": 0.0, "output": "/w/tile/a", "key": "a"},
            "embed": {"status": "completed", "seconds": 1.5, "output": "/w/embed/b", "key": "b"},
        },
        "embeddings": {"dofa": "/w/d.zarr", "botaclip": "/w/b.zarr"},
        "previews": {"botaclip": "/w/b.preview.png"},
        "charts": {"plants AUC": "/w/plants.png"},
        "downstream_maps": {"plants": "/w/plants_map.html", "note": "not a figure"},
        "downstream": [
            {
                "task": "plants",
                "features": "dofa",
                "model": "logistic",
                "metric": "auc",
                "value": 0.71234,
                "n_targets": 4,
                "primary": True,
            },
            {
                "task": "plants",
                "features": "dofa",
                "model": "logistic",
                "metric": "tss",
                "value": 0.3,
                "n_targets": 4,
                "primary": False,
            },
        ],
    }
    text = run_report_markdown(report)
    assert text.startswith("# botaclip run: region r\n")
    assert "2 stages (1 cached, 1 completed) in 3.2 s." in text
    assert "| tile | cached | 0.0 | a | `/w/tile/a` |" in text
    assert "| botaclip | `/w/b.zarr` | `/w/b.preview.png` |" in text
    assert "| dofa | `/w/d.zarr` | none |" in text
    assert "- plants AUC: `/w/plants.png`" in text
    assert "- downstream_maps: plants: `/w/plants_map.html`" in text and "not a figure" not in text
    assert "| plants | dofa | logistic | auc | 0.712 | 4 |" in text and "tss" not in text
    assert stage_facts({"zarr": "/x", "n": 3, "loss": 0.123456, "rows": [1], "none": None}) == (
        "zarr=/x, n=3, loss=0.1235"
    )


def _dask(*args: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "dask", *args],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_for_workers(address: str, n: int, timeout: float = 90) -> None:
    from distributed import Client

    with Client(address, timeout=timeout) as client:
        client.wait_for_workers(n, timeout=timeout)


def test_tile_and_embed_through_a_separately_started_cluster_equal_an_in_process_run(tmp_path):
    from distributed import Client
    from typer.testing import CliRunner

    from flows.cli import app

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = _dask(
        "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard",
        log=tmp_path / "scheduler.log",
    )  # fmt: skip
    workers = [
        _dask(
            "worker",
            address,
            "--host",
            "127.0.0.1",
            "--nthreads",
            "1",
            "--no-dashboard",
            "--name",
            f"w{i}",
            "--memory-limit",
            "2GiB",
            log=tmp_path / f"worker{i}.log",
        )  # fmt: skip
        for i in range(2)
    ]
    reports = {}
    try:
        _wait_for_workers(address, 2)
        for where, extra in (("cluster", ["--dask-address", address]), ("local", [])):
            catalog = tiny_demo(tmp_path / where)
            args = [
                "run",
                str(catalog),
                "--region",
                "demo",
                "--stages",
                "tile,embed",
                "--no-prefect",
            ]
            result = CliRunner().invoke(app, [*args, *extra])
            assert result.exit_code == 0, result.output
            reports[where] = json.loads((tmp_path / where / "reports" / "demo.json").read_text())
        with Client(address) as client:
            executed = client.run(lambda dask_worker: dask_worker.state.executed_count)
            prefixes = client.run_on_scheduler(
                lambda dask_scheduler: sorted(dask_scheduler.task_prefixes)
            )
    finally:
        for proc in [*workers, scheduler]:
            stop(proc)
    assert len(executed) == 2 and all(n > 0 for n in executed.values()), executed  # both worked
    assert prefixes, "nothing ran on the scheduler"
    cluster, local = reports["cluster"], reports["local"]
    assert list(cluster["stages"]) == [
        "tile",
        "rasterize",
        "features",
        "finetune",
        "embed-dofa",
        "embed",
    ]
    for stage in ("tile", "embed-dofa"):
        settings = json.loads((Path(cluster["stages"][stage]["output"]) / SUCCESS).read_text())[
            "settings"
        ]
        dask = settings["dask"] if stage == "tile" else settings["inference"]["dask"]
        assert dask["address"] == address, stage
    images = [
        xr.open_zarr(Path(r["stages"]["tile"]["output"]) / "image.zarr") for r in (cluster, local)
    ]
    xr.testing.assert_equal(images[0], images[1])
    assert set(cluster["embeddings"]) == {"dofa", "botaclip", "botasp"}
    for name in cluster["embeddings"]:
        a, b = (xr.open_zarr(r["embeddings"][name])["embedding"].values for r in (cluster, local))
        assert np.isfinite(a).any()
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=name)
