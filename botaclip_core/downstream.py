"""Species models on embeddings, scored by spatially blocked (or random) cross-validation.

Each ``evaluate_*`` function fits every model of ``settings.models`` (see
:mod:`botaclip_core.sdm.models`) per species on the training folds and scores the held-out
folds with the field's metrics (:mod:`botaclip_core.sdm.metrics`); thresholds (TSS, kappa) are
chosen on the training folds only. Scores carry 95% percentile bootstrap intervals
(:mod:`botaclip_core.sdm.bootstrap`): over sites for each species, over species for a task's
mean. Features come already projected with :func:`fit_projector`.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
from sklearn.decomposition import PCA
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from botaclip_core.catalog import DownstreamSettings
from botaclip_core.sdm.blocks import balanced_folds
from botaclip_core.sdm.bootstrap import mean_interval, site_intervals
from botaclip_core.sdm.metrics import (
    abundance_metrics,
    max_tss_threshold,
    point_biserial,
    presence_only_metrics,
)
from botaclip_core.sdm.models import Kind, fit_models, models_for, predict_models

logger = logging.getLogger(__name__)

PRIMARY_METRIC = {"presence_absence": "auc", "presence_only": "auc", "abundance": "spearman"}
T = TypeVar("T")
Validation = Literal["spatial", "random"]
Interval = tuple[float, float]


@dataclass
class TargetScores:
    """Held-out scores of one dataset, one feature source and one model.

    Attributes:
        metrics: mean over targets (species) of each metric.
        per_target: each target's metrics.
        n_targets: targets scored.
        intervals: percentile bootstrap interval of each mean, resampling targets.
        per_target_intervals: each target's intervals, resampling its sites.
    """

    metrics: dict[str, float]
    per_target: dict[str, dict[str, float]] = field(default_factory=dict)
    n_targets: int = 0
    intervals: dict[str, Interval] = field(default_factory=dict)
    per_target_intervals: dict[str, dict[str, Interval]] = field(default_factory=dict)


def spatial_blocks(xy: np.ndarray, block_size: float) -> np.ndarray:
    """Integer id of the square spatial block holding each point."""
    keys = np.floor(np.asarray(xy) / block_size).astype(np.int64)
    _, ids = np.unique(keys, axis=0, return_inverse=True)
    return ids.reshape(-1)


def make_folds(
    validation: Validation,
    xy: np.ndarray,
    y: np.ndarray | None,
    settings: DownstreamSettings,
    block_size: float,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cross-validation folds: whole spatial blocks balanced in presences, or random sites.

    Args:
        validation: ``spatial`` (square blocks of ``block_size``, assigned to folds so that
            each holds about as many presences; as many sites when ``y`` is None) or ``random``.
        xy: site coordinates.
        y: observations (presences where > 0), or None.
        settings: folds and seed.
        block_size: block side, in the coordinates' unit.

    Raises:
        StageError: all sites fall in one block (the message names ``downstream.block_size_m``).
    """
    if validation == "random":
        from sklearn.model_selection import KFold

        splitter = KFold(n_splits=settings.folds, shuffle=True, random_state=settings.seed)
        return list(splitter.split(xy))
    return balanced_folds(spatial_blocks(xy, block_size), y, settings.folds, seed=settings.seed)


def fit_projector(landscape: np.ndarray, settings: DownstreamSettings) -> Pipeline:
    """Standardisation + PCA (not whitened) fitted on a random sample of the landscape.

    Fitting on background points rather than on sites keeps labels and held-out sites out of
    the basis, and lets every species and fold share one projection.
    """
    steps: list = [StandardScaler()]
    if settings.pca_components:
        n = min(settings.pca_components, len(landscape) - 1, landscape.shape[1])
        steps.append(
            PCA(n_components=n, whiten=False, svd_solver="full", random_state=settings.seed)
        )
    return make_pipeline(*steps).fit(landscape)


def _jobs(settings: DownstreamSettings) -> int:
    return settings.jobs or min(os.cpu_count() or 1, 4)


def _one_thread(fn: Callable[[int], T], j: int) -> T:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return fn(j)


def _map(fn: Callable[[int], T], n: int, settings: DownstreamSettings) -> list[T]:
    """``fn`` over species ``0..n-1``, in worker processes; one BLAS/OpenMP thread each.

    Processes, not threads: a species' many small fits spend most of their time in Python
    (scikit-learn's checks, tree and boosting set-up), so two threads ran at the speed of one
    core (measured on the default demo: 134 s of fits in 141 s of wall time). Nested thread
    pools on a few busy cores made the fits many times slower. Every fit seeds its own
    generators, so the results do not depend on which worker fits which species.
    """
    from sklearn.utils.parallel import Parallel, delayed
    from threadpoolctl import threadpool_limits

    if _jobs(settings) == 1 or n < 2:
        # one limit around them all: setting it looks up the loaded libraries, 7 ms a time
        with threadpool_limits(limits=1):
            return [fn(j) for j in range(n)]
    return list(
        Parallel(n_jobs=_jobs(settings), backend="loky")(
            delayed(_one_thread)(fn, j) for j in range(n)
        )
    )


@dataclass
class _OutOfFold:
    """Held-out scores of every model for one species, and the training-threshold calls."""

    scores: dict[str, np.ndarray]
    present: dict[str, np.ndarray]


def _out_of_fold(
    kind: Kind,
    X: np.ndarray,
    y: np.ndarray,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    settings: DownstreamSettings,
    models: Sequence[str],
) -> _OutOfFold:
    """Every model fitted on each training fold and scored on its held-out fold.

    A fold whose training part has one class only leaves its held-out scores NaN.
    """
    names = models_for(kind, models)  # type: ignore[arg-type]
    scores: dict[str, np.ndarray] = {m: np.full(len(y), np.nan) for m in names}
    present: dict[str, np.ndarray] = {m: np.zeros(len(y), dtype=bool) for m in names}
    params = settings.model_params
    for train, test in folds:
        y_train = y[train]
        if kind != "abundance" and y_train.min() == y_train.max():
            continue
        fitted_models = fit_models(names, kind, X[train], y_train, params, seed=settings.seed)
        held_out = predict_models(fitted_models, X[test])
        fitted = predict_models(fitted_models, X[train]) if kind == "presence_absence" else {}
        for m in names:
            scores[m][test] = held_out[m]
            if m in fitted:
                present[m][test] = held_out[m] >= max_tss_threshold(y_train, fitted[m])
    return _OutOfFold(scores, present)


def _pa_metrics(y: np.ndarray, oof: np.ndarray, present: np.ndarray) -> dict[str, float] | None:
    from sklearn.metrics import cohen_kappa_score, roc_auc_score

    ok = ~np.isnan(oof)
    y, oof, present = y[ok], oof[ok], present[ok]
    if len(np.unique(y)) < 2:
        return None
    sensitivity, specificity = present[y == 1].mean(), (~present[y == 0]).mean()
    return {
        "auc": float(roc_auc_score(y, oof)),
        "tss": float(sensitivity + specificity - 1.0),
        "kappa": float(cohen_kappa_score(y, present.astype(int))),
        "cor": point_biserial(y, oof),
    }


class _Collector:
    """Per-model, per-target metrics and their site-bootstrap intervals."""

    def __init__(self, kind: Kind, settings: DownstreamSettings) -> None:
        self.kind, self.settings = kind, settings
        self.per: dict[str, dict[str, dict[str, float]]] = {}
        self.ci: dict[str, dict[str, dict[str, Interval]]] = {}

    def add(
        self,
        model: str,
        target: str,
        metrics: dict[str, float],
        y: np.ndarray,
        scores: np.ndarray,
        calls: np.ndarray | None = None,
    ) -> None:
        self.per.setdefault(model, {})[target] = metrics
        if self.settings.bootstrap:
            ok = ~np.isnan(scores)
            self.ci.setdefault(model, {})[target] = site_intervals(
                self.kind,
                y[ok],
                scores[ok],
                calls=None if calls is None else calls[ok],
                n_resamples=self.settings.bootstrap,
                seed=self.settings.seed,
            )

    def scores(self, models: Sequence[str]) -> dict[str, TargetScores]:
        out = {}
        for m in models:
            summary = _summarise(self.per.get(m, {}), self.settings)
            summary.per_target_intervals = self.ci.get(m, {})
            out[m] = summary
        return out


def evaluate_presence_absence(
    X: np.ndarray,
    Y: np.ndarray,
    xy: np.ndarray,
    species: list[str],
    settings: DownstreamSettings,
    *,
    block_size: float,
    validation: Validation = "spatial",
    models: Sequence[str] | None = None,
) -> dict[str, TargetScores]:
    """Per-species models on presence/absence sites; AUC, TSS, kappa and COR held out.

    TSS and kappa use, in each fold, the max-TSS threshold of the model's fit to its training
    sites. Species with fewer than ``min_presences`` presences or absences are skipped.

    Returns:
        Scores by model name (``models``, default ``settings.models``).
    """
    names_models = list(models or settings.models)
    Y = (Y > 0).astype(int)
    keep = (Y.sum(0) >= settings.min_presences) & ((1 - Y).sum(0) >= settings.min_presences)
    _warn_skipped(species, keep, settings)
    Yk, names = Y[:, keep], [str(s) for s in np.asarray(species)[keep]]

    def one(j: int) -> _OutOfFold:
        folds = make_folds(validation, xy, Yk[:, j], settings, block_size)
        return _out_of_fold("presence_absence", X, Yk[:, j], folds, settings, names_models)

    results = _map(one, len(names), settings)
    collect = _Collector("presence_absence", settings)
    for j, (name, result) in enumerate(zip(names, results, strict=True)):
        for model, oof in result.scores.items():
            metrics = _pa_metrics(Yk[:, j], oof, result.present[model])
            if metrics is not None:
                calls = result.present[model].astype(float)
                collect.add(model, name, metrics, Yk[:, j], oof, calls)
    return collect.scores(models_for("presence_absence", names_models))  # type: ignore[arg-type]


def evaluate_presence_only(
    X: np.ndarray,
    Y: np.ndarray,
    xy: np.ndarray,
    background_X: np.ndarray,
    background_xy: np.ndarray,
    species: list[str],
    settings: DownstreamSettings,
    *,
    block_size: float,
    validation: Validation = "spatial",
    models: Sequence[str] | None = None,
) -> dict[str, TargetScores]:
    """Presence records against background points; AUC and continuous Boyce index held out.

    Returns:
        Scores by model name (``models``, default ``settings.models``).
    """
    names_models = list(models or settings.models)
    keep = (Y > 0).sum(0) >= settings.min_presences
    _warn_skipped(species, keep, settings)
    columns = list(np.flatnonzero(keep))
    names = [str(species[j]) for j in columns]

    def one(k: int) -> tuple[np.ndarray, _OutOfFold]:
        pres = Y[:, columns[k]] > 0
        Xs = np.vstack([X[pres], background_X])
        ys = np.r_[np.ones(pres.sum(), dtype=int), np.zeros(len(background_X), dtype=int)]
        folds = make_folds(
            validation, np.vstack([xy[pres], background_xy]), ys, settings, block_size
        )
        return ys, _out_of_fold("presence_only", Xs, ys, folds, settings, names_models)

    results = _map(one, len(names), settings)
    collect = _Collector("presence_only", settings)
    for name, (ys, result) in zip(names, results, strict=True):
        for model, oof in result.scores.items():
            ok = ~np.isnan(oof)
            if len(np.unique(ys[ok])) < 2:
                continue
            metrics = presence_only_metrics(oof[ok & (ys == 1)], oof[ok & (ys == 0)])
            collect.add(model, name, metrics, ys, oof)
    return collect.scores(models_for("presence_only", names_models))  # type: ignore[arg-type]


def evaluate_abundance(
    X: np.ndarray,
    Y: np.ndarray,
    xy: np.ndarray,
    targets: list[str],
    settings: DownstreamSettings,
    *,
    block_size: float,
    validation: Validation = "spatial",
    models: Sequence[str] | None = None,
) -> dict[str, TargetScores]:
    """Abundance models per target; Spearman ρ, R² and deviance explained held out.

    Returns:
        Scores by model name (``models``, default ``settings.models``; MaxEnt models no
        abundance).
    """
    names_models = list(models or settings.models)
    folds = make_folds(validation, xy, None, settings, block_size)
    varying = [j for j in range(Y.shape[1]) if np.ptp(Y[:, j]) > 0]
    results = _map(
        lambda k: _out_of_fold("abundance", X, Y[:, varying[k]], folds, settings, names_models),
        len(varying),
        settings,
    )
    collect = _Collector("abundance", settings)
    for j, result in zip(varying, results, strict=True):
        for model, oof in result.scores.items():
            collect.add(model, targets[j], abundance_metrics(Y[:, j], oof), Y[:, j], oof)
    return collect.scores(models_for("abundance", names_models))  # type: ignore[arg-type]


@dataclass
class Sites:
    """Sites of one dataset: features (already projected), observations and species names.

    Attributes:
        X: ``(n, D)`` features of the sites that have them.
        Y: ``(n, S)`` observations (presence > 0, or abundance).
        species: the ``S`` species (or target) names.
        kind: the dataset's kind.
    """

    X: np.ndarray
    Y: np.ndarray
    species: list[str]
    kind: str


@dataclass
class _TestFit:
    """One species' test observations, every model's test scores, threshold and background."""

    observed: np.ndarray
    scores: dict[str, np.ndarray]
    background: dict[str, np.ndarray]
    thresholds: dict[str, float]


def evaluate_test_set(
    train: Sites,
    test: Sites,
    background_X: np.ndarray,
    settings: DownstreamSettings,
    *,
    models: Sequence[str] | None = None,
) -> dict[str, TargetScores]:
    """Models fitted on every training site, scored on an independent test set.

    Presence-only training data are fitted against ``background_X``. A presence/absence test
    set gets AUC, COR, and TSS and kappa at the max-TSS threshold of the training fit; a
    presence-only one AUC and the Boyce index of its records against the background; an
    abundance one Spearman ρ, R² and D². Species are matched by name; one missing from either
    set, or with too few presences in training, is skipped.

    Returns:
        Scores by model name (``models``, default ``settings.models``).
    """
    names_models = models_for(train.kind, list(models or settings.models))  # type: ignore[arg-type]
    kind: Kind = train.kind  # type: ignore[assignment]
    shared = [s for s in train.species if s in test.species]
    if not shared:
        logger.warning(
            "test set: none of its %d species is among the %d training species",
            len(test.species),
            len(train.species),
        )
    Y_train = train.Y if kind == "abundance" else (train.Y > 0).astype(int)
    counts = Y_train.sum(0) if kind != "abundance" else np.full(len(train.species), np.inf)
    keep = [s for s in shared if counts[train.species.index(s)] >= settings.min_presences]

    def one(k: int) -> _TestFit | None:
        species = keep[k]
        y = Y_train[:, train.species.index(species)]
        observed = test.Y[:, test.species.index(species)]
        X = train.X
        if kind == "presence_only":
            X = np.vstack([train.X[y > 0], background_X])
            y = np.r_[np.ones(int((y > 0).sum()), dtype=int), np.zeros(len(background_X), int)]
        one_class = test.kind == "presence_absence" and len(np.unique(observed > 0)) < 2
        if kind != "abundance" and (y.min() == y.max() or one_class):
            return None
        fitted = fit_models(names_models, kind, X, y, settings.model_params, seed=settings.seed)
        return _TestFit(
            observed=observed,
            scores=predict_models(fitted, test.X),
            background=predict_models(fitted, background_X) if test.kind == "presence_only" else {},
            thresholds={m: max_tss_threshold(y, v) for m, v in predict_models(fitted, X).items()}
            if kind != "abundance"
            else {},
        )

    results = _map(one, len(keep), settings)
    collect = _Collector(test.kind, settings)  # type: ignore[arg-type]
    for species, fit in zip(keep, results, strict=True):
        if fit is None:
            continue
        observed = fit.observed
        for model, score in fit.scores.items():
            if test.kind == "presence_absence":
                y = (observed > 0).astype(int)
                calls = score >= fit.thresholds[model]
                metrics = _pa_metrics(y, score, calls)
                if metrics is not None:
                    collect.add(model, species, metrics, y, score, calls.astype(float))
            elif test.kind == "presence_only":
                pres, bg = score[observed > 0], fit.background[model]
                if len(pres):
                    ys = np.r_[np.ones(len(pres), int), np.zeros(len(bg), int)]
                    collect.add(
                        model, species, presence_only_metrics(pres, bg), ys, np.r_[pres, bg]
                    )
            else:
                collect.add(model, species, abundance_metrics(observed, score), observed, score)
    return collect.scores(names_models)


def _warn_skipped(species: Sequence[str], keep: np.ndarray, settings: DownstreamSettings) -> None:
    skipped = [str(s) for s, k in zip(species, keep, strict=True) if not k]
    if skipped:
        shown = ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        logger.warning(
            "%d of %d species have fewer than downstream.min_presences = %d presences (or "
            "absences) and are not modelled: %s",
            len(skipped),
            len(species),
            settings.min_presences,
            shown,
        )


def _summarise(per: dict[str, dict[str, float]], settings: DownstreamSettings) -> TargetScores:
    if not per:
        return TargetScores(metrics={}, per_target={}, n_targets=0)
    names: dict[str, Any] = dict.fromkeys(k for v in per.values() for k in v)
    metrics, intervals = {}, {}
    for m in names:
        values = np.array([v.get(m, np.nan) for v in per.values()], dtype=float)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a metric NaN for every target
            metrics[m] = float(np.nanmean(values))
        if settings.bootstrap:
            intervals[m] = mean_interval(
                values.tolist(), n_resamples=settings.bootstrap, seed=settings.seed
            )
    return TargetScores(metrics=metrics, per_target=per, n_targets=len(per), intervals=intervals)
