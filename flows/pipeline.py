"""The BotaCLIP pipeline flow: the region's plan mapped onto one Prefect task per stage."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture
from pydantic import Field

from botaclip_core.catalog import StrictModel
from botaclip_core.pipeline import RegionPlan, execute, finish, stage_artifacts
from botaclip_core.run_report import run_report_markdown, stage_facts
from botaclip_core.store import StageResult
from tasks.stages import plan_task, stage_task


class PipelineParams(StrictModel):
    """Parameters of a pipeline run (what the Prefect UI shows and deployments store)."""

    catalog: str = Field(description="Path of the data catalog YAML.")
    region: str = Field(description="Region name in the catalog.")
    stages: list[str] | None = Field(
        None, description="Stages to run (and what they need); default all."
    )
    report: str | None = Field(
        None, description="Report path; default <workdir>/reports/<region>.json."
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Catalog values replaced for this run, e.g. {'dask': {'address': ...}}.",
    )


def _params() -> Any:
    from prefect.runtime import flow_run

    params = flow_run.parameters.get("params")
    return params.model_dump() if hasattr(params, "model_dump") else dict(params or {})


def variant_label(overrides: dict[str, Any]) -> str | None:
    """The fine-tuning variant a run's overrides select (``loss=sigmoid,mode=adapter``), if any."""
    finetune = overrides.get("finetune")
    if not isinstance(finetune, dict) or not finetune:
        return None
    return ",".join(f"{k}={v}" for k, v in sorted(finetune.items()))


def pipeline_run_name() -> str:
    """``<region>``, or ``<region> [<variant>]`` for a run with fine-tuning overrides."""
    params = _params()
    variant = variant_label(params.get("overrides") or {})
    return f"{params['region']} [{variant}]" if variant else str(params["region"])


def _record(stage: str, state: Any) -> StageResult:
    record = state.result()
    status = "cached" if state.name == "Cached" else record["status"]
    seconds = 0.0 if status == "cached" else record["seconds"]
    return StageResult(
        stage, record["key"], status, seconds, Path(record["path"]), record["outputs"]
    )


def artifact_key(prefix: str, region: str) -> str:
    """``<prefix>-<region>`` as Prefect wants artifact keys: lowercase, dashes."""
    return f"{prefix}-{region}".lower().replace("_", "-")


def model_tags(plan: RegionPlan) -> list[str]:
    """``model:dofa-<size>`` and, when the plan trains or applies one, ``model:<mode>/<loss>``."""
    catalog = yaml.safe_load(plan.catalog_yaml) or {}
    size = ((catalog.get("model") or {}).get("dofa") or {}).get("size", "base")
    tags = [f"model:dofa-{size}"]
    finetune = plan.stages.get("finetune")
    if finetune is not None:
        training = finetune.settings.get("training", {})
        tags.append(
            "model:{}/{}/{}".format(
                training.get("mode"), training.get("loss"), training.get("regularizer")
            )
        )
    return tags


def _tag_flow_run(tags: list[str]) -> None:
    """Add tags to the running flow run (they filter runs in the UI)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if flow_run.id is None:
        return
    merged = sorted({*flow_run.tags, *tags})
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=merged)


def run_plan(
    planned: dict[str, Any],
    *,
    started: float,
    report_path: str | None,
    report_artifact: str = "botaclip-report",
    title: str | None = None,
) -> dict[str, Any]:
    """Run a plan as one task per stage, write the report, publish the run's artifacts.

    Each task waits for its real upstream tasks (the UI's graph is the DAG) and is tagged with
    the region, the stage and the model. The flow logs each stage's status, key, output folder
    and the scalar facts of its manifest; it publishes the stages' tables (metrics, training
    curve) and the Markdown run report under ``<report_artifact>-<region>``.

    Args:
        planned: the plan, as :meth:`RegionPlan.to_dict` gives it.
        started: ``time.perf_counter()`` when the flow started (the report's seconds).
        report_path: where the report goes (default ``<workdir>/reports/<region>.json``).
        report_artifact: key prefix of the Markdown report artifact.
        title: heading of the Markdown report.

    Returns:
        The run report.
    """
    logger = get_run_logger()
    plan = RegionPlan.from_dict(planned)
    region_tag, models = f"region:{plan.region}", model_tags(plan)
    _tag_flow_run(["botaclip", region_tag, *models])
    # cache records live in the artifact store: removing the workdir forgets them too
    staged = stage_task.with_options(result_storage=Path(plan.workdir) / "_prefect")

    def submit(stage: str, after: list[PrefectFuture[Any]]) -> PrefectFuture[Any]:
        # the store is authoritative: a Prefect record of an output removed since is not trusted
        missing = not plan.store.is_complete(stage, plan.stages[stage].key)
        tags = ["botaclip", region_tag, f"stage:{stage}", *models]
        return staged.with_options(refresh_cache=missing, tags=tags).submit(
            stage, planned, wait_for=after, return_state=False
        )

    def result(stage: str, future: PrefectFuture[Any]) -> StageResult:
        future.wait()
        res = _record(stage, future.state)  # re-raises the stage's error
        logger.info(
            "%s: %s in %.1f s, key %s, output %s; %s",
            stage,
            res.status,
            res.seconds,
            res.key,
            res.path,
            stage_facts(res.outputs) or "no scalar outputs",
        )
        return res

    results = execute(plan, submit, result)
    report = finish(
        plan, results, started=started, report_path=Path(report_path) if report_path else None
    )
    for table in stage_artifacts(plan.region, results):
        create_table_artifact(key=table.key, table=table.rows, description=table.description)
    create_markdown_artifact(
        key=artifact_key(report_artifact, plan.region),
        markdown=run_report_markdown(report, title=title),
        description=f"botaclip run report, region {plan.region}",
    )
    return report


@flow(name="botaclip-pipeline", flow_run_name=pipeline_run_name, log_prints=False)
def pipeline_flow(params: PipelineParams) -> dict[str, Any]:
    """Run the pipeline for one region: every stage a task run, independent branches at once."""
    started = time.perf_counter()
    catalog_path = str(Path(params.catalog).resolve())
    planned = plan_task(catalog_path, params.region, params.stages, params.overrides)
    return run_plan(planned, started=started, report_path=params.report)
