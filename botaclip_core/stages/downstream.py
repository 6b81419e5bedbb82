"""Stage ``downstream``: species models on each embedding, scored by spatially blocked CV."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from botaclip_core.catalog import DownstreamSettings
from botaclip_core.grid import RegionGrid
from botaclip_core.stages.base import Stage, StageInputs, StageOutput, StageSettings, TableArtifact
from botaclip_core.stages.common import GridSettings
from botaclip_core.stages.context import PlanContext
from botaclip_core.stages.embed import EmbedOutput
from botaclip_core.stages.rasterize import RasterizeOutput
from botaclip_core.store import atomic_write_json

if TYPE_CHECKING:
    from botaclip_core.downstream import TargetScores

logger = logging.getLogger(__name__)


class DownstreamStageSettings(StageSettings):
    """The models and validation, the targets, and the grid the sites lie on."""

    downstream: DownstreamSettings
    targets: list[str]
    grid: GridSettings


class DownstreamOutput(StageOutput):
    """Metric rows (task, features, model, metric, value, ...) and per-target scores."""

    metrics: list[dict[str, Any]]
    metrics_file: str
    per_target_file: str


def applies(ctx: PlanContext) -> str | None:
    """Only regions with targets."""
    return None if ctx.region.targets else "needs the region's 'targets' in the catalog"


def settings(ctx: PlanContext) -> DownstreamStageSettings:
    """The catalog's downstream settings and the region's targets."""
    return DownstreamStageSettings(
        downstream=ctx.catalog.downstream,
        targets=list(ctx.region.targets),
        grid=GridSettings.of(ctx.grid),
    )


def build(
    settings: DownstreamStageSettings, inputs: StageInputs, out_dir: Path
) -> DownstreamOutput:
    """Fit and score every target on every feature source."""
    from botaclip_core import downstream as ds_models

    maps = inputs.output("embed", EmbedOutput).model_dump()
    raster = inputs.output("rasterize", RasterizeOutput)
    opts, grid = settings.downstream, settings.grid.to_grid()
    sources = {s: Path(maps[s]) for s in opts.feature_sources if maps.get(s)}
    block = opts.block_size_m or max(grid.width, grid.height) * grid.resolution / 5.0
    background = _background(Path(maps["dofa"]), opts, grid)
    landscape, projectors = {}, {}
    for source, path in sources.items():
        raw = _sample(path, background["rows"], background["cols"])
        projectors[source] = ds_models.fit_projector(raw, opts)
        landscape[source] = projectors[source].transform(raw)
    rows: list[dict[str, Any]] = []
    per_target: dict[str, Any] = {}
    for name in settings.targets:
        files = raster.sites(name)
        table = files.load(name)
        r, c = table.sites["row"].to_numpy(), table.sites["col"].to_numpy()
        xy = table.sites[["x", "y"]].to_numpy()
        for source, path in sources.items():
            X = _sample(path, r, c)
            ok = ~np.isnan(X).any(axis=1)
            X = projectors[source].transform(X[ok])
            scores = _evaluate(
                files.kind, X, table, ok, xy, landscape[source], background, opts, block
            )
            if not scores.n_targets:
                logger.warning("downstream %s/%s: no target has enough data to score", name, source)
            rows += _metric_rows(name, files.kind, source, scores)
            per_target[f"{name}/{source}"] = scores.per_target
    atomic_write_json(out_dir / "metrics.json", rows)
    atomic_write_json(out_dir / "per_target.json", per_target)
    return DownstreamOutput(
        metrics=rows,
        metrics_file=str(out_dir / "metrics.json"),
        per_target_file=str(out_dir / "per_target.json"),
    )


def _sample(path: Path, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Embeddings (dequantized) of the cells holding image pixels (rows, cols)."""
    from botaclip_core.embed import sample_embeddings

    return sample_embeddings(path, rows, cols)


def _evaluate(
    kind: str,
    X: np.ndarray,
    table: Any,
    ok: np.ndarray,
    xy: np.ndarray,
    landscape: np.ndarray,
    background: dict[str, np.ndarray],
    opts: DownstreamSettings,
    block: float,
) -> TargetScores:
    """The kind's evaluation: presence/absence, presence-only against background, abundance."""
    from botaclip_core import downstream as ds_models

    values, species = table.values[ok], table.species
    if kind == "presence_absence":
        return ds_models.evaluate_presence_absence(
            X, values, xy[ok], species, opts, block_size=block
        )
    if kind == "presence_only":
        return ds_models.evaluate_presence_only(
            X, values, xy[ok], landscape, background["xy"], species, opts, block_size=block
        )
    return ds_models.evaluate_abundance(X, values, xy[ok], species, opts, block_size=block)


def _metric_rows(task: str, kind: str, source: str, scores: TargetScores) -> list[dict[str, Any]]:
    from botaclip_core import downstream as ds_models

    return [
        {
            "task": task,
            "kind": kind,
            "features": source,
            "model": ds_models.MODEL_NAMES[kind],
            "metric": metric,
            "value": round(float(value), 4),
            "n_targets": scores.n_targets,
            "primary": metric == ds_models.PRIMARY_METRIC[kind],
        }
        for metric, value in scores.metrics.items()
    ]


def _background(
    dofa_zarr: Path, opts: DownstreamSettings, grid: RegionGrid
) -> dict[str, np.ndarray]:
    """Background points: random pixels of covered embedding cells (seeded)."""
    from botaclip_core.embedding_store import EmbeddingStore

    store = EmbeddingStore(dofa_zarr)
    covered = np.argwhere(store.covered(slice(None), slice(None)))  # (cy, cx) of one plane
    cell = store.cell_px
    rng = np.random.default_rng(opts.seed)
    pick = covered[rng.integers(0, len(covered), size=opts.n_background)]
    # edge cells of a grid that is not a whole number of cells hold fewer pixels
    rows = pick[:, 0] * cell + rng.integers(0, np.minimum(cell, grid.height - pick[:, 0] * cell))
    cols = pick[:, 1] * cell + rng.integers(0, np.minimum(cell, grid.width - pick[:, 1] * cell))
    xs, ys = grid.xy(rows, cols)
    return {"rows": rows, "cols": cols, "xy": np.column_stack([xs, ys])}


def report(output: DownstreamOutput) -> dict[str, Any]:
    """The metric rows."""
    return {"downstream": output.metrics}


def artifacts(region: str, output: DownstreamOutput, status: str) -> list[TableArtifact]:
    """The metrics table."""
    columns = ("task", "features", "model", "metric", "value", "n_targets")
    return [
        TableArtifact(
            key=f"botaclip-metrics-{region}",
            rows=[{k: r[k] for k in columns} for r in output.metrics],
            description=f"Downstream metrics, region {region} (spatially blocked CV)",
        )
    ]


STAGE = Stage(
    name="downstream",
    version="2",  # 2: keyed on the embeddings' stages as split in issue 8
    needs=("rasterize", "embed"),
    settings_type=DownstreamStageSettings,
    settings=settings,
    build=build,
    output=DownstreamOutput,
    applies=applies,
    report=report,
    artifacts=artifacts,
    description="embeddings + sites → species models, metrics (spatially blocked CV)",
)
