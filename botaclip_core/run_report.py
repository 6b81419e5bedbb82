"""The run report as Markdown (the Prefect UI's report artifact) and one-line stage facts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# outputs worth a log line: counts, scores and file names, not nested structures
_FACT_TYPES = (str, int, float, bool)


def stage_facts(outputs: dict[str, Any], *, limit: int = 8) -> str:
    """The scalar fields of a stage's output record, ``name=value`` joined by commas.

    Args:
        outputs: the ``outputs`` of a stage manifest (its output record, JSON form).
        limit: at most this many fields, in the record's order.

    Returns:
        e.g. ``zarr=/w/tile/1f.../image.zarr, blocks=4, blocks_run=4``.
    """
    facts = []
    for name, value in outputs.items():
        if isinstance(value, _FACT_TYPES) and value is not None:
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            facts.append(f"{name}={shown}")
        if len(facts) == limit:
            break
    return ", ".join(facts)


def _cell(value: Any) -> str:
    """A Markdown table cell: pipes escaped, floats shortened."""
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def run_report_markdown(report: dict[str, Any], *, title: str | None = None) -> str:
    """Markdown of a run report (what :func:`botaclip_core.pipeline.finish` returns).

    Sections: the stages (status, seconds, key, output folder), the embedding maps and their
    previews, the model card and training curve, the figures other report parts name (see
    :func:`_figures`), and the downstream metrics (primary metrics of each task and source).

    Args:
        report: the run report.
        title: the heading; default ``botaclip run: region <region>``.

    Returns:
        The Markdown text.
    """
    region = report.get("region", "?")
    stages: dict[str, dict[str, Any]] = report.get("stages", {})
    counts: dict[str, int] = {}
    for s in stages.values():
        counts[s["status"]] = counts.get(s["status"], 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    lines = [f"# {title or f'botaclip run: region {region}'}", ""]
    lines.append(f"{len(stages)} stages ({summary}) in {report.get('seconds', 0.0):.1f} s.")
    if report.get("report_path"):
        lines.append(f"Report: `{report['report_path']}`")
    lines += ["", "## Stages", ""]
    lines += _table(
        ["stage", "status", "seconds", "key", "output"],
        [
            [name, s["status"], f"{s['seconds']:.1f}", s.get("key", ""), f"`{s['output']}`"]
            for name, s in stages.items()
        ],
    )
    embeddings: dict[str, str] = report.get("embeddings") or {}
    if embeddings:
        previews: dict[str, str] = report.get("previews") or {}
        lines += ["", "## Embedding maps", ""]
        lines += _table(
            ["map", "store", "preview"],
            [
                [name, f"`{path}`", f"`{previews[name]}`" if name in previews else "none"]
                for name, path in embeddings.items()
            ],
        )
    model = _model_files(report)
    if model:
        lines += ["", "## Model", ""]
        lines += [f"- {name}: `{path}`" for name, path in model.items()]
    charts = _figures(report)
    if charts:
        lines += ["", "## Charts", ""]
        lines += [f"- {name}: `{path}`" for name, path in charts.items()]
    metrics = [r for r in report.get("downstream") or [] if r.get("primary", True)]
    if metrics:
        lines += ["", "## Downstream metrics (spatially blocked cross-validation)", ""]
        lines += _table(
            ["task", "features", "model", "metric", "value", "targets"],
            [
                [r["task"], r["features"], r["model"], r["metric"], r["value"], r["n_targets"]]
                for r in metrics
            ],
        )
    return "\n".join(lines) + "\n"


_FIGURE_SUFFIXES = (".png", ".svg", ".html", ".pdf")
# report parts shown in their own sections
_SHOWN = {"region", "stages", "embeddings", "previews", "model_card", "downstream", "report_path"}


def _figures(report: dict[str, Any]) -> dict[str, str]:
    """Figures other parts of the report name: ``charts`` and any other mapping of figure files.

    A stage adds charts to the report by returning e.g. ``{"charts": {"plants AUC": path}}``
    (or any key whose values are ``.png``/``.svg``/``.html``/``.pdf`` paths) from its ``report``.
    """
    figures: dict[str, str] = {}
    for part, value in report.items():
        if part in _SHOWN or not isinstance(value, dict):
            continue
        for name, path in value.items():
            if isinstance(path, str) and path.lower().endswith(_FIGURE_SUFFIXES):
                figures[name if part == "charts" else f"{part}: {name}"] = path
    return figures


def _model_files(report: dict[str, Any]) -> dict[str, str]:
    """The model card and, beside it, the training curve (when the run trained a model)."""
    card = report.get("model_card")
    if not card:
        return {}
    files = {"model card": str(card)}
    curve = Path(card).with_name("training_curve.png")
    if curve.is_file():
        files["training curve"] = str(curve)
    return files
