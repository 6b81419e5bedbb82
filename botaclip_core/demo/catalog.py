"""The data catalog of the demo region: its mapping and its commented YAML text."""

from __future__ import annotations

from typing import Any

import yaml

from botaclip_core.demo.region import (
    BANDS,
    CRS_CODE,
    ORIGIN,
    RESOLUTION,
    WAVELENGTHS_UM,
    DemoSize,
)

_CATALOG_HEADER = """\
# Data catalog of the BotaCLIP demo region, written by `botaclip demo`
# ({size} size, seed {seed}). Every path is relative to this file.
#
# regions     the areas to embed. `demo` is a {extent_m:g} m square of synthetic Alpine
#             orthophotos (R, G, B, NIR at 0.5 m, EPSG:2154). `bands` name the bands and
#             `wavelengths_um` give each band's centre wavelength to DOFA. `releves` names the
#             dataset that trains the contrastive model; `targets` those evaluated downstream.
# datasets    vector data, one row per site × species (long format). `kind` says how to use
#             them: releves (plot species lists with cover), presence_absence (surveys),
#             presence_only (occurrence records; background points are drawn), abundance
#             (counts). `site_id`, `species` and `value` name the columns; CSV files also need
#             `crs` and the coordinate columns `x` and `y`.
# model       the DOFA backbone; weights: null starts from random weights (put the path of
#             DOFA_ViT_base_e100.pth here for real use).
# finetune    contrastive training of image chips against relevés.
# downstream  per-species models on the embeddings (spatial cross-validation).
"""

_CATALOG_COMMENTS: dict[tuple[str, ...], str] = {
    ("workdir",): "artifact store: every stage writes under <workdir>/<stage>/<key>/",
    ("regions", "demo", "bounds"): "left, bottom, right, top: exactly the 224-px tile lattice",
    ("regions", "demo", "orthophotos"): "sheets overlap by 20 px; nodata = 0 (from the files)",
    ("regions", "demo", "schedule"): "`botaclip deploy` runs the pipeline at 03:00 on every 1st",
    ("datasets", "releves"): "relevés: plot × species with Braun-Blanquet cover (%)",
    ("datasets", "plants"): "plant presence/absence surveys, away from the relevés",
    ("datasets", "butterflies"): "butterfly presence-only records, lon/lat in a CSV",
    ("datasets", "soil"): "soil nematode trophic groups: counts per sample",
    ("datasets", "butterfly_transects"): "butterflies seen or not on transects: their test set",
    ("regions", "demo", "covariates"): "DEM (8 m) and a geological map (WGS84): a baseline",
}


def catalog_mapping(size: str, preset: DemoSize) -> dict[str, Any]:
    """Build the catalog as a plain mapping (before overrides).

    Args:
        size: name of the size preset; "tiny" gets a tiny model and short training.
        preset: the size preset.

    Returns:
        The catalog mapping, its keys in the order they are written.

    """
    return {
        "version": 1,
        # the demo folder is the artifact store: report at <demo folder>/reports/demo.json
        "workdir": ".",
        "regions": {"demo": _region(preset)},
        "datasets": _datasets(),
        **_training(size),
    }


def _region(preset: DemoSize) -> dict[str, Any]:
    """The demo region: the square of orthophoto sheets, its relevés and targets."""
    left, top = ORIGIN
    extent = preset.extent_m
    return {
        "crs": CRS_CODE,
        "resolution": RESOLUTION,
        "bounds": [left, top - extent, left + extent, top],
        "orthophotos": {
            "paths": ["demo-data/ortho/*.tif"],
            "bands": list(BANDS),
            "wavelengths_um": list(WAVELENGTHS_UM),
        },
        "releves": "releves",
        "targets": ["plants", "butterflies", "soil"],
        "covariates": [
            {"name": "elevation", "path": "demo-data/covariates/elevation.tif"},
            {"name": "geology", "path": "demo-data/covariates/geology.tif", "categorical": True},
        ],
        "schedule": {"cron": "0 3 1 * *", "timezone": "Europe/Paris"},
    }


def _datasets() -> dict[str, Any]:
    """The relevés and the three downstream datasets, as the demo files lay them out."""
    return {
        "releves": {
            "kind": "releves",
            "path": "demo-data/releves.gpkg",
            "layer": "releves",
            "site_id": "plot_id",
            "species": "species",
            "value": "cover",
        },
        "plants": {
            "kind": "presence_absence",
            "path": "demo-data/plant_surveys.parquet",
            "site_id": "site_id",
            "species": "species",
            "value": "present",
        },
        "butterflies": {
            "kind": "presence_only",
            "path": "demo-data/butterflies.csv",
            "crs": "EPSG:4326",
            "x": "lon",
            "y": "lat",
            "site_id": "record_id",
            "species": "species",
            "test": "butterfly_transects",
        },
        "butterfly_transects": {
            "kind": "presence_absence",
            "path": "demo-data/butterfly_transects.csv",
            "crs": CRS_CODE,
            "x": "x",
            "y": "y",
            "site_id": "site_id",
            "species": "species",
            "value": "present",
        },
        "soil": {
            "kind": "abundance",
            "path": "demo-data/soil_fauna.csv",
            "crs": CRS_CODE,
            "x": "x",
            "y": "y",
            "site_id": "sample_id",
            "species": "trophic_group",
            "value": "abundance",
        },
    }


def _training(size: str) -> dict[str, Any]:
    """Model, fine-tuning and downstream settings sized for the preset."""
    if size == "tiny":
        return {
            "model": {"dofa": {"size": "tiny", "weights": None}},
            # CPU everywhere: the tiny demo's figures (and the tests built on it) are then the
            # same on a GPU machine as on a laptop
            "finetune": {"epochs": 5, "batch_size": 16, "augment_views": 1, "device": "cpu"},
            "embed": {"device": "cpu"},
            "downstream": {
                "folds": 3,
                "n_background": 100,
                "min_presences": 3,
                # the tests run this demo many times: the quickest model (the default demo and
                # tests/test_downstream_stage.py fit all five), 100 bootstrap resamples
                "models": ["glm"],
                "random_cv_models": ["glm"],
                "model_params": {"rf_trees": 25, "brt_iterations": 25, "brt_learning_rate": 0.2},
                "bootstrap": 100,
                # tiny fits: threads would cost more than they save (11 s against 7.6 s)
                "jobs": 1,
            },
        }
    return {
        "model": {"dofa": {"size": "base", "weights": None}},
        # DOFA-Base runs at ~2.5 tiles/s on 2 CPU cores: one view per plot keeps the demo's
        # forward passes (144 region tiles + 240 plot chips) near 2.5 minutes
        "finetune": {"epochs": 40, "augment_views": 1},
        # every species × fold × feature source × model is a fit (five models on six sources,
        # three tasks): three folds, smaller forests and boosting, 16 PCA components and 100
        # resamples per interval keep the stage near 100 s on 2 cores (2051 s with 100 trees,
        # 100 iterations and the stage's defaults; benchmarks/bench_demo_downstream.py)
        "downstream": {
            "folds": 3,
            "n_background": 400,
            "pca_components": 16,
            "bootstrap": 100,
            "random_cv_models": ["glm"],
            "model_params": {
                "rf_trees": 30,
                "brt_iterations": 25,
                "brt_learning_rate": 0.2,
                "maxent_features": ["linear", "hinge"],
            },
        },
    }


def render_catalog(mapping: dict[str, Any], *, size: str, seed: int, preset: DemoSize) -> str:
    """YAML text of the catalog: block style for mappings, comments above the main keys.

    Args:
        mapping: the catalog mapping, overrides merged in.
        size: name of the size preset, for the header.
        seed: seed of the demo region, for the header.
        preset: the size preset, for the header.

    Returns:
        The text of ``data_catalog.yaml``.

    """
    header = _CATALOG_HEADER.format(size=size, seed=seed, extent_m=preset.extent_m)
    lines = header.rstrip("\n").split("\n") + [""]
    _render_block(mapping, (), lines)
    return "\n".join(lines) + "\n"


def _render_block(mapping: dict[str, Any], path: tuple[str, ...], lines: list[str]) -> None:
    """Append the lines of ``mapping``, nested at ``path``, to ``lines``."""
    indent = "  " * len(path)
    for key, value in mapping.items():
        here = (*path, str(key))
        if not path and lines and lines[-1] != "":
            lines.append("")  # a blank line between top-level blocks
        if here in _CATALOG_COMMENTS:
            lines.append(f"{indent}# {_CATALOG_COMMENTS[here]}")
        if isinstance(value, dict) and value:
            lines.append(f"{indent}{_scalar(key)}:")
            _render_block(value, here, lines)
        else:
            lines.append(f"{indent}{_scalar(key)}: {_scalar(value)}")


def _scalar(value: Any) -> str:
    """Dump a value in YAML flow style on one line."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...").strip()
