"""Deployments of a catalog's regions: the scheduled pipeline and two on-demand flows each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from botaclip_core.catalog import load_catalog

REGENERATE = "regenerate-embeddings"
REFIT = "refit-downstream"


def deployment_names(region: str) -> dict[str, str]:
    """Deployment names of a region, by flow name: ``botaclip-<region>[-<on-demand flow>]``."""
    return {
        "botaclip-pipeline": f"botaclip-{region}",
        f"botaclip-{REGENERATE}": f"botaclip-{region}-{REGENERATE}",
        f"botaclip-{REFIT}": f"botaclip-{region}-{REFIT}",
    }


def region_deployments(
    catalog: str | Path, regions: list[str] | None = None, *, dask_address: str | None = None
) -> list[Any]:
    """Runner deployments (for :func:`prefect.serve`) of the named regions, default all.

    Per region: the pipeline on the region's ``schedule`` (none: runs on demand only),
    ``regenerate-embeddings`` and ``refit-downstream``. Each stores the catalog path and the
    region as default parameters; a run from the UI or ``prefect deployment run`` adds the
    rest (a checkpoint, a finetune key, downstream overrides), validated before it starts.
    ``dask_address`` goes into every deployment's catalog overrides (``dask.address``).

    Raises:
        CatalogError: for an invalid catalog or an unknown region.
    """
    from prefect.schedules import Cron

    from flows.pipeline import pipeline_flow
    from flows.refit import refit_flow
    from flows.regenerate import regenerate_flow

    path = Path(catalog).resolve()
    cat = load_catalog(path)
    deployments = []
    for region in regions or list(cat.regions):
        spec = cat.region(region)
        names = deployment_names(region)
        defaults: dict[str, Any] = {"params": {"catalog": str(path), "region": region}}
        if dask_address:
            defaults["params"]["overrides"] = {"dask": {"address": dask_address}}
        tags = ["botaclip", f"region:{region}"]
        schedules = (
            [Cron(spec.schedule.cron, timezone=spec.schedule.timezone)] if spec.schedule else []
        )
        deployments += [
            pipeline_flow.to_deployment(
                name=names["botaclip-pipeline"],
                parameters=defaults,
                schedules=schedules,
                tags=tags,
                description=f"The whole pipeline of region {region} (cached stages are skipped).",
            ),
            regenerate_flow.to_deployment(
                name=names[f"botaclip-{REGENERATE}"],
                parameters=defaults,
                tags=[*tags, REGENERATE],
                description=f"Rebuild the embedding maps of region {region} from its cached "
                "DOFA features; add params.checkpoint or params.finetune_key for another model.",
            ),
            refit_flow.to_deployment(
                name=names[f"botaclip-{REFIT}"],
                parameters=defaults,
                tags=[*tags, REFIT],
                description=f"Refit the downstream models of region {region}; add "
                "params.downstream to change their settings.",
            ),
        ]
    return deployments


def serve_deployments(deployments: list[Any], *, limit: int | None = None) -> None:
    """Serve the deployments from this process until interrupted (runs start as subprocesses)."""
    from prefect import serve

    serve(*deployments, limit=limit, print_starting_message=False)
