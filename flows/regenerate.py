"""On-demand flow: rebuild a region's embedding maps, from its catalog or another fine-tuned model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow
from pydantic import Field, field_validator, model_validator

from botaclip_core.catalog import StrictModel
from flows.pipeline import run_plan
from tasks.stages import regenerate_plan_task


def existing_path(value: str, what: str) -> str:
    """``value`` made absolute, if it exists.

    Raises:
        ValueError: naming the missing path (pydantic reports it with the field's name).
    """
    path = Path(value).expanduser().resolve()
    if not path.exists():
        raise ValueError(f"{what} {value!r} does not exist (resolved to {path})")
    return str(path)


class RegenerateParams(StrictModel):
    """Parameters of a ``regenerate-embeddings`` run."""

    catalog: str = Field(description="Path of the data catalog YAML.")
    region: str = Field(description="Region name in the catalog.")
    checkpoint: str | None = Field(
        None,
        description="A file (model.pt) or the folder of a finetune output, from this workdir "
        "or another one (copied in); default: the model the catalog trains.",
    )
    finetune_key: str | None = Field(
        None, description="Key of a completed output under <workdir>/finetune/."
    )
    report: str | None = Field(
        None, description="Report path; default <workdir>/reports/<region>-regenerate.json."
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Catalog values replaced for this run."
    )

    @field_validator("catalog")
    @classmethod
    def _catalog_exists(cls, value: str) -> str:
        return existing_path(value, "catalog")

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_exists(cls, value: str | None) -> str | None:
        return None if value is None else existing_path(value, "checkpoint")

    @model_validator(mode="after")
    def _one_model(self) -> RegenerateParams:
        if self.checkpoint is not None and self.finetune_key is not None:
            raise ValueError(
                f"give checkpoint ({self.checkpoint!r}) or finetune_key "
                f"({self.finetune_key!r}), not both"
            )
        return self


def default_report(catalog: str, region: str, suffix: str) -> str:
    """``<workdir>/reports/<region>-<suffix>.json``: beside the pipeline's report, not over it."""
    from botaclip_core.catalog import load_catalog

    return str(load_catalog(catalog).workdir_path / "reports" / f"{region}-{suffix}.json")


def regenerate_run_name() -> str:
    """``<region>-regenerate-embeddings``, with the finetune key or checkpoint it applies."""
    from flows.pipeline import _params

    params = _params()
    model = params.get("finetune_key") or (
        Path(params["checkpoint"]).parent.name if params.get("checkpoint") else None
    )
    name = f"{params['region']}-regenerate-embeddings"
    return f"{name} [{model}]" if model else name


@flow(name="botaclip-regenerate-embeddings", flow_run_name=regenerate_run_name)
def regenerate_flow(params: RegenerateParams) -> dict[str, Any]:
    """Rebuild the region's embedding maps from its cached DOFA features.

    With a checkpoint or finetune key, the BotaCLIP and BotaSP maps come from that model; an
    adapter is applied to the cached DOFA map (seconds), and only a fine-tuned backbone
    (``finetune.mode`` partial or full) embeds the image again.
    """
    started = time.perf_counter()
    planned = regenerate_plan_task(
        params.catalog,
        params.region,
        finetune_key=params.finetune_key,
        checkpoint=params.checkpoint,
        overrides=params.overrides,
    )
    return run_plan(
        planned,
        started=started,
        report_path=params.report or default_report(params.catalog, params.region, "regenerate"),
        report_artifact="botaclip-regenerate",
        title=f"botaclip regenerate-embeddings: region {params.region}",
    )
