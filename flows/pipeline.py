"""The BotaCLIP pipeline flow: the region's plan mapped onto one Prefect task per stage."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.futures import PrefectFuture
from pydantic import Field

from botaclip_core.catalog import StrictModel
from botaclip_core.pipeline import RegionPlan, execute, finish, stage_artifacts
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


def _record(stage: str, state: Any) -> StageResult:
    record = state.result()
    status = "cached" if state.name == "Cached" else record["status"]
    seconds = 0.0 if status == "cached" else record["seconds"]
    return StageResult(
        stage, record["key"], status, seconds, Path(record["path"]), record["outputs"]
    )


@flow(name="botaclip-pipeline", flow_run_name="{params.region}", log_prints=False)
def pipeline_flow(params: PipelineParams) -> dict[str, Any]:
    """Run the pipeline for one region: every stage a task run, independent branches at once."""
    logger = get_run_logger()
    started = time.perf_counter()
    catalog_path = str(Path(params.catalog).resolve())
    planned = plan_task(catalog_path, params.region, params.stages, params.overrides)
    plan = RegionPlan.from_dict(planned)
    # cache records live in the artifact store: removing the workdir forgets them too
    staged = stage_task.with_options(result_storage=Path(plan.workdir) / "_prefect")

    def submit(stage: str, after: list[PrefectFuture[Any]]) -> PrefectFuture[Any]:
        # the store is authoritative: a Prefect record of an output removed since is not trusted
        missing = not plan.store.is_complete(stage, plan.stages[stage].key)
        return staged.with_options(refresh_cache=missing).submit(stage, planned, wait_for=after)

    def result(stage: str, future: PrefectFuture[Any]) -> StageResult:
        future.wait()
        res = _record(stage, future.state)  # re-raises the stage's error
        logger.info("%s: %s in %.1f s", stage, res.status, res.seconds)
        return res

    results = execute(plan, submit, result)
    report = finish(
        plan, results, started=started, report_path=Path(params.report) if params.report else None
    )
    for table in stage_artifacts(params.region, results):
        create_table_artifact(key=table.key, table=table.rows, description=table.description)
    return report
