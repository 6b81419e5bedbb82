"""The SDM metrics against naive references, scikit-learn and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sdm_reference import ecospat_boyce_reference
from sklearn.metrics import cohen_kappa_score, mean_poisson_deviance, r2_score, roc_auc_score

from botaclip_core.sdm.metrics import (
    abundance_metrics,
    boyce_index,
    max_tss_threshold,
    point_biserial,
    presence_absence_metrics,
    tss_at,
)


def _cases() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    cases = []
    for k in range(12):
        n_bg, n_pres = int(rng.integers(50, 2000)), int(rng.integers(5, 300))
        bg = rng.beta(2, 5, n_bg)
        shift = rng.uniform(-0.2, 0.6)
        pres = np.clip(rng.beta(2, 5, n_pres) + shift * rng.uniform(0, 1, n_pres), 0, 1)
        if k % 3 == 1:  # random-forest-like scores: many ties
            bg, pres = np.round(bg, 2), np.round(pres, 2)
        if k % 3 == 2:  # suitability on another scale (a linear predictor)
            bg, pres = 40 * bg - 7, 40 * pres - 7
        cases.append((pres, bg))
    # scores on a coarse scale (one decimal) with presences resampled from the background:
    # plateaus of equal ratios, a final ratio of exactly 1 (seeds found to exercise both)
    for seed in (44, 316, 382, 772, 889):
        rng = np.random.default_rng(seed)
        bg = np.round(rng.uniform(0, 1, int(rng.integers(20, 200))), 1)
        cases.append((np.round(rng.choice(bg, int(rng.integers(5, 50))), 1), bg))
    # integer scores (a few levels), presences concentrated on some of them
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        levels = int(rng.integers(3, 15))
        bg = rng.integers(0, levels, int(rng.integers(30, 200))).astype(float)
        p = rng.dirichlet(np.ones(levels))
        cases.append((rng.choice(levels, int(rng.integers(5, 60)), p=p).astype(float), bg))
    return cases


@pytest.mark.parametrize("case", range(22))
def test_boyce_index_equals_ecospat_transcription(case: int) -> None:
    pres, bg = _cases()[case]
    expected = ecospat_boyce_reference(bg.tolist(), pres.tolist())
    got = boyce_index(pres, bg)
    assert got == pytest.approx(expected, abs=1e-12, nan_ok=True)


def test_boyce_index_known_cases() -> None:
    rng = np.random.default_rng(1)
    bg = rng.uniform(0, 1, 5000)
    # presences drawn in proportion to suitability: ratios rise with suitability
    pres = rng.choice(bg, 800, p=bg**3 / np.sum(bg**3))
    assert boyce_index(pres, bg) > 0.9
    # presences where suitability is low: a strongly negative index
    assert boyce_index(rng.choice(bg, 800, p=(1 - bg) ** 3 / np.sum((1 - bg) ** 3)), bg) < -0.9
    # a constant background leaves no window pattern
    assert math.isnan(boyce_index(np.full(10, 0.5), np.full(100, 0.5)))
    # the ten-bin index this replaced differs: it is not what ecospat computes
    assert boyce_index(pres, bg) != pytest.approx(0.0)


def test_presence_absence_metrics_equal_sklearn() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    score = np.clip(0.3 * y + rng.normal(0.4, 0.25, 500), 0, 1)
    y_train = rng.integers(0, 2, 400)
    train_score = np.clip(0.3 * y_train + rng.normal(0.4, 0.25, 400), 0, 1)
    t = max_tss_threshold(y_train, train_score)
    # the threshold maximises TSS on the training data (checked over every candidate)
    candidates = np.unique(train_score)
    best = max(tss_at(y_train, train_score, c) for c in candidates)
    assert tss_at(y_train, train_score, t) == pytest.approx(best)
    m = presence_absence_metrics(y, score, t)
    pred = (score >= t).astype(int)
    sens, spec = pred[y == 1].mean(), 1 - pred[y == 0].mean()
    assert m["auc"] == pytest.approx(roc_auc_score(y, score))
    assert m["tss"] == pytest.approx(sens + spec - 1)
    assert m["kappa"] == pytest.approx(cohen_kappa_score(y, pred))
    assert m["cor"] == pytest.approx(stats.pointbiserialr(y, score).statistic)
    assert point_biserial(y, np.full(500, 0.2)) != point_biserial(y, score)


def test_abundance_metrics_equal_references() -> None:
    rng = np.random.default_rng(5)
    observed = rng.poisson(rng.gamma(2.0, 3.0, 300)).astype(float)
    predicted = np.clip(observed * rng.uniform(0.5, 1.5, 300) + 0.5, 0.1, None)
    m = abundance_metrics(observed, predicted)
    assert m["spearman"] == pytest.approx(stats.spearmanr(observed, predicted).statistic)
    assert m["r2"] == pytest.approx(r2_score(np.log1p(observed), np.log1p(predicted)))
    # deviance explained: 1 − D(model) / D(null), the null predicting the mean count
    null = mean_poisson_deviance(observed, np.full_like(observed, observed.mean()))
    assert m["deviance_explained"] == pytest.approx(
        1 - mean_poisson_deviance(observed, predicted) / null
    )
