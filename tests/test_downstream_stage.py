"""The downstream stage on the tiny demo with every model: rows, intervals, comparisons, maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import rioxarray  # noqa: F401  (registers .rio)
from sklearn.metrics import roc_auc_score

from botaclip_core.catalog import load_catalog
from botaclip_core.demo import write_demo_region
from botaclip_core.embedding_store import open_embeddings
from botaclip_core.pipeline import run_region
from botaclip_core.sdm.models import MODEL_NAMES
from botaclip_core.stages.rasterize import RasterizeOutput

# the demo's default sources are dofa, botaclip, botasp, spectral, covariates and
# botaclip+covariates; three of them keep this module's fits (every model) near a minute
SOURCES = ("botaclip", "covariates", "botaclip+covariates")
KINDS = {"plants": "presence_absence", "butterflies": "presence_only", "soil": "abundance"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The tiny demo with all five models (its catalog fits one), in-process."""
    tmp = tmp_path_factory.mktemp("downstream-stage")
    overrides = {
        "downstream": {
            "models": list(MODEL_NAMES),
            "random_cv_models": ["ensemble"],
            "feature_sources": list(SOURCES),
        }
    }
    catalog_path = write_demo_region(tmp, size="tiny", catalog_overrides=overrides)
    catalog = load_catalog(catalog_path)
    report = run_region(catalog, "demo", report_path=tmp / "report.json")
    return catalog, report


def test_every_task_source_model_with_intervals(run):
    _, report = run
    rows = report["downstream"]
    spatial = {(r["task"], r["features"], r["model"]) for r in rows if r["validation"] == "spatial"}
    expected = {
        (t, s, m)
        for t, kind in KINDS.items()
        for s in SOURCES
        for m in MODEL_NAMES
        if not (kind == "abundance" and m == "maxent")  # MaxEnt models no counts
    }
    assert spatial == expected
    # random CV beside the spatial scores, for the model the catalog names
    random = {(r["task"], r["features"], r["model"]) for r in rows if r["validation"] == "random"}
    assert random == {(t, s, "ensemble") for t in KINDS for s in SOURCES}
    metrics = {(r["task"], r["metric"]) for r in rows}
    assert {("plants", m) for m in ("auc", "tss", "kappa", "cor")} <= metrics
    assert {("butterflies", m) for m in ("auc", "boyce")} <= metrics
    assert {("soil", m) for m in ("spearman", "r2", "deviance_explained")} <= metrics
    for r in rows:
        if r["primary"] and r["value"] is not None:
            assert r["ci_low"] <= r["value"] <= r["ci_high"], r
            assert r["ci_low"] < r["ci_high"], r  # 200 resamples of 5+ species: a real spread


def test_paired_comparisons_of_every_pair_of_sources(run):
    _, report = run
    pairs = {(c["task"], c["model"], c["source_a"], c["source_b"]) for c in report["comparisons"]}
    for task, kind in KINDS.items():
        for model in MODEL_NAMES:
            if kind == "abundance" and model == "maxent":
                continue
            n = sum((task, model) == p[:2] for p in pairs)
            assert n == 3, (task, model)  # 3 sources: 3 pairs
    for c in report["comparisons"]:
        assert c["n_better"] + c["n_worse"] <= c["n_species"]
        assert c["ci_low"] <= c["mean_difference"] <= c["ci_high"]
        assert 0.0 <= c["p_value"] <= 1.0


def test_butterflies_scored_on_their_independent_transects(run):
    """The presence-only records' models, fitted on all records, scored on the transects."""
    _, report = run
    rows = [r for r in report["downstream"] if r["validation"] == "test"]
    assert {r["task"] for r in rows} == {"butterflies"}  # the only target with a test set
    assert {(r["features"], r["model"]) for r in rows} == {
        (s, m) for s in SOURCES for m in MODEL_NAMES
    }
    assert {r["metric"] for r in rows} == {"auc", "tss", "kappa", "cor"}  # presence/absence
    auc = {(r["features"], r["model"]): r for r in rows if r["metric"] == "auc"}
    for row in auc.values():
        assert row["n_targets"] == 15 and row["ci_low"] < row["value"] < row["ci_high"]
    # the transects follow suitability, which elevation drives: the DEM predicts them
    assert auc[("covariates", "glm")]["value"] > 0.65


def test_block_size_from_the_autocorrelation_range_at_least_one_cell(run):
    catalog, report = run
    cell_m = 224 * 0.5  # the tiny demo's maps: one cell per 224-px tile of 0.5 m
    for task in KINDS:
        info = report["blocks"][task]
        assert info["block_size_m"] >= cell_m
        assert info["range_m"] > 0 and "variogram" in info["method"]
        assert info["limited_by"] in ("range", "minimum", "folds")


def test_tables_charts_and_markdown(run):
    _, report = run
    out = Path(report["stages"]["downstream"]["output"])
    table = pd.read_parquet(out / "metrics.parquet")
    assert len(table) == len(report["downstream"])
    assert {"ci_low", "ci_high", "validation"} <= set(table.columns)
    assert len(pd.read_csv(out / "metrics.csv")) == len(table)
    species = pd.read_parquet(out / "per_species.parquet")
    assert set(species["task"]) == set(KINDS) and species["species"].nunique() > 10
    markdown = Path(report["downstream_report"]).read_text()
    for task in KINDS:
        assert task in markdown and Path(report["charts"][task]).stat().st_size > 1000


def test_prediction_maps_on_the_embedding_grid_separate_presences(run):
    catalog, report = run
    grid = open_embeddings(report["embeddings"]["botaclip"])
    workdir = Path(report["stages"]["rasterize"]["output"])
    raster = RasterizeOutput.model_validate(
        json.loads((workdir / "_SUCCESS.json").read_text())["outputs"]
    )
    assert set(report["maps"]) == set(KINDS)
    for task, path in report["maps"].items():
        table = raster.sites(task).load(task)
        with rasterio.open(path) as src:
            assert src.crs.to_string() == catalog.regions["demo"].crs
            assert src.transform.almost_equals(grid.rio.transform())
            assert (src.width, src.height) == (grid.sizes["x"], grid.sizes["y"])
            assert src.count == 5 and src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
            assert (src.tags()["features"], src.tags()["model"]) == ("botaclip", "ensemble")
            names = list(src.descriptions)
            prevalence = (table.values > 0).sum(axis=0)
            top = [table.species[j] for j in np.argsort(-prevalence, kind="stable")[:5]]
            assert names == top  # the five most prevalent, in that order
            # each site's cell, from the map's own transform
            rows, cols = rasterio.transform.rowcol(
                src.transform, table.sites["x"].to_numpy(), table.sites["y"].to_numpy()
            )
            bands = src.read()
        values = bands[:, np.asarray(rows), np.asarray(cols)]
        if KINDS[task] == "presence_absence":
            aucs = []
            for k, name in enumerate(names):
                y = table.values[:, table.species.index(name)] > 0
                ok = ~np.isnan(values[k])
                aucs.append(roc_auc_score(y[ok], values[k][ok]))
            # fitted on all of these sites, the map separates them, though the tiny demo's map
            # has 2 × 2 cells, so sites share 4 values (measured 0.55–0.63, mean 0.59)
            assert min(aucs) > 0.5 and np.mean(aucs) > 0.55, dict(zip(names, aucs, strict=True))
        assert np.isfinite(values).mean() > 0.9
