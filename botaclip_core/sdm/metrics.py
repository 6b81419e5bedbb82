"""The field's metrics for species distribution models.

Presence/absence: AUC, TSS and Cohen's kappa at a threshold chosen on training data, and the
point-biserial correlation (COR). Presence-only: AUC against background and the continuous Boyce
index (Hirzel et al. 2006) exactly as ``ecospat.boyce`` computes it. Abundance: Spearman ρ, R² and
the deviance explained.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import cohen_kappa_score, d2_tweedie_score, r2_score, roc_auc_score, roc_curve

#: Windows of the continuous Boyce index: ``ecospat.boyce``'s ``res`` (101 window starts).
BOYCE_RESOLUTION = 100


def boyce_index(presence_scores: np.ndarray, background_scores: np.ndarray) -> float:
    """Continuous Boyce index of Hirzel et al. (2006), as ``ecospat.boyce`` computes it.

    A window of width ``w = (max − min) / 10`` of the background scores moves over 101 starts
    evenly spaced from the lowest to the highest score of presences and background (minus
    ``w``); ecospat moves the last start up by 1 (a device against its closed intervals, kept
    here so that results match). In each closed window the share of presences over the share of
    background is the predicted-to-expected ratio, rounded to 10 decimals; windows with neither
    (0/0) are dropped, windows with presences and no background keep an infinite ratio.
    Successive equal ratios are reduced to the last of each run (the final ratio is compared with
    1, as ecospat does), and the index is the Spearman correlation of the ratios with the window
    starts.

    Args:
        presence_scores: predictions at presence records.
        background_scores: predictions at background points (or the whole landscape).

    Returns:
        The index in [−1, 1]; NaN with fewer than two windows, or when it is undefined.
    """
    obs = np.asarray(presence_scores, dtype=float).ravel()
    fit = np.asarray(background_scores, dtype=float).ravel()
    obs, fit = obs[~np.isnan(obs)], fit[~np.isnan(fit)]
    if not len(obs) or not len(fit):
        return float("nan")
    lo, hi = min(fit.min(), obs.min()), max(fit.max(), obs.max())
    width = (fit.max() - fit.min()) / 10.0
    starts = np.linspace(lo, hi - width, BOYCE_RESOLUTION + 1)
    starts[-1] += 1.0
    ends = starts + width
    # closed windows; sorted arrays make each count two binary searches
    obs_sorted, fit_sorted = np.sort(obs), np.sort(fit)
    n_obs = np.searchsorted(obs_sorted, ends, "right") - np.searchsorted(obs_sorted, starts, "left")
    n_fit = np.searchsorted(fit_sorted, ends, "right") - np.searchsorted(fit_sorted, starts, "left")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.round((n_obs / len(obs)) / (n_fit / len(fit)), 10)
    keep = ~np.isnan(ratio)
    ratio, starts = ratio[keep], starts[keep]
    if len(ratio) < 2:
        return float("nan")
    runs_end = ratio != np.append(ratio[1:], 1.0)
    ratio, starts = ratio[runs_end], starts[runs_end]
    if len(ratio) < 2 or np.all(ratio == ratio[0]):
        return float("nan")
    return float(spearmanr(ratio, starts).statistic)


def max_tss_threshold(y: np.ndarray, score: np.ndarray) -> float:
    """The score threshold that maximises TSS on (training) data; ``score >= t`` is presence."""
    fpr, tpr, thresholds = roc_curve(y, score)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], np.max(score)))


def tss_at(y: np.ndarray, score: np.ndarray, threshold: float) -> float:
    """True skill statistic (sensitivity + specificity − 1) of ``score >= threshold``."""
    y, pred = np.asarray(y).astype(bool), np.asarray(score) >= threshold
    sensitivity = pred[y].mean() if y.any() else np.nan
    specificity = (~pred[~y]).mean() if (~y).any() else np.nan
    return float(sensitivity + specificity - 1.0)


def kappa_at(y: np.ndarray, score: np.ndarray, threshold: float) -> float:
    """Cohen's kappa of ``score >= threshold`` against the observations."""
    pred = (np.asarray(score) >= threshold).astype(int)
    return float(cohen_kappa_score(np.asarray(y).astype(int), pred))


def point_biserial(y: np.ndarray, score: np.ndarray) -> float:
    """COR: the Pearson (point-biserial) correlation of 0/1 observations with the scores."""
    y, score = np.asarray(y, dtype=float), np.asarray(score, dtype=float)
    if np.ptp(score) == 0 or np.ptp(y) == 0:
        return float("nan")
    yc, sc = y - y.mean(), score - score.mean()
    return float(np.sum(yc * sc) / np.sqrt(np.sum(yc * yc) * np.sum(sc * sc)))


def presence_absence_metrics(
    y: np.ndarray, score: np.ndarray, threshold: float
) -> dict[str, float]:
    """AUC, TSS and kappa at ``threshold`` (chosen on training data), and COR."""
    return {
        "auc": float(roc_auc_score(y, score)),
        "tss": tss_at(y, score, threshold),
        "kappa": kappa_at(y, score, threshold),
        "cor": point_biserial(y, score),
    }


def presence_only_metrics(presence: np.ndarray, background: np.ndarray) -> dict[str, float]:
    """AUC of presences against background and the continuous Boyce index."""
    y = np.r_[np.ones(len(presence)), np.zeros(len(background))]
    return {
        "auc": float(roc_auc_score(y, np.r_[presence, background])),
        "boyce": boyce_index(presence, background),
    }


def abundance_metrics(observed: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Spearman ρ, R² on log(1 + abundance) and the Poisson deviance explained (D²).

    Args:
        observed: abundances (counts, ≥ 0).
        predicted: predicted abundances on the same scale (≥ 0).
    """
    observed = np.asarray(observed, dtype=float)
    predicted = np.clip(np.asarray(predicted, dtype=float), 1e-9, None)
    if np.ptp(predicted) == 0:
        rho = float("nan")
    else:
        rho = float(spearmanr(observed, predicted).statistic)
    return {
        "spearman": rho,
        "r2": float(r2_score(np.log1p(observed), np.log1p(predicted))),
        "deviance_explained": float(d2_tweedie_score(observed, predicted, power=1)),
    }
