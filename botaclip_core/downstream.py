"""Species models on embeddings with spatially blocked cross-validation.

The ``evaluate_*`` functions take features already projected with :func:`fit_projector`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import spearmanr
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from botaclip_core.catalog import DownstreamSettings
from botaclip_core.errors import StageError

logger = logging.getLogger(__name__)

MODEL_NAMES = {
    "presence_absence": "logistic_regression",
    "presence_only": "logistic_regression_vs_background",
    "abundance": "ridge_log1p",
}
PRIMARY_METRIC = {"presence_absence": "auc", "presence_only": "auc", "abundance": "spearman"}


@dataclass
class TargetScores:
    """Out-of-fold scores of one dataset for one feature source."""

    metrics: dict[str, float]
    per_target: dict[str, dict[str, float]] = field(default_factory=dict)
    n_targets: int = 0


def spatial_blocks(xy: np.ndarray, block_size: float) -> np.ndarray:
    """Integer id of the square spatial block holding each point."""
    keys = np.floor(np.asarray(xy) / block_size).astype(np.int64)
    _, ids = np.unique(keys, axis=0, return_inverse=True)
    return ids.reshape(-1)


def _folds(groups: np.ndarray, n_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise StageError(
            "all sites fall in one spatial block; lower downstream.block_size_m so that "
            "cross-validation can hold out space"
        )
    return list(GroupKFold(n_splits=min(n_folds, n_groups)).split(groups, groups=groups))


def fit_projector(landscape: np.ndarray, settings: DownstreamSettings) -> Pipeline:
    """Standardisation + whitened PCA fitted on a random sample of the landscape's embeddings.

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


def true_skill_statistic(y: np.ndarray, score: np.ndarray) -> float:
    """Maximum over thresholds of sensitivity + specificity − 1."""
    fpr, tpr, _ = roc_curve(y, score)
    return float(np.max(tpr - fpr))


def boyce_index(
    presence_scores: np.ndarray, background_scores: np.ndarray, n_bins: int = 10
) -> float:
    """Continuous Boyce index: Spearman ρ of predicted/expected ratio across suitability bins."""
    lo, hi = float(np.min(background_scores)), float(np.max(background_scores))
    if hi <= lo:
        return float("nan")
    edges = np.linspace(lo, hi, n_bins + 1)
    p = np.histogram(np.clip(presence_scores, lo, hi), edges)[0] / len(presence_scores)
    e = np.histogram(background_scores, edges)[0] / len(background_scores)
    keep = e > 0
    if keep.sum() < 3:
        return float("nan")
    return float(spearmanr(np.arange(n_bins)[keep], p[keep] / e[keep]).statistic)


def _classify_oof(
    X: np.ndarray, Y: np.ndarray, groups: np.ndarray, settings: DownstreamSettings
) -> np.ndarray:
    """Out-of-fold presence probabilities for every column of ``Y`` (NaN where not scorable)."""
    oof = np.full(Y.shape, np.nan)
    for train, test in _folds(groups, settings.folds):
        Xtr, Xte = X[train], X[test]
        for j in range(Y.shape[1]):
            y = Y[train, j]
            if y.min() == y.max():
                continue
            clf = LogisticRegression(C=settings.C, class_weight="balanced", max_iter=2000)
            oof[test, j] = clf.fit(Xtr, y).predict_proba(Xte)[:, 1]
    return oof


def evaluate_presence_absence(
    X: np.ndarray,
    Y: np.ndarray,
    xy: np.ndarray,
    species: list[str],
    settings: DownstreamSettings,
    *,
    block_size: float,
) -> TargetScores:
    """Per-species logistic models; AUC and TSS on spatially held-out sites."""
    Y = (Y > 0).astype(int)
    keep = (Y.sum(0) >= settings.min_presences) & ((1 - Y).sum(0) >= settings.min_presences)
    Yk = Y[:, keep]
    oof = _classify_oof(X, Yk, spatial_blocks(xy, block_size), settings)
    per: dict[str, dict[str, float]] = {}
    for j, name in enumerate(np.asarray(species)[keep]):
        ok = ~np.isnan(oof[:, j])
        if len(np.unique(Yk[ok, j])) < 2:
            continue
        per[str(name)] = {
            "auc": float(roc_auc_score(Yk[ok, j], oof[ok, j])),
            "tss": true_skill_statistic(Yk[ok, j], oof[ok, j]),
        }
    return _summarise(per)


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
) -> TargetScores:
    """Presence records against background points; AUC and Boyce index on held-out blocks."""
    per: dict[str, dict[str, float]] = {}
    for j, name in enumerate(species):
        pres = Y[:, j] > 0
        if pres.sum() < settings.min_presences:
            continue
        Xs = np.vstack([X[pres], background_X])
        ys = np.r_[np.ones(pres.sum(), dtype=int), np.zeros(len(background_X), dtype=int)]
        groups = spatial_blocks(np.vstack([xy[pres], background_xy]), block_size)
        oof = _classify_oof(Xs, ys[:, None], groups, settings)[:, 0]
        ok = ~np.isnan(oof)
        if len(np.unique(ys[ok])) < 2:
            continue
        per[name] = {
            "auc": float(roc_auc_score(ys[ok], oof[ok])),
            "boyce": boyce_index(oof[ok & (ys == 1)], oof[ok & (ys == 0)]),
        }
    return _summarise(per)


def evaluate_abundance(
    X: np.ndarray,
    Y: np.ndarray,
    xy: np.ndarray,
    groups_names: list[str],
    settings: DownstreamSettings,
    *,
    block_size: float,
) -> TargetScores:
    """Ridge regression of log(1 + abundance); Spearman ρ on spatially held-out sites."""
    target = np.log1p(Y)
    oof = np.full(Y.shape, np.nan)
    for train, test in _folds(spatial_blocks(xy, block_size), settings.folds):
        model = Ridge(alpha=settings.alpha).fit(X[train], target[train])
        oof[test] = model.predict(X[test]).reshape(len(test), -1)
    per = {}
    for j, name in enumerate(groups_names):
        if np.ptp(target[:, j]) == 0:
            continue
        per[name] = {"spearman": float(spearmanr(target[:, j], oof[:, j]).statistic)}
    return _summarise(per)


def _summarise(per: dict[str, dict[str, float]]) -> TargetScores:
    if not per:
        return TargetScores(metrics={}, per_target={}, n_targets=0)
    names = next(iter(per.values())).keys()
    metrics = {m: float(np.nanmean([v[m] for v in per.values()])) for m in names}
    return TargetScores(metrics=metrics, per_target=per, n_targets=len(per))
