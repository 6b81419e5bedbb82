"""One Prefect task per pipeline stage; the store key doubles as Prefect's cache key."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.context import TaskRunContext
from prefect.states import get_state_exception

from botaclip_core import progress
from botaclip_core.catalog import load_catalog
from botaclip_core.errors import BotaclipError
from botaclip_core.pipeline import RegionPlan, plan_region, run_stage
from botaclip_core.regenerate import regenerate_plan
from tasks.progress import PrefectProgress


def stage_cache_key(context: TaskRunContext | None, parameters: dict[str, Any]) -> str:
    """``botaclip-<stage>-<store key>``: the same identity the artifact store uses."""
    stage = parameters["stage"]
    return f"botaclip-{stage}-{parameters['plan']['stages'][stage]['key']}"


def retry_unless_input_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry crashes and I/O hiccups, not errors in the user's data or catalog (they would recur)."""
    return not isinstance(get_state_exception(state), BotaclipError)


@task(name="plan", retries=0, tags=["botaclip"])
def plan_task(
    catalog_path: str,
    region: str,
    stages: list[str] | None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Keys and settings of the stages to run (cheap: file fingerprints and settings)."""
    catalog = load_catalog(catalog_path, overrides)
    return plan_region(catalog, region, stages, catalog_path=catalog_path).to_dict()


@task(name="plan-regenerate", retries=0, tags=["botaclip"])
def regenerate_plan_task(
    catalog_path: str,
    region: str,
    *,
    finetune_key: str | None = None,
    checkpoint: str | None = None,
    stages: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A plan for the region's maps (and ``stages``) from the catalog's or a named finetune."""
    catalog = load_catalog(catalog_path, overrides)
    plan = regenerate_plan(
        catalog,
        region,
        finetune_key=finetune_key,
        checkpoint=checkpoint,
        stages=stages,
        catalog_path=catalog_path,
    )
    return plan.to_dict()


@task(
    name="stage",
    task_run_name="{stage}",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=retry_unless_input_error,
    cache_key_fn=stage_cache_key,
    persist_result=True,
    tags=["botaclip"],
)
def stage_task(stage: str, plan: dict[str, Any]) -> dict[str, Any]:
    """Run one stage of a plan; returns the stage record (paths, key, status, seconds).

    Long loops inside the stage (tiles, embedding blocks) show as progress artifacts.
    """
    with progress.listening(PrefectProgress(stage)):
        return run_stage(RegionPlan.from_dict(plan), stage).record()
