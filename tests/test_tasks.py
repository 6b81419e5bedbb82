"""Prefect tasks: thin wrappers whose cache key is the artifact-store key."""

from __future__ import annotations

from pathlib import Path

from botaclip_core.demo import write_demo_region
from botaclip_core.store import SUCCESS
from tasks.stages import plan_region, run_stage, stage_cache_key


def test_tasks_plan_run_and_share_the_store_key(tmp_path):
    catalog = write_demo_region(tmp_path, size="tiny")
    plan = plan_region.fn(str(catalog), "demo", ["rasterize"], None)
    assert list(plan["stages"]) == ["rasterize"]
    key = plan["stages"]["rasterize"]["key"]
    assert (
        stage_cache_key(None, {"stage": "rasterize", "plan": plan}) == f"botaclip-rasterize-{key}"
    )

    record = run_stage.fn("rasterize", plan)
    assert record["status"] == "completed" and record["key"] == key
    assert (
        Path(record["path"]) == tmp_path / "rasterize" / key
        and (Path(record["path"]) / SUCCESS).is_file()
    )
    assert (
        record["outputs"]["releves"]["n_sites"] >= 50
        and record["outputs"]["soil"]["kind"] == "abundance"
    )
    assert run_stage.fn("rasterize", plan)["status"] == "cached"

    # overrides travel inside the plan, so a task sees the same catalog as the flow that planned it
    overridden = plan_region.fn(
        str(catalog), "demo", ["rasterize"], {"model": {"dofa": {"size": "small"}}}
    )
    assert overridden["overrides"] == {"model": {"dofa": {"size": "small"}}}
    assert overridden["stages"]["rasterize"]["key"] == key  # rasterize does not depend on the model
    assert overridden["keys"]["finetune"] != plan["keys"]["finetune"]
