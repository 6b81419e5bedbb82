"""The BotaCLIP pipeline flow: plan, then tile → rasterize → finetune → embed → downstream."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import Field

from botaclip_core.catalog import StrictModel, dump_catalog, load_catalog
from botaclip_core.pipeline import build_report, write_report
from botaclip_core.store import SUCCESS, StageResult
from tasks.stages import plan_region, run_stage


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


def _result(stage: str, state: Any) -> StageResult:
    record = state.result()
    status = "cached" if state.name == "Cached" else record["status"]
    seconds = 0.0 if status == "cached" else record["seconds"]
    return StageResult(
        stage, record["key"], status, seconds, Path(record["path"]), record["outputs"]
    )


@flow(name="botaclip-pipeline", flow_run_name="{params.region}", log_prints=False)
def pipeline_flow(params: PipelineParams) -> dict[str, Any]:
    """Run the pipeline for one region; writes and returns the report."""
    logger = get_run_logger()
    start = time.perf_counter()
    catalog_path = str(Path(params.catalog).resolve())
    catalog = load_catalog(catalog_path, params.overrides)
    plan = plan_region(catalog_path, params.region, params.stages, params.overrides)
    # cache records live in the artifact store: removing the workdir forgets them too
    staged = run_stage.with_options(result_storage=catalog.workdir_path / "_prefect")
    results: dict[str, StageResult] = {}
    for stage in plan["stages"]:
        state = staged(stage, plan, return_state=True)
        if state.is_failed():
            state.result()  # re-raises the stage's error
        result = _result(stage, state)
        if not (result.path / SUCCESS).is_file():  # Prefect remembered an output that was removed
            logger.warning("%s: cached record points to a missing output; recomputing", stage)
            result = _result(
                stage, staged.with_options(refresh_cache=True)(stage, plan, return_state=True)
            )
        logger.info("%s: %s in %.1f s", stage, result.status, result.seconds)
        results[stage] = result
    report = build_report(params.region, results)
    report["seconds"] = round(time.perf_counter() - start, 2)
    report_path = (
        Path(params.report)
        if params.report
        else catalog.workdir_path / "reports" / f"{params.region}.json"
    )
    write_report(report, report_path)
    (report_path.parent / f"{params.region}.catalog.yaml").write_text(dump_catalog(catalog))
    report["report_path"] = str(report_path.resolve())
    finetune = results.get("finetune")
    if finetune is not None and finetune.status == "completed":
        history = json.loads((finetune.path / "history.json").read_text())
        create_table_artifact(
            key=f"botaclip-training-{params.region}".lower().replace("_", "-"),
            table=[
                {k: round(v, 4) if isinstance(v, float) else v for k, v in h.items()}
                for h in history
            ],
            description=f"BotaCLIP training curve, region {params.region} (validation: spatially held-out plots)",
        )
    if report["downstream"]:
        create_table_artifact(
            key=f"botaclip-metrics-{params.region}".lower().replace("_", "-"),
            table=[
                {k: r[k] for k in ("task", "features", "model", "metric", "value", "n_targets")}
                for r in report["downstream"]
            ],
            description=f"Downstream metrics, region {params.region} (spatially blocked CV)",
        )
    return report
