"""Stage ``downstream``: species models on each feature source, scored as ecologists judge them.

For every target dataset (task) and feature source (the embedding maps and a spectral baseline)
every model of ``downstream.models`` is scored by spatial block cross-validation (block size
from the sites' autocorrelation range unless the catalog sets one), the default model also by
random cross-validation; every score carries a bootstrap interval, every pair of sources a paired
comparison across species. Prediction maps (COG, one band per species) come from the model fitted
on all sites.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from botaclip_core.catalog import CovariateSpec, DownstreamSettings, source_parts
from botaclip_core.grid import RegionGrid
from botaclip_core.sdm.sources import Background, FeatureSource
from botaclip_core.stages.base import Stage, StageInputs, StageOutput, StageSettings, TableArtifact
from botaclip_core.stages.common import GridSettings
from botaclip_core.stages.context import PlanContext
from botaclip_core.stages.embed import EmbedOutput
from botaclip_core.stages.rasterize import RasterizeOutput
from botaclip_core.stages.tile import TileOutput
from botaclip_core.store import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from botaclip_core.downstream import TargetScores

logger = logging.getLogger(__name__)

N_MAPPED = 5  # species mapped per task by default: the most prevalent


class DownstreamStageSettings(StageSettings):
    """The models and validation, the targets (and test sets), grid, bands and covariates."""

    region: str
    downstream: DownstreamSettings
    targets: list[str]
    grid: GridSettings
    bands: list[str]
    test_sets: dict[str, str] = {}
    covariates: list[CovariateSpec] = []


class DownstreamOutput(StageOutput):
    """Metric rows, paired comparisons, tables, charts, the markdown report, prediction maps."""

    metrics: list[dict[str, Any]]
    comparisons: list[dict[str, Any]] = []
    blocks: dict[str, dict[str, Any]] = {}
    tables: dict[str, str] = {}
    charts: dict[str, str] = {}
    maps: dict[str, str] = {}
    report_md: str = ""
    metrics_file: str
    per_target_file: str


def applies(ctx: PlanContext) -> str | None:
    """Only regions with targets."""
    return None if ctx.region.targets else "needs the region's 'targets' in the catalog"


def settings(ctx: PlanContext) -> DownstreamStageSettings:
    """The catalog's downstream settings, the region's targets, bands and covariates."""
    catalog = ctx.catalog
    return DownstreamStageSettings(
        region=ctx.region_name,
        downstream=catalog.downstream,
        targets=list(ctx.region.targets),
        grid=GridSettings.of(ctx.grid),
        bands=list(ctx.region.orthophotos.bands),
        test_sets={t: test for t in ctx.region.targets if (test := catalog.test_set(t))},
        covariates=list(ctx.region.covariates),
    )


def inputs(ctx: PlanContext) -> dict[str, Any]:
    """The covariate rasters (the sites come from the rasterize stage)."""
    covariates = [ctx.fingerprint(ctx.catalog.resolve(c.path)) for c in ctx.region.covariates]
    return {"covariates": covariates} if covariates else {}


def build(
    settings: DownstreamStageSettings, inputs: StageInputs, out_dir: Path
) -> DownstreamOutput:
    """Fit and score every target on every feature source; tables, charts, report, maps."""
    from botaclip_core.sdm import report as sdm_report

    maps = inputs.output("embed", EmbedOutput).model_dump()
    raster = inputs.output("rasterize", RasterizeOutput)
    opts, grid = settings.downstream, settings.grid.to_grid()
    background = _background(Path(maps["dofa"]), opts, grid)
    sources = _sources(settings, inputs, maps, background, out_dir)
    cell_m = grid.resolution * _cell_px(Path(maps["dofa"]))
    rows: list[dict[str, Any]] = []
    per_species: list[dict[str, Any]] = []
    per_target: dict[str, Any] = {}
    comparisons: list[dict[str, Any]] = []
    blocks: dict[str, dict[str, Any]] = {}
    task_maps: dict[str, str] = {}
    for task in settings.targets:
        files = raster.sites(task)
        table = files.load(task)
        r, c = table.sites["row"].to_numpy(), table.sites["col"].to_numpy()
        xy = table.sites[["x", "y"]].to_numpy()
        reference = sources.get("dofa") or next(iter(sources.values()))
        ok_ref, X_ref = reference.at(r, c, xy)
        block, blocks[task] = _block_size(opts, xy[ok_ref], X_ref, cell_m)
        logger.info(
            "downstream %s: spatial blocks of %.0f m (%s)", task, block, blocks[task]["method"]
        )
        scored: dict[tuple[str, str], TargetScores] = {}
        test = _test_sites(settings, raster, task)
        for source_name, source in sources.items():
            ok, X = source.at(r, c, xy)
            runs: list[tuple[str, list[str]]] = [
                ("spatial", list(opts.models)),
                ("random", [m for m in opts.random_cv_models if m in opts.models]),
            ]
            for validation, models in runs:
                if not models:
                    continue
                by_model = _evaluate(
                    files.kind, X, table, ok, xy, source, background, opts, block,
                    validation=validation, models=models,
                )  # fmt: skip
                for model, scores in by_model.items():
                    if not scores.n_targets:
                        logger.warning(
                            "downstream %s/%s/%s: no target has enough data to score",
                            task,
                            source_name,
                            model,
                        )
                    rows += _metric_rows(task, files.kind, source_name, model, validation, scores)
                    per_species += _species_rows(task, source_name, model, validation, scores)
                    per_target[f"{task}/{source_name}/{model}/{validation}"] = scores.per_target
                    if validation == "spatial":
                        scored[(source_name, model)] = scores
            if test is not None:
                by_model = _evaluate_test(files.kind, X, table, ok, test, source, opts)
                for model, scores in by_model.items():
                    rows += _metric_rows(task, files.kind, source_name, model, "test", scores)
                    per_species += _species_rows(task, source_name, model, "test", scores)
                    per_target[f"{task}/{source_name}/{model}/test"] = scores.per_target
            logger.info("downstream %s/%s: %d models scored", task, source_name, len(opts.models))
        comparisons += _comparisons(task, files.kind, scored, opts)
        mapped = _prediction_map(task, files.kind, table, xy, sources, background, opts, out_dir)
        if mapped:
            task_maps[task] = mapped
    atomic_write_json(out_dir / "metrics.json", rows)
    atomic_write_json(out_dir / "per_target.json", per_target)
    atomic_write_json(out_dir / "comparisons.json", comparisons)
    tables = sdm_report.write_tables(rows, per_species, out_dir)
    charts = {
        task: str(sdm_report.task_chart(rows, task, out_dir / f"{task}.png"))
        for task in settings.targets
        if any(row["task"] == task for row in rows)
    }
    markdown = sdm_report.markdown_report(
        settings.region, rows, comparisons, {t: Path(p).name for t, p in charts.items()},
        task_maps, blocks,
    )  # fmt: skip
    atomic_write_text(out_dir / "report.md", markdown)
    return DownstreamOutput(
        metrics=rows,
        comparisons=comparisons,
        blocks=blocks,
        tables=tables,
        charts=charts,
        maps=task_maps,
        report_md=str(out_dir / "report.md"),
        metrics_file=str(out_dir / "metrics.json"),
        per_target_file=str(out_dir / "per_target.json"),
    )


def _cell_px(store: Path) -> int:
    from botaclip_core.embedding_store import EmbeddingStore

    return int(EmbeddingStore(store).cell_px)


def _spectral(inputs: StageInputs, dofa: Path, bands: list[str], out_dir: Path) -> Path:
    """The spectral baseline on the embedding maps' cells: band means, SDs and NDVI."""
    from botaclip_core.spectral import spectral_store

    image = Path(inputs.output("tile", TileOutput).zarr)
    nir = "nir" if "nir" in bands else None
    red = "red" if "red" in bands else None
    return spectral_store(image, dofa, out_dir / "spectral.zarr", bands=bands, nir=nir, red=red)


def _block_size(
    opts: DownstreamSettings, xy: np.ndarray, X: np.ndarray, cell_m: float
) -> tuple[float, dict[str, Any]]:
    """The catalog's block size, or the autocorrelation range of the sites' predictors."""
    if opts.block_size_m:
        return opts.block_size_m, {
            "block_size_m": opts.block_size_m,
            "method": "downstream.block_size_m in the catalog",
        }
    from botaclip_core.sdm.blocks import block_size

    size, info = block_size(xy, X, minimum=cell_m, folds=opts.folds, seed=opts.seed)
    return size, {k: v for k, v in info.items() if k != "models"} | {"method": info["method"]}


def _sources(
    settings: DownstreamStageSettings,
    inputs: StageInputs,
    maps: dict[str, Any],
    background: Background,
    out_dir: Path,
) -> dict[str, FeatureSource]:
    """Every feature source of the region that can be built (a missing map is skipped)."""
    from botaclip_core.sdm.covariates import Layer
    from botaclip_core.sdm.sources import CombinedSource, CovariateSource, StoreSource

    opts = settings.downstream
    names = opts.sources_for(bool(settings.covariates))
    base: dict[str, FeatureSource] = {}
    for part in dict.fromkeys(p for n in names for p in source_parts(n)):
        if part == "spectral":
            path = _spectral(inputs, Path(maps["dofa"]), settings.bands, out_dir)
            base[part] = StoreSource(path, background, opts)
        elif part == "covariates":
            if not settings.covariates:
                logger.warning("downstream: the region lists no covariates; skipped")
                continue
            files = inputs.files["covariates"]
            layers = [
                Layer(c.name, Path(fp["path"]), c.categorical, c.band)
                for c, fp in zip(settings.covariates, files, strict=True)
            ]
            base[part] = CovariateSource(
                layers, settings.grid.to_grid(), background, Path(maps["dofa"])
            )
        elif maps.get(part):
            base[part] = StoreSource(Path(maps[part]), background, opts)
    sources: dict[str, FeatureSource] = {}
    for name in names:
        parts = source_parts(name)
        if all(p in base for p in parts):
            sources[name] = (
                base[name] if len(parts) == 1 else CombinedSource([base[p] for p in parts])
            )
    return sources


def _test_sites(settings: DownstreamStageSettings, raster: RasterizeOutput, task: str) -> Any:
    """The task's independent test set (its sites table), or None."""
    name = settings.test_sets.get(task)
    if name is None:
        return None
    files = raster.sites(name)
    return files.kind, files.load(name)


def _evaluate_test(
    kind: str,
    X: np.ndarray,
    table: Any,
    ok: np.ndarray,
    test: tuple[str, Any],
    source: FeatureSource,
    opts: DownstreamSettings,
) -> dict[str, TargetScores]:
    """Models fitted on all the task's sites, scored on its independent test set."""
    from botaclip_core import downstream as ds_models

    test_kind, test_table = test
    xy = test_table.sites[["x", "y"]].to_numpy()
    r, c = test_table.sites["row"].to_numpy(), test_table.sites["col"].to_numpy()
    ok_test, X_test = source.at(r, c, xy)
    return ds_models.evaluate_test_set(
        ds_models.Sites(X, table.values[ok], list(table.species), kind),
        ds_models.Sites(X_test, test_table.values[ok_test], list(test_table.species), test_kind),
        source.landscape,
        opts,
    )


def _evaluate(
    kind: str,
    X: np.ndarray,
    table: Any,
    ok: np.ndarray,
    xy: np.ndarray,
    source: FeatureSource,
    background: Background,
    opts: DownstreamSettings,
    block: float,
    *,
    validation: str,
    models: list[str],
) -> dict[str, TargetScores]:
    """The kind's evaluation: presence/absence, presence-only against background, abundance."""
    from botaclip_core import downstream as ds_models

    values, species = table.values[ok], table.species
    common: dict[str, Any] = {"block_size": block, "validation": validation, "models": models}
    if kind == "presence_absence":
        return ds_models.evaluate_presence_absence(X, values, xy[ok], species, opts, **common)
    if kind == "presence_only":
        return ds_models.evaluate_presence_only(
            X, values, xy[ok], source.landscape, background.xy, species, opts, **common
        )
    return ds_models.evaluate_abundance(X, values, xy[ok], species, opts, **common)


def _interval(intervals: dict[str, Any], metric: str) -> tuple[float | None, float | None]:
    lo, hi = intervals.get(metric, (np.nan, np.nan))
    return _round(lo), _round(hi)


def _round(value: float) -> float | None:
    return None if value is None or np.isnan(value) else round(float(value), 4)


def _metric_rows(
    task: str, kind: str, source: str, model: str, validation: str, scores: TargetScores
) -> list[dict[str, Any]]:
    from botaclip_core import downstream as ds_models

    out = []
    for metric, value in scores.metrics.items():
        lo, hi = _interval(scores.intervals, metric)
        out.append(
            {
                "task": task,
                "kind": kind,
                "features": source,
                "model": model,
                "metric": metric,
                "value": _round(value),
                "ci_low": lo,
                "ci_high": hi,
                "n_targets": scores.n_targets,
                "validation": validation,
                "primary": metric == ds_models.PRIMARY_METRIC[kind],
            }
        )
    return out


def _species_rows(
    task: str, source: str, model: str, validation: str, scores: TargetScores
) -> list[dict[str, Any]]:
    out = []
    for species, metrics in scores.per_target.items():
        intervals = scores.per_target_intervals.get(species, {})
        for metric, value in metrics.items():
            lo, hi = _interval(intervals, metric)
            out.append(
                {
                    "task": task,
                    "features": source,
                    "model": model,
                    "validation": validation,
                    "species": species,
                    "metric": metric,
                    "value": _round(value),
                    "ci_low": lo,
                    "ci_high": hi,
                }
            )
    return out


def _comparisons(
    task: str,
    kind: str,
    scored: dict[tuple[str, str], TargetScores],
    opts: DownstreamSettings,
) -> list[dict[str, Any]]:
    """Every pair of feature sources, per model, on the task's primary metric across species."""
    from botaclip_core import downstream as ds_models
    from botaclip_core.sdm.bootstrap import paired_comparison

    metric = ds_models.PRIMARY_METRIC[kind]
    sources = list(dict.fromkeys(s for s, _ in scored))
    out = []
    for model in opts.models:
        for a, b in itertools.combinations(sources, 2):
            if (a, model) not in scored or (b, model) not in scored:
                continue
            values = [
                {sp: m.get(metric, np.nan) for sp, m in scored[(s, model)].per_target.items()}
                for s in (a, b)
            ]
            result = paired_comparison(
                values[0], values[1], n_resamples=max(opts.bootstrap, 1), seed=opts.seed
            )
            out.append(
                {"task": task, "model": model, "metric": metric, "source_a": a, "source_b": b}
                | {k: _round(v) if isinstance(v, float) else v for k, v in result.items()}
            )
    return out


def _prediction_map(
    task: str,
    kind: str,
    table: Any,
    xy: np.ndarray,
    sources: dict[str, FeatureSource],
    background: Background,
    opts: DownstreamSettings,
    out_dir: Path,
) -> str | None:
    """A COG of the task's mapped species from the model fitted on all its sites."""
    from botaclip_core.sdm.maps import predict_map
    from botaclip_core.sdm.models import fit_models, models_for, predict_models

    name = opts.map_features or ("botaclip" if "botaclip" in sources else "dofa")
    model = opts.mapping_model
    if model not in models_for(kind, [model]):  # type: ignore[arg-type]
        model = (models_for(kind, opts.models) or ["glm"])[0]  # type: ignore[arg-type]
    if name not in sources:
        logger.warning("downstream %s: no feature source %r to map from", task, name)
        return None
    source, mapping = sources[name], sources[name].map_inputs()
    if mapping is None:
        logger.warning("downstream %s: feature source %r cannot be mapped", task, name)
        return None
    r, c = table.sites["row"].to_numpy(), table.sites["col"].to_numpy()
    ok, X = source.at(r, c, xy)
    values = table.values[ok]
    prevalence = (values > 0).sum(axis=0)
    chosen = opts.maps or [table.species[j] for j in np.argsort(-prevalence, kind="stable")]
    predictors: dict[str, Any] = {}
    for species in chosen:
        if species not in table.species:
            logger.warning("downstream.maps: %r is not a species of %s; skipped", species, task)
            continue
        y = values[:, table.species.index(species)]
        if kind == "presence_only":
            Xs = np.vstack([X[y > 0], source.landscape])
            ys = np.r_[np.ones(int((y > 0).sum())), np.zeros(len(source.landscape))]
        elif kind == "presence_absence":
            Xs, ys = X, (y > 0).astype(int)
        else:
            Xs, ys = X, y
        if kind != "abundance" and (ys.min() == ys.max() or ys.sum() < opts.min_presences):
            continue
        fitted = fit_models(
            [model],
            kind,  # type: ignore[arg-type]
            Xs,
            ys,
            opts.model_params,
            seed=opts.seed,
        )

        def predictor(rows: np.ndarray, fitted: Any = fitted) -> np.ndarray:
            return predict_models(fitted, rows)[model]

        predictors[species] = predictor
        if not opts.maps and len(predictors) == N_MAPPED:
            break
    if not predictors:
        return None
    out = out_dir / f"{task}.tif"
    predict_map(
        mapping.store, predictors, out, transform=mapping.transform, extra=mapping.extra,
        tags={"task": task, "features": name, "model": model},
    )  # fmt: skip
    logger.info("downstream %s: map of %d species from %s/%s", task, len(predictors), name,
                model)  # fmt: skip
    return str(out)


def _background(dofa_zarr: Path, opts: DownstreamSettings, grid: RegionGrid) -> Background:
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
    return Background(rows, cols, np.column_stack([xs, ys]))


def report(output: DownstreamOutput) -> dict[str, Any]:
    """The metric rows, paired comparisons, block sizes, charts, maps and the markdown report."""
    return {
        "downstream": output.metrics,
        "comparisons": output.comparisons,
        "blocks": output.blocks,
        "charts": output.charts,
        "maps": output.maps,
        "downstream_report": output.report_md,
    }


def artifacts(region: str, output: DownstreamOutput, status: str) -> list[TableArtifact]:
    """The metrics table and the paired comparisons."""
    columns = (
        "task", "features", "model", "validation", "metric", "value", "ci_low", "ci_high",
        "n_targets",
    )  # fmt: skip
    tables = [
        TableArtifact(
            key=f"botaclip-metrics-{region}",
            rows=[{k: r.get(k) for k in columns} for r in output.metrics],
            description=f"Downstream metrics, region {region}: spatial block and random "
            "cross-validation, 95% bootstrap intervals",
        )
    ]
    if output.comparisons:
        tables.append(
            TableArtifact(
                key=f"botaclip-comparisons-{region}",
                rows=output.comparisons,
                description=f"Paired comparisons of feature sources across species, region "
                f"{region} (bootstrap interval of the mean difference, Wilcoxon p-value)",
            )
        )
    return tables


STAGE = Stage(
    name="downstream",
    version="3",  # 3: five models, intervals, random CV, spectral source, maps (issues 11, 12)
    needs=("tile", "rasterize", "embed"),
    settings_type=DownstreamStageSettings,
    settings=settings,
    build=build,
    output=DownstreamOutput,
    applies=applies,
    inputs=inputs,
    report=report,
    artifacts=artifacts,
    description="embeddings + sites → species models, metrics with intervals, comparisons, maps",
)
