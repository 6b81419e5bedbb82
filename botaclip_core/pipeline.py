"""The one runner: plan a region's stages (keys), run them in dependency order, report.

:func:`run_region` runs the plan in this process; the Prefect flow maps the same plan onto one
task per stage (``flows/pipeline.py``). Both use :func:`plan_region`, :func:`execute` and
:func:`finish`, so they build the same stages under the same keys and write the same report.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from botaclip_core.catalog import Catalog, dump_catalog
from botaclip_core.errors import CatalogError
from botaclip_core.stages import registry
from botaclip_core.stages.base import StageInputs, TableArtifact
from botaclip_core.stages.context import PlanContext
from botaclip_core.store import (
    ArtifactStore,
    StageResult,
    atomic_write_json,
    atomic_write_text,
    stage_key,
)

logger = logging.getLogger(__name__)

H = TypeVar("H")


@dataclass(frozen=True)
class StagePlan:
    """One stage as planned: its keys and exactly what its build will receive.

    Attributes:
        name: the stage.
        version: its version when planned.
        key: the store key (hashes the settings, the input fingerprints and upstream content keys).
        content_key: the key without storage-only settings (what downstream stages hash).
        needs: the upstream stages that apply to the region.
        settings: the stage's settings, JSON form (runtime fields included).
        files: the input fingerprints.
    """

    name: str
    version: str
    key: str
    content_key: str
    needs: tuple[str, ...]
    settings: dict[str, Any]
    files: dict[str, Any]

    def key_inputs(self, content_keys: dict[str, str]) -> dict[str, Any]:
        """What the key hashes besides the settings: files and upstream content keys."""
        return {**self.files, **{n: content_keys[n] for n in self.needs}}


@dataclass
class RegionPlan:
    """The stages to run for one region, in dependency order, and where their outputs go."""

    region: str
    workdir: str
    catalog_path: str
    catalog_yaml: str
    stages: dict[str, StagePlan] = field(default_factory=dict)

    @property
    def store(self) -> ArtifactStore:
        """The artifact store."""
        return ArtifactStore(self.workdir)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what Prefect tasks receive)."""
        return {
            "region": self.region,
            "workdir": self.workdir,
            "catalog_path": self.catalog_path,
            "catalog_yaml": self.catalog_yaml,
            "stages": {
                name: {
                    "version": p.version,
                    "key": p.key,
                    "content_key": p.content_key,
                    "needs": list(p.needs),
                    "settings": p.settings,
                    "files": p.files,
                }
                for name, p in self.stages.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RegionPlan:
        """Inverse of :meth:`to_dict`."""
        stages = {
            name: StagePlan(
                name,
                p["version"],
                p["key"],
                p["content_key"],
                tuple(p["needs"]),
                p["settings"],
                p["files"],
            )
            for name, p in data["stages"].items()
        }
        return cls(
            data["region"], data["workdir"], data["catalog_path"], data["catalog_yaml"], stages
        )


def resolve_stages(ctx: PlanContext, requested: Sequence[str] | None) -> list[str]:
    """The requested stages (default: all that apply) plus what they need, in DAG order.

    Needed stages that do not apply to the region are skipped (``embed`` without relevés has no
    fine-tuned model to apply).

    Raises:
        CatalogError: for an unknown stage, or a requested one that does not apply to the region.
    """
    reasons = {s.name: s.applies(ctx) for s in registry.stages()}
    if requested:
        wanted = [registry.get(name).name for name in requested]
        for name in wanted:
            if reasons[name]:
                raise CatalogError(f"stage {name!r} {reasons[name]}")
    else:
        wanted = [name for name, why in reasons.items() if not why]
    closed: set[str] = set()

    def visit(name: str) -> None:
        if name in closed or reasons[name]:
            return
        closed.add(name)
        for need in registry.get(name).needs:
            visit(need)

    for name in wanted:
        visit(name)
    return [name for name in registry.names() if name in closed]


def plan_region(
    catalog: Catalog,
    region: str,
    stages: Sequence[str] | None = None,
    *,
    catalog_path: str | Path = "",
) -> RegionPlan:
    """Plan the requested stages of a region and everything they need.

    Cheap: settings, raster headers and file fingerprints (a file whose size and mtime did not
    change since the last run is not hashed again).

    Raises:
        CatalogError: for unknown or inapplicable stages, globs that match nothing, bad values.
        InputDataError: for orthophotos that are unreadable, truncated, of mixed data types,
            with other bands than the catalog's, or outside the region.
        CRSMismatchError: for an orthophoto without CRS.
        StorageError: if the workdir is a file or not writable.
    """
    ctx = PlanContext(catalog, region)
    ctx.store.check_writable()
    names = resolve_stages(ctx, stages)
    _check_inputs(ctx)
    plan = RegionPlan(region, str(catalog.workdir_path), str(catalog_path), dump_catalog(catalog))
    content_keys: dict[str, str] = {}
    for name in names:
        stage = registry.get(name)
        settings = stage.settings(ctx)
        files = stage.inputs(ctx)
        needs = tuple(n for n in stage.needs if n in content_keys)
        draft = StagePlan(
            name, stage.version, "", "", needs, settings.model_dump(mode="json"), files
        )
        upstream = draft.key_inputs(content_keys)
        key = stage_key(name, stage.version, settings.key_dict(), upstream)
        content = stage_key(name, stage.version, settings.key_dict(content=True), upstream)
        content_keys[name] = content
        plan.stages[name] = StagePlan(
            name, stage.version, key, content, needs, draft.settings, files
        )
    ctx.save_fingerprints()
    return plan


def _check_inputs(ctx: PlanContext) -> None:
    """Errors in the orthophotos that a stage would hit mid-run, found before any stage runs."""
    from botaclip_core.tiling import check_orthophotos

    ortho = ctx.region.orthophotos
    check_orthophotos(ctx.orthophoto_files, ctx.grid, list(ortho.bands), ortho.nodata)


def run_stage(plan: RegionPlan, name: str) -> StageResult:
    """Run one planned stage unless its output is complete (its upstream stages must be).

    The build receives the planned settings, the input fingerprints and the upstream output
    records, never the catalog; the manifest records the same settings and inputs.
    """
    stage, planned, store = registry.get(name), plan.stages[name], plan.store
    upstream = {
        need: registry.get(need).load_output(store.manifest(need, plan.stages[need].key)["outputs"])
        for need in planned.needs
    }
    inputs = StageInputs(
        files=planned.files,
        upstream=upstream,
        keys={need: plan.stages[need].key for need in planned.needs},
    )
    settings = stage.load_settings(planned.settings)
    content_keys = {n: plan.stages[n].content_key for n in planned.needs}

    def build(out_dir: Path) -> dict[str, Any]:
        return stage.build(settings, inputs, out_dir).model_dump(mode="json")

    return store.run(
        name,
        stage.version,
        planned.settings,
        planned.key_inputs(content_keys),
        build,
        key=planned.key,
    )


def execute(
    plan: RegionPlan,
    submit: Callable[[str, list[H]], H],
    result: Callable[[str, H], StageResult],
) -> dict[str, StageResult]:
    """Submit every planned stage after its upstream ones, then collect the results in order.

    Args:
        plan: the region's plan.
        submit: ``(stage, upstream handles) -> handle``: runs the stage, or schedules it to run
            once the upstream handles are done (a Prefect future).
        result: ``(stage, handle) -> StageResult``: waits for a handle (raising its error).

    Returns:
        Stage name → result, in DAG order.
    """
    handles: dict[str, H] = {}
    for name, planned in plan.stages.items():
        handles[name] = submit(name, [handles[n] for n in planned.needs])
    return {name: result(name, handle) for name, handle in handles.items()}


def build_report(region: str, results: dict[str, StageResult]) -> dict[str, Any]:
    """The run report: stage statuses and timings, embedding paths, downstream metrics."""
    report: dict[str, Any] = {"region": region, "stages": {}, "embeddings": {}, "downstream": []}
    for name, res in results.items():
        report["stages"][name] = {
            "status": res.status,
            "seconds": round(res.seconds, 2),
            "output": str(res.path),
            "key": res.key,
        }
        stage = registry.get(name)
        for part, value in stage.report(stage.load_output(res.outputs)).items():
            if isinstance(value, dict):
                report.setdefault(part, {}).update(value)
            else:
                report[part] = value
    return report


def stage_artifacts(region: str, results: dict[str, StageResult]) -> list[TableArtifact]:
    """The tables the stages publish beside the run (Prefect artifacts), keys made valid."""
    tables = []
    for name, res in results.items():
        stage = registry.get(name)
        for table in stage.artifacts(region, stage.load_output(res.outputs), res.status):
            tables.append(
                TableArtifact(table.key.lower().replace("_", "-"), table.rows, table.description)
            )
    return tables


def default_report_path(workdir: str | Path, region: str) -> Path:
    """``<workdir>/reports/<region>.json``."""
    return Path(workdir) / "reports" / f"{region}.json"


def finish(
    plan: RegionPlan,
    results: dict[str, StageResult],
    *,
    started: float,
    report_path: Path | None = None,
) -> dict[str, Any]:
    """Build the report, write it and the resolved catalog beside it; return the report.

    The report goes to ``report_path`` (default :func:`default_report_path`), its folder created
    if needed; the catalog as run goes beside it as ``<region>.catalog.yaml``.
    """
    report = build_report(plan.region, results)
    report["seconds"] = round(time.perf_counter() - started, 2)
    path = Path(report_path or default_report_path(plan.workdir, plan.region)).resolve()
    report["report_path"] = str(path)
    atomic_write_json(path, report)
    atomic_write_text(path.with_name(f"{plan.region}.catalog.yaml"), plan.catalog_yaml)
    logger.info("report written to %s", path)
    return report


def run_region(
    catalog: Catalog,
    region: str,
    *,
    stages: Sequence[str] | None = None,
    catalog_path: str | Path = "",
    report_path: Path | None = None,
) -> dict[str, Any]:
    """Run the pipeline for one region in this process (no Prefect) and return the report."""
    started = time.perf_counter()
    plan = plan_region(catalog, region, stages, catalog_path=catalog_path)
    results = execute(plan, lambda name, _after: run_stage(plan, name), lambda _n, res: res)
    return finish(plan, results, started=started, report_path=report_path)


def load_report(path: Path) -> dict[str, Any]:
    """Read a report written by :func:`finish`."""
    return json.loads(Path(path).read_text())
