"""Prefect tasks: thin wrappers whose cache key is the artifact-store key."""

from __future__ import annotations

from pathlib import Path

from botaclip_core.demo import write_demo_region
from botaclip_core.store import SUCCESS
from tasks.stages import plan_task, stage_cache_key, stage_task


def test_tasks_plan_run_and_share_the_store_key(tmp_path):
    catalog = write_demo_region(tmp_path, size="tiny")
    plan = plan_task.fn(str(catalog), "demo", ["rasterize"], None)
    assert list(plan["stages"]) == ["rasterize"]
    key = plan["stages"]["rasterize"]["key"]
    assert (
        stage_cache_key(None, {"stage": "rasterize", "plan": plan}) == f"botaclip-rasterize-{key}"
    )

    record = stage_task.fn("rasterize", plan)
    assert record["status"] == "completed" and record["key"] == key
    assert (
        Path(record["path"]) == tmp_path / "rasterize" / key
        and (Path(record["path"]) / SUCCESS).is_file()
    )
    assert (
        record["outputs"]["releves"]["n_sites"] >= 50
        and record["outputs"]["soil"]["kind"] == "abundance"
    )
    assert stage_task.fn("rasterize", plan)["status"] == "cached"

    # overrides travel inside the plan, so a task sees the same catalog as the flow that planned it
    overridden = plan_task.fn(
        str(catalog), "demo", ["finetune"], {"model": {"dofa": {"size": "small"}}}
    )
    full = plan_task.fn(str(catalog), "demo", ["finetune"], None)
    assert overridden["stages"]["features"]["settings"]["backbone"]["size"] == "small"
    assert overridden["stages"]["rasterize"]["key"] == key  # rasterize does not depend on the model
    assert overridden["stages"]["finetune"]["key"] != full["stages"]["finetune"]["key"]
