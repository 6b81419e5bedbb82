"""Presence-only benchmarks laid out as the NCEAS data (Elith et al. 2020, the ``disdat`` package).

A region ``NAME`` is four CSV files in one folder: ``NAMEtrain_po.csv`` (presence records:
``siteid, spid, x, y, occ, group`` and the covariates), ``NAMEtrain_bg.csv`` (background points,
same columns), ``NAMEtest_pa.csv`` (``group, siteid, x, y`` and one 0/1 column per species) and
``NAMEtest_env.csv`` (the covariates at the same sites, same order). Regions whose test sites are
split by biological group (``NAMEtest_pa_<group>.csv`` with ``NAMEtest_env_<group>.csv``) are
read too. Models train on each species' presences plus the background and are scored on the
independent presence/absence sites.

The background is the region's ``NAMEtrain_bg.csv`` (the benchmark's protocol, as Valavi et al.
2022 ran it), or on request a *target-group* background (Phillips et al. 2009, who built it on
the same NCEAS regions): the presence sites of every species of the same biological group, one
row per site, in place of those points, so that the background carries the same survey effort
(and bias) as the presences.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from botaclip_core.errors import InputDataError
from botaclip_core.sdm.metrics import max_tss_threshold, presence_absence_metrics
from botaclip_core.sdm.models import ModelName, ModelParams, fit_models, predict_models

logger = logging.getLogger(__name__)

META_COLUMNS = ("siteid", "spid", "x", "y", "occ", "group")
TEST_META_COLUMNS = ("group", "siteid", "x", "y")
Background = Literal["given", "target-group"]
BACKGROUNDS: tuple[Background, ...] = ("given", "target-group")


@dataclass
class Benchmark:
    """One region's training and test data, covariates encoded.

    Attributes:
        region: the region's name (file prefix).
        covariates: encoded covariate names (one-hot columns ``COL=level`` for categorical ones).
        presences: training presence covariates by species.
        background: background covariates.
        test_X: covariates at the test sites, one array per test table.
        test_y: 0/1 observations at the test sites, one frame per test table.
        sites: the ``siteid`` of each training presence, by species (rows of ``presences``).
        groups: each training species' biological group (``group`` of its records).
    """

    region: str
    covariates: list[str]
    presences: dict[str, np.ndarray]
    background: np.ndarray
    test_X: list[np.ndarray]
    test_y: list[pd.DataFrame]
    sites: dict[str, np.ndarray]
    groups: dict[str, str]

    @property
    def species(self) -> list[str]:
        """Every species of the test tables, in their order."""
        return [str(s) for frame in self.test_y for s in frame.columns]

    def background_for(self, species: str, kind: Background = "given") -> np.ndarray:
        """The background covariates a species is trained against.

        ``given``: the region's background points. ``target-group`` (Phillips et al. 2009): one
        row per presence site of any species of ``species``' biological group, its own sites
        included, in place of the given points.

        Raises:
            InputDataError: ``kind`` is unknown, or ``species`` is the only species of its group.
        """
        if kind == "given":
            return self.background
        if kind != "target-group":
            raise InputDataError(
                f"--background {kind!r}: unknown; use one of {', '.join(BACKGROUNDS)}"
            )
        group = self.groups[species]
        members = [s for s in self.presences if self.groups[s] == group]
        if members == [species]:
            raise InputDataError(
                f"species {species!r} is the only species of group {group!r} in the training "
                "records: a target-group background needs other species' records of its group; "
                "use --background given"
            )
        rows, seen = [], set()
        for other in members:
            for site, row in zip(self.sites[other].tolist(), self.presences[other], strict=True):
                if site not in seen:
                    seen.add(site)
                    rows.append(row)
        return np.vstack(rows)


def _read(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise InputDataError(
            f"{path}: file not found; a benchmark region NAME needs NAMEtrain_po.csv, "
            "NAMEtrain_bg.csv, NAMEtest_pa.csv and NAMEtest_env.csv in one folder"
        )
    return pd.read_csv(path)


def _test_tables(folder: Path, region: str) -> list[tuple[Path, Path]]:
    single = folder / f"{region}test_pa.csv"
    if single.is_file():
        return [(single, folder / f"{region}test_env.csv")]
    grouped = sorted(folder.glob(f"{region}test_pa_*.csv"))
    if not grouped:
        raise InputDataError(
            f"{single}: file not found (nor {region}test_pa_<group>.csv); the test sites of "
            f"region {region!r} must be in {folder}"
        )
    return [(pa, pa.with_name(pa.name.replace("test_pa_", "test_env_"))) for pa in grouped]


def load_benchmark(
    folder: str | Path, region: str, *, categorical: Sequence[str] = ()
) -> Benchmark:
    """Read a region's four tables and encode its covariates.

    The covariates are the training columns other than ``siteid, spid, x, y, occ, group`` that
    every test table also has; ``categorical`` ones are one-hot encoded with the levels of the
    training data (a level seen only at test sites encodes as all zeros).

    Raises:
        InputDataError: a file is missing, a categorical column is not a covariate, or no
            covariate is shared by the training and test tables.
    """
    folder = Path(folder)
    po = _read(folder / f"{region}train_po.csv")
    bg = _read(folder / f"{region}train_bg.csv")
    tables = [(_read(pa), _read(env), pa, env) for pa, env in _test_tables(folder, region)]
    if "spid" not in po.columns:
        raise InputDataError(
            f"{folder / f'{region}train_po.csv'}: no column 'spid' (the species of each record)"
        )
    shared = set.intersection(*(set(env.columns) for _, env, _, _ in tables))
    covariates = [c for c in po.columns if c not in META_COLUMNS and c in shared and c in bg]
    if not covariates:
        raise InputDataError(
            f"{folder}: no covariate column is shared by {region}train_po.csv and the test "
            "environment tables; they must carry the same covariate names"
        )
    unknown = [c for c in categorical if c not in covariates]
    if unknown:
        raise InputDataError(
            f"--categorical {','.join(unknown)}: not a covariate of region {region!r}; "
            f"covariates are {', '.join(covariates)}"
        )
    train = pd.concat([po[covariates], bg[covariates]], ignore_index=True)
    levels = {c: sorted(pd.unique(train[c].astype(str))) for c in categorical}
    names = [
        n for c in covariates for n in ([f"{c}={v}" for v in levels[c]] if c in levels else [c])
    ]
    encoded = _encode(train, covariates, levels)
    blank = [n for n, gap in zip(names, np.isnan(encoded).all(axis=0), strict=True) if gap]
    if blank:
        raise InputDataError(
            f"{region}train_po.csv, {region}train_bg.csv: covariate {', '.join(blank)} has no "
            "numeric value; name categorical covariates with --categorical"
        )
    fill = np.nanmedian(encoded, axis=0)
    encoded = np.where(np.isnan(encoded), fill, encoded)
    # z-scores of the training data (the GLM is penalised; trees and MaxEnt do not mind)
    mean, sd = encoded.mean(axis=0), encoded.std(axis=0)
    sd[sd == 0] = 1.0
    encoded = (encoded - mean) / sd
    n_po = len(po)
    pres_X, bg_X = encoded[:n_po], encoded[n_po:]
    spid = po["spid"].astype(str).to_numpy()
    presences = {str(s): pres_X[spid == s] for s in pd.unique(spid)}
    siteid = po["siteid"].to_numpy() if "siteid" in po else np.arange(n_po)
    group = po["group"].astype(str).to_numpy() if "group" in po else np.full(n_po, "")
    sites = {s: siteid[spid == s] for s in presences}
    groups = {s: str(group[spid == s][0]) for s in presences}
    test_X, test_y = [], []
    for pa, env, pa_path, env_path in tables:
        if len(pa) != len(env):
            raise InputDataError(
                f"{env_path}: {len(env)} rows but {pa_path.name} has {len(pa)}; the environment "
                "table must give the covariates of the same sites in the same order"
            )
        X = (_encode(env, covariates, levels, fill) - mean) / sd
        test_X.append(X)
        test_y.append(pa[[c for c in pa.columns if c not in TEST_META_COLUMNS]].astype(int))
    return Benchmark(region, names, presences, bg_X, test_X, test_y, sites, groups)


def _encode(
    frame: pd.DataFrame,
    covariates: list[str],
    levels: dict[str, list[str]],
    fill: np.ndarray | None = None,
) -> np.ndarray:
    """Numeric covariates as floats, categorical ones (``levels``) one-hot; gaps get ``fill``."""
    columns = []
    for c in covariates:
        if c in levels:
            values = frame[c].astype(str).to_numpy()
            columns += [(values == level).astype(float) for level in levels[c]]
        else:
            columns.append(pd.to_numeric(frame[c], errors="coerce").to_numpy(dtype=float))
    X = np.column_stack(columns)
    if fill is not None and np.isnan(X).any():
        X = np.where(np.isnan(X), fill, X)  # the NCEAS tables have no gaps; keep a rare one's site
    return X


def run_benchmark(
    bench: Benchmark,
    model: ModelName,
    params: ModelParams | None = None,
    *,
    seed: int = 0,
    background: Background = "given",
) -> tuple[dict[str, float | int | str], pd.DataFrame]:
    """Fit ``model`` per species on presences + background and score it on the test sites.

    ``background`` chooses the background (:meth:`Benchmark.background_for`).

    Returns:
        The summary (``region, model, n_species, mean_auc, mean_cor, seconds``; the means over
        every species of the test tables) and the per-species table (AUC, COR, and TSS and kappa
        at the max-TSS threshold of the training data).
    """
    params = params or ModelParams()
    started = time.perf_counter()
    rows = []
    for X_test, y_test in zip(bench.test_X, bench.test_y, strict=True):
        for species in y_test.columns:
            row: dict[str, float | int | str] = {
                "species": str(species),
                "model": model,
                "background": background,
            }
            observed = y_test[species].to_numpy()
            pres = bench.presences.get(str(species))
            row["n_presences_train"] = 0 if pres is None else len(pres)
            row["n_presences_test"] = int(observed.sum())
            if pres is None or not len(pres) or observed.min() == observed.max():
                logger.warning("%s: no training presence or one class at test sites", species)
                rows.append(row | dict.fromkeys(("auc", "cor", "tss", "kappa"), np.nan))
                continue
            bg = bench.background_for(str(species), background)
            row["n_background"] = len(bg)
            X = np.vstack([pres, bg])
            y = np.r_[np.ones(len(pres)), np.zeros(len(bg))].astype(int)
            fitted = fit_models([model], "presence_only", X, y, params, seed=seed)
            train_score = predict_models(fitted, X)[model]
            score = predict_models(fitted, X_test)[model]
            row |= presence_absence_metrics(observed, score, max_tss_threshold(y, train_score))
            rows.append(row)
            logger.info("%s %s: AUC %.3f", species, model, row["auc"])
    table = pd.DataFrame(rows)
    summary: dict[str, float | int | str] = {
        "region": bench.region,
        "model": model,
        "n_species": len(table),
        "mean_auc": round(float(table["auc"].mean()), 4),
        "mean_cor": round(float(table["cor"].mean()), 4),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return summary, table
