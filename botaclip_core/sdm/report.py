"""Outputs of the downstream evaluation: metric tables, one chart per task, a markdown report."""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

logger = logging.getLogger(__name__)

#: Columns of the metrics table: one row per task × source × model × metric × validation.
METRIC_COLUMNS = [
    "task",
    "kind",
    "features",
    "model",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "n_targets",
    "validation",
    "primary",
]
#: Columns of the per-species table.
PER_SPECIES_COLUMNS = [
    "task",
    "features",
    "model",
    "validation",
    "species",
    "metric",
    "value",
    "ci_low",
    "ci_high",
]
#: Validations in the order the report shows them (others follow, by name).
VALIDATION_ORDER = ("spatial", "random", "test")


def _frame(rows: Sequence[Mapping[str, Any]], columns: list[str]) -> pd.DataFrame:
    missing = sorted({c for row in rows for c in columns if c not in row})
    if missing:
        raise ValueError(f"rows lack the columns {missing}; each row needs {columns}")
    frame = pd.DataFrame([{c: row[c] for c in columns} for row in rows], columns=columns)
    for column in ("value", "ci_low", "ci_high"):
        frame[column] = frame[column].astype(float)
    if "n_targets" in frame:
        frame["n_targets"] = frame["n_targets"].astype("int64")
    if "primary" in frame:
        frame["primary"] = frame["primary"].astype(bool)
    return frame


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` to a temporary file beside ``path``, then move it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _to_parquet(frame: pd.DataFrame, path: Path) -> None:
    frame.to_parquet(path, index=False)


def _to_csv(frame: pd.DataFrame, path: Path) -> None:
    frame.to_csv(path, index=False)


def write_tables(
    rows: list[dict[str, Any]], per_species: list[dict[str, Any]], out_dir: Path
) -> dict[str, str]:
    """Write the metrics and per-species tables as Parquet and CSV, each file atomically.

    Args:
        rows: metric rows with the keys of :data:`METRIC_COLUMNS` (others are ignored).
        per_species: rows with the keys of :data:`PER_SPECIES_COLUMNS`.
        out_dir: folder of the tables (created if missing).

    Returns:
        ``metrics_parquet``, ``metrics_csv``, ``per_species_parquet``, ``per_species_csv`` →
        path of each file.

    Raises:
        ValueError: when a row lacks a column.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {
        "metrics": _frame(rows, METRIC_COLUMNS),
        "per_species": _frame(per_species, PER_SPECIES_COLUMNS),
    }
    written: dict[str, str] = {}
    for name, frame in tables.items():
        parquet, csv = out_dir / f"{name}.parquet", out_dir / f"{name}.csv"
        _atomic_write(parquet, partial(_to_parquet, frame))
        _atomic_write(csv, partial(_to_csv, frame))
        written[f"{name}_parquet"], written[f"{name}_csv"] = str(parquet), str(csv)
    logger.info(
        "wrote %d metric rows and %d per-species rows to %s", len(rows), len(per_species), out_dir
    )
    return written


def _ordered(values: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def task_chart(
    rows: Sequence[Mapping[str, Any]], task: str, path: Path, *, validation: str = "spatial"
) -> Path:
    """PNG of a task's primary metric by feature source, one bar per model, with its interval.

    Args:
        rows: metric rows (:data:`METRIC_COLUMNS`); the task's primary rows of ``validation``
            are drawn.
        task: the task drawn.
        path: the PNG written (atomically).
        validation: ``spatial``, ``random`` or ``test``.

    Returns:
        ``path``.

    Raises:
        ValueError: when the task has no primary metric rows for ``validation``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    chosen = [
        r
        for r in rows
        if r["task"] == task and r["validation"] == validation and bool(r["primary"])
    ]
    if not chosen:
        have = sorted({(str(r["task"]), str(r["validation"])) for r in rows if r["primary"]})
        raise ValueError(
            f"no primary metric rows for task {task!r} with validation {validation!r}; "
            f"rows have (task, validation): {have}"
        )
    metric = ", ".join(_ordered([str(r["metric"]) for r in chosen]))
    sources = _ordered([str(r["features"]) for r in chosen])
    models = _ordered([str(r["model"]) for r in chosen])
    by_key = {(str(r["features"]), str(r["model"])): r for r in chosen}
    figure = Figure(figsize=(min(16.0, max(5.0, 1.5 + 0.5 * len(sources) * len(models))), 3.8))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    width = 0.8 / len(models)
    for k, model in enumerate(models):
        xs, values, below, above = [], [], [], []
        for i, source in enumerate(sources):
            row = by_key.get((source, model))
            if row is None or not _finite(row["value"]):
                continue
            value = float(row["value"])
            xs.append(i - 0.4 + width * (k + 0.5))
            values.append(value)
            low, high = _float(row.get("ci_low")), _float(row.get("ci_high"))
            # an interval that misses the value (possible for a mean) draws no bar past it
            below.append(max(0.0, value - low) if math.isfinite(low) else 0.0)
            above.append(max(0.0, high - value) if math.isfinite(high) else 0.0)
        ax.bar(xs, values, width=width * 0.9, label=model, yerr=[below, above], capsize=3)
    ax.set_xticks(range(len(sources)), sources)
    ax.set_xlabel("feature source")
    ax.set_ylabel(metric)
    ax.set_title(f"{task}: {metric} ({validation} validation, 95% intervals)")
    ax.legend(title="model", fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda p: figure.savefig(p, format="png", dpi=120))
    return path


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _finite(value: Any) -> bool:
    return math.isfinite(_float(value))


def _number(value: Any, digits: int = 3) -> str:
    return f"{float(value):.{digits}f}" if _finite(value) else "–"


def _with_interval(value: Any, low: Any, high: Any) -> str:
    if not _finite(value):
        return "–"
    if not (_finite(low) and _finite(high)):
        return _number(value)
    return f"{_number(value)} [{_number(low)}, {_number(high)}]"


def _p_value(p: Any) -> str:
    if not _finite(p):
        return "–"
    return "<0.0001" if float(p) < 1e-4 else f"{float(p):.4f}"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|")


def _table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in body]
    return lines


def _validations(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    present = _ordered([str(r["validation"]) for r in rows])
    known = [v for v in VALIDATION_ORDER if v in present]
    return known + sorted(v for v in present if v not in known)


def _blocks_lines(blocks: Mapping[str, Any]) -> list[str]:
    def one(info: Mapping[str, Any]) -> str:
        size = f"{_number(info.get('block_size_m'), 0)} m"
        if _finite(info.get("range_m")):
            ranges = ", ".join(_number(r, 0) for r in info.get("ranges_m", []))
            text = (
                f"{size}, from an autocorrelation range of {_number(info['range_m'], 0)} m "
                f"({info.get('method', 'autocorrelation range')}"
                + (f": {ranges} m" if ranges else "")
                + ")"
            )
            limited = info.get("limited_by")
            if limited == "minimum":
                text += f"; raised to the minimum of {_number(info.get('minimum_m'), 0)} m"
            elif limited == "folds":
                text += "; reduced so that every fold gets at least two blocks"
        else:
            text = f"{size} ({info.get('source', 'configured')})"
        if "n_blocks" in info:
            text += f"; {info['n_blocks']} blocks"
        return text

    if "block_size_m" in blocks:
        return [f"Spatial blocks: {one(blocks)}."]
    return [f"- {task}: {one(info)}" for task, info in blocks.items()]


def markdown_report(
    region: str,
    rows: Sequence[Mapping[str, Any]],
    comparisons: Sequence[Mapping[str, Any]],
    charts: Mapping[str, str],
    maps: Mapping[str, str],
    blocks: Mapping[str, Any],
) -> str:
    """The downstream report of a region in markdown.

    Args:
        region: region name (the title).
        rows: metric rows (:data:`METRIC_COLUMNS`); each task's primary metric is tabulated,
            one column per validation.
        comparisons: paired comparisons, each with ``task``, ``model``, ``source_a``,
            ``source_b`` and the keys of :func:`botaclip_core.sdm.bootstrap.paired_comparison`.
        charts: task → chart file name, relative to the report.
        maps: task → prediction map (COG) path.
        blocks: the block size information of :func:`botaclip_core.sdm.blocks.block_size`
            (``block_size_m``, ``range_m``, ...), or task → such information; without
            ``range_m`` the size is reported as configured.

    Returns:
        The report text.
    """
    lines = [f"# Downstream evaluation: {region}", "", "## Validation", ""]
    lines += _blocks_lines(blocks)
    lines += [
        "",
        "Scores are held out: `spatial` by blocked cross-validation, `random` by random "
        "cross-validation, `test` on an independent test set. Intervals are 95% percentile "
        "bootstrap intervals over species.",
    ]
    for task in _ordered([str(r["task"]) for r in rows]):
        primary = [r for r in rows if r["task"] == task and bool(r["primary"])]
        kind = str(primary[0]["kind"]) if primary else ""
        metric = ", ".join(_ordered([str(r["metric"]) for r in primary]))
        lines += ["", f"## {task}", "", f"Kind: {kind}. Primary metric: {metric}.", ""]
        validations = _validations(primary)
        cells: dict[tuple[str, str], dict[str, Mapping[str, Any]]] = {}
        for r in primary:
            cells.setdefault((str(r["features"]), str(r["model"])), {})[str(r["validation"])] = r
        body = []
        for (source, model), by_validation in cells.items():
            n = max(int(r["n_targets"]) for r in by_validation.values())
            body.append(
                [source, model]
                + [
                    _with_interval(v["value"], v["ci_low"], v["ci_high"])
                    if (v := by_validation.get(name))
                    else "–"
                    for name in validations
                ]
                + [n]
            )
        lines += _table(["features", "model", *validations, "n targets"], body)
        if task in charts:
            lines += ["", f"![{task}: {metric} by feature source]({charts[task]})"]
    lines += ["", "## Paired comparisons", ""]
    if comparisons:
        header = ["task", "model", "source_a", "source_b", "n_species"]
        header += ["mean_difference [95% CI]", "p_value", "n_better", "n_worse"]
        body = [
            [
                c["task"],
                c["model"],
                c["source_a"],
                c["source_b"],
                c["n_species"],
                _with_interval(c["mean_difference"], c["ci_low"], c["ci_high"]),
                _p_value(c["p_value"]),
                c["n_better"],
                c["n_worse"],
            ]
            for c in comparisons
        ]
        lines += [
            "Source A minus source B over the species both scored; p: two-sided Wilcoxon "
            "signed-rank test.",
            "",
        ]
        lines += _table(header, body)
    else:
        lines += ["No pairs of feature sources to compare."]
    lines += ["", "## Prediction maps", ""]
    lines += [f"- {task}: `{path}`" for task, path in maps.items()] or ["No maps."]
    return "\n".join(lines) + "\n"
