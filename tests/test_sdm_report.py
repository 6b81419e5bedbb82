"""The downstream tables, charts and markdown report."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from botaclip_core.sdm.report import (
    METRIC_COLUMNS,
    PER_SPECIES_COLUMNS,
    markdown_report,
    task_chart,
    write_tables,
)

TASKS = {"plants_pa": ("presence_absence", "auc"), "soil_abundance": ("abundance", "spearman")}
SOURCES = ("dofa", "botaclip", "spectral")
MODELS = ("glm", "ensemble")


def _rows() -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for (task, (kind, primary)), source, model, validation in itertools.product(
        TASKS.items(), SOURCES, MODELS, ("spatial", "random")
    ):
        for metric in (primary, "r2" if kind == "abundance" else "tss"):
            value = float(rng.uniform(0.4, 0.9))
            rows.append(
                {
                    "task": task,
                    "kind": kind,
                    "features": source,
                    "model": model,
                    "metric": metric,
                    "value": value,
                    "ci_low": value - 0.05,
                    "ci_high": value + 0.04,
                    "n_targets": 12,
                    "validation": validation,
                    "primary": metric == primary,
                }
            )
    rows[0]["ci_low"] = rows[0]["ci_high"] = float("nan")  # a task with too few species
    return rows


def _per_species() -> list[dict]:
    return [
        {
            "task": "plants_pa",
            "features": source,
            "model": "glm",
            "validation": "spatial",
            "species": species,
            "metric": "auc",
            "value": 0.7 + 0.01 * k,
            "ci_low": 0.6,
            "ci_high": 0.8 + 0.01 * k,
        }
        for k, (source, species) in enumerate(
            itertools.product(SOURCES, ["Abies alba", "Fagus sylvatica"])
        )
    ]


def _comparisons() -> list[dict]:
    return [
        {
            "task": "plants_pa",
            "model": "ensemble",
            "source_a": "botaclip",
            "source_b": "dofa",
            "n_species": 12,
            "mean_difference": 0.031,
            "ci_low": 0.012,
            "ci_high": 0.05,
            "p_value": 0.0034,
            "n_better": 10,
            "n_worse": 2,
        },
        {
            "task": "soil_abundance",
            "model": "glm",
            "source_a": "spectral",
            "source_b": "botaclip",
            "n_species": 5,
            "mean_difference": -0.2,
            "ci_low": -0.31,
            "ci_high": -0.09,
            "p_value": 0.0625,
            "n_better": 0,
            "n_worse": 5,
        },
    ]


BLOCKS = {
    "block_size_m": 850.0,
    "range_m": 850.0,
    "ranges_m": [700.0, 850.0, 910.0],
    "method": "median range of spherical variograms of the first k components",
    "minimum_m": 10.0,
    "n_blocks": 23,
    "limited_by": "range",
}


def test_tables_are_written_and_read_back(tmp_path: Path):
    rows, per_species = _rows(), _per_species()
    paths = write_tables(rows, per_species, tmp_path / "tables")
    assert set(paths) == {
        "metrics_parquet",
        "metrics_csv",
        "per_species_parquet",
        "per_species_csv",
    }
    expected = pd.DataFrame(rows)[METRIC_COLUMNS]
    pd.testing.assert_frame_equal(pd.read_parquet(paths["metrics_parquet"]), expected)
    pd.testing.assert_frame_equal(pd.read_csv(paths["metrics_csv"]), expected)
    expected = pd.DataFrame(per_species)[PER_SPECIES_COLUMNS]
    pd.testing.assert_frame_equal(pd.read_parquet(paths["per_species_parquet"]), expected)
    pd.testing.assert_frame_equal(pd.read_csv(paths["per_species_csv"]), expected)
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == [
        "metrics.csv",
        "metrics.parquet",
        "per_species.csv",
        "per_species.parquet",
    ]  # no temporary files left


def test_tables_replace_old_files_and_keep_them_on_failure(tmp_path: Path):
    write_tables(_rows(), _per_species(), tmp_path)
    write_tables(_rows()[:3], [], tmp_path)
    assert len(pd.read_parquet(tmp_path / "metrics.parquet")) == 3
    assert len(pd.read_csv(tmp_path / "per_species.csv")) == 0
    bad = _rows()[:2]
    del bad[1]["ci_low"]
    with pytest.raises(ValueError, match="ci_low"):
        write_tables(bad, [], tmp_path)
    assert len(pd.read_parquet(tmp_path / "metrics.parquet")) == 3


@pytest.mark.parametrize("validation", ["spatial", "random"])
def test_task_chart_is_a_png(tmp_path: Path, validation: str):
    path = task_chart(
        _rows(), "plants_pa", tmp_path / "charts" / "plants_pa.png", validation=validation
    )
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    assert [p.name for p in path.parent.iterdir()] == ["plants_pa.png"]


def test_task_chart_without_rows_names_what_exists(tmp_path: Path):
    with pytest.raises(ValueError, match="plants_pa"):
        task_chart(_rows(), "birds", tmp_path / "x.png")


def test_markdown_report_holds_tasks_comparisons_blocks_and_maps():
    rows = _rows()
    charts = {task: f"{task}.png" for task in TASKS}
    maps = {"plants_pa": "maps/plants_pa.tif"}
    text = markdown_report("alps", rows, _comparisons(), charts, maps, BLOCKS)
    assert text.startswith("# Downstream evaluation: alps")
    for task, (_, metric) in TASKS.items():
        assert f"## {task}" in text
        assert f"Primary metric: {metric}." in text
        assert f"({task}.png)" in text
    # every source × model has its primary score with interval, spatial beside random
    assert "| features | model | spatial | random | n targets |" in text
    for r in rows:
        if r["primary"] and math.isfinite(r["ci_low"]):
            assert f"{r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]" in text
    assert f"| {rows[0]['value']:.3f} |" in text  # no interval: the value alone
    assert "tss" not in text.split("## Paired")[0].split("## plants_pa")[1].split("|")[0]
    assert (
        "| plants_pa | ensemble | botaclip | dofa | 12 | 0.031 [0.012, 0.050] | 0.0034 | 10 | 2 |"
        in text
    )
    assert (
        "| soil_abundance | glm | spectral | botaclip | 5 | -0.200 [-0.310, -0.090] | 0.0625 | 0 | 5 |"
        in text
    )
    assert "850 m, from an autocorrelation range of 850 m" in text
    assert "700, 850, 910 m" in text
    assert "- plants_pa: `maps/plants_pa.tif`" in text


def test_markdown_report_with_configured_or_per_task_blocks():
    text = markdown_report("r", _rows(), [], {}, {}, {"block_size_m": 2000.0})
    assert "Spatial blocks: 2000 m (configured)." in text
    assert "No pairs of feature sources to compare." in text and "No maps." in text
    per_task = {
        "plants_pa": dict(BLOCKS, block_size_m=400.0, limited_by="minimum", minimum_m=400.0)
    }
    text = markdown_report("r", _rows(), [], {}, {}, per_task)
    assert "- plants_pa: 400 m, from an autocorrelation range of 850 m" in text
    assert "raised to the minimum of 400 m" in text
