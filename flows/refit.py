"""On-demand flow: refit a region's downstream species models, optionally with new settings."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow
from pydantic import Field, ValidationError, field_validator, model_validator

from botaclip_core.catalog import DownstreamSettings, StrictModel, merge_overrides
from flows.pipeline import run_plan
from flows.regenerate import default_report, existing_path
from tasks.stages import regenerate_plan_task


class RefitParams(StrictModel):
    """Parameters of a ``refit-downstream`` run."""

    catalog: str = Field(description="Path of the data catalog YAML.")
    region: str = Field(description="Region name in the catalog.")
    downstream: dict[str, Any] = Field(
        default_factory=dict,
        description="Downstream settings replaced for this run, e.g. {'folds': 3, 'models': ['glm']}; "
        "keys and values as in the catalog's 'downstream' section.",
    )
    checkpoint: str | None = Field(
        None, description="Refit on the maps of this finetune output (file or folder)."
    )
    finetune_key: str | None = Field(
        None, description="Refit on the maps of this completed finetune key."
    )
    report: str | None = Field(
        None, description="Report path; default <workdir>/reports/<region>-refit.json."
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Other catalog values replaced for this run."
    )

    @field_validator("catalog")
    @classmethod
    def _catalog_exists(cls, value: str) -> str:
        return existing_path(value, "catalog")

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_exists(cls, value: str | None) -> str | None:
        return None if value is None else existing_path(value, "checkpoint")

    @field_validator("downstream")
    @classmethod
    def _downstream_settings(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:  # every DownstreamSettings field has a default: this checks keys and values only
            DownstreamSettings.model_validate(value)
        except ValidationError as exc:
            allowed = ", ".join(DownstreamSettings.model_fields)
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise ValueError(
                f"downstream overrides: {problems} (allowed keys: {allowed})"
            ) from None
        return value

    @model_validator(mode="after")
    def _one_model(self) -> RefitParams:
        if self.checkpoint is not None and self.finetune_key is not None:
            raise ValueError("give checkpoint or finetune_key, not both")
        return self


def refit_run_name() -> str:
    """``<region>-refit-downstream``, with the overridden settings."""
    from flows.pipeline import _params

    params = _params()
    changed = ",".join(f"{k}={v}" for k, v in sorted((params.get("downstream") or {}).items()))
    name = f"{params['region']}-refit-downstream"
    return f"{name} [{changed}]" if changed else name


@flow(name="botaclip-refit-downstream", flow_run_name=refit_run_name)
def refit_flow(params: RefitParams) -> dict[str, Any]:
    """Refit the downstream models on the region's cached maps (publishes the metrics table)."""
    started = time.perf_counter()
    planned = regenerate_plan_task(
        params.catalog,
        params.region,
        finetune_key=params.finetune_key,
        checkpoint=params.checkpoint,
        stages=["downstream"],
        overrides=merge_overrides(params.overrides, {"downstream": params.downstream}),
    )
    return run_plan(
        planned,
        started=started,
        report_path=params.report or default_report(params.catalog, params.region, "refit"),
        report_artifact="botaclip-refit",
        title=f"botaclip refit-downstream: region {params.region}",
    )
