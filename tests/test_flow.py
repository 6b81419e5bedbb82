"""The Prefect flow on the tiny demo: report, Prefect's Cached states, artifacts, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import rioxarray  # noqa: F401
import xarray as xr
from light_demo import LIGHT_SOURCES, tiny_demo
from typer.testing import CliRunner

from botaclip_core.demo import write_demo_region
from flows.cli import app
from flows.pipeline import PipelineParams, pipeline_flow


def test_flow_runs_caches_and_publishes_metrics(tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client

    catalog = tiny_demo(tmp_path)
    report_path = tmp_path / "report.json"
    params = PipelineParams(catalog=str(catalog), region="demo", report=str(report_path))
    first_state = pipeline_flow(params, return_state=True)
    first = first_state.result()
    assert {s["status"] for s in first["stages"].values()} == {"completed"}
    assert json.loads(report_path.read_text())["downstream"] == first["downstream"]
    emb = xr.open_zarr(first["embeddings"]["botaclip"])
    assert emb.rio.crs.to_epsg() == 2154

    state = pipeline_flow(params, return_state=True)
    second = state.result()
    assert {s["status"] for s in second["stages"].values()} == {"cached"}
    assert second["downstream"] == first["downstream"]

    async def states_and_artifact():
        # these runs' own: the harness's database holds the runs of every test in this process
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterFlowRunId,
            FlowRunFilter,
            FlowRunFilterId,
        )

        ids = [first_state.state_details.flow_run_id, state.state_details.flow_run_id]
        async with get_client() as client:
            runs = await client.read_task_runs(  # the rerun's
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids[1:]))
            )
            artifacts = await client.read_artifacts(  # both runs': training publishes once
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids))
            )
        return [r.state.name for r in runs if r.name.startswith(("tile", "embed"))], artifacts

    import asyncio

    states, artifacts = asyncio.run(states_and_artifact())
    assert "Cached" in states  # the UI shows the rerun as Cached
    assert any(a.key == "botaclip-training-demo" for a in artifacts)  # training curve in the UI
    table = next(a for a in artifacts if a.key == "botaclip-metrics-demo")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {r["features"] for r in rows} == set(LIGHT_SOURCES)

    # the workdir removed behind Prefect's back: the stale cache record is not trusted
    import shutil

    shutil.rmtree(Path(first["stages"]["downstream"]["output"]))
    third = pipeline_flow(params)
    assert third["stages"]["downstream"]["status"] == "completed"
    assert third["downstream"] == first["downstream"]


def test_cli_reports_bad_catalog_clearly(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("regions:\n  r:\n    crs: EPSG:2154\n    resolution: 0.5\n    orthophoto: {}\n")
    result = CliRunner().invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    assert "unknown key 'orthophoto'" in result.output and "orthophotos" in result.output
    result = CliRunner().invoke(
        app, ["run", str(tmp_path / "missing.yaml"), "--region", "x", "--no-prefect"]
    )
    assert result.exit_code == 2 and "no such file" in result.output


@pytest.mark.parametrize("stages", ["tile,embed"])
def test_cli_runs_named_stages_without_targets(tmp_path, stages):
    catalog = write_demo_region(
        tmp_path,
        size="tiny",
        catalog_overrides={"regions": {"demo": {"releves": None, "targets": []}}},
    )
    result = CliRunner().invoke(
        app, ["run", str(catalog), "--region", "demo", "--stages", stages, "--no-prefect"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "reports" / "demo.json").read_text())
    assert list(report["stages"]) == ["tile", "embed-dofa", "embed"]
    assert list(report["embeddings"]) == ["dofa"]


@pytest.mark.slow  # 53 s, four variants of the demo (make test-slow)
def test_ablation_compares_seed_and_paper_settings(tmp_path, prefect_harness):
    from flows.ablation import PAPER_VARIANT, SEED_VARIANT, AblationParams, ablation_flow

    catalog = write_demo_region(tmp_path, size="tiny")
    params = AblationParams(
        catalog=str(catalog), region="demo", variants=[SEED_VARIANT, PAPER_VARIANT]
    )
    rows = ablation_flow(params)
    assert [r["variant"] for r in rows] == [
        "adapter/infonce/l2sp (seed)",
        "adapter/sigmoid/similarity (paper)",
    ]
    assert all(r["val_loss"] is not None for r in rows)
    assert all(0.0 <= r["plants:botaclip:auc"] <= 1.0 for r in rows)
    assert rows[0]["val_loss"] != rows[1]["val_loss"]  # the variants really differ
    assert json.loads((tmp_path / "reports" / "demo-ablation.json").read_text()) == rows
    table = tmp_path / "reports" / "demo-ablation.csv"
    header = table.read_text().splitlines()[0]
    assert header.startswith("variant,loss,regularizer,mode") and "soil:dofa:spearman" in header


def test_bad_data_fails_once_with_a_clear_message(tmp_path, prefect_harness):
    import pandas as pd

    from botaclip_core.errors import InputDataError

    catalog = write_demo_region(tmp_path, size="tiny")
    soil = tmp_path / "demo-data" / "soil_fauna.csv"
    frame = pd.read_csv(soil)
    frame.rename(columns={"abundance": "count"}).to_csv(soil, index=False)
    params = PipelineParams(catalog=str(catalog), region="demo", stages=["rasterize"])
    with pytest.raises(
        InputDataError, match=r"column 'abundance' \(datasets.soil.value\) not found"
    ):
        pipeline_flow(params)
    assert not list((tmp_path / "rasterize").glob("*/_SUCCESS.json"))  # never marked complete

    import asyncio

    from prefect.client.orchestration import get_client

    async def failed_runs():
        async with get_client() as client:
            return [r for r in await client.read_task_runs() if r.state.is_failed()]

    runs = asyncio.run(failed_runs())
    assert runs and all(r.run_count == 1 for r in runs)  # an input error is not retried


def test_report_outside_the_workdir_in_process_and_under_prefect(tmp_path, prefect_harness):
    catalog = tiny_demo(tmp_path / "demo")
    elsewhere = tmp_path / "elsewhere" / "nested" / "vercors.json"  # folders that do not exist
    runner = CliRunner()
    args = ["run", str(catalog), "--region", "demo", "--report", str(elsewhere)]
    result = runner.invoke(app, [*args, "--no-prefect"])
    assert result.exit_code == 0, result.output
    in_process = json.loads(elsewhere.read_text())
    assert (elsewhere.parent / "demo.catalog.yaml").is_file()
    assert not (tmp_path / "demo" / "reports").exists()  # nothing written where it was not asked
    elsewhere.unlink()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    under_prefect = json.loads(elsewhere.read_text())
    for key in ("region", "embeddings", "downstream", "model_card", "report_path"):
        assert under_prefect[key] == in_process[key], key
    assert {k: v["key"] for k, v in under_prefect["stages"].items()} == {
        k: v["key"] for k, v in in_process["stages"].items()
    }
    assert in_process["report_path"] == str(elsewhere.resolve())
