"""Bootstrap intervals and paired comparisons against known answers and naive loops."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from botaclip_core.sdm.bootstrap import (
    mean_interval,
    paired_comparison,
    percentile_interval,
    site_intervals,
    site_metrics,
    site_resamples,
)
from botaclip_core.sdm.metrics import (
    abundance_metrics,
    kappa_at,
    point_biserial,
    presence_only_metrics,
    tss_at,
)


def _presence_absence(n: int, seed: int, *, prevalence: float = 0.3, ties: bool = True):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    if not y.any():
        y[0] = 1
    scores = rng.random(n) * 0.6 + 0.35 * y
    if ties:  # forest-like scores: many ties
        scores = np.round(scores, 2)
    calls = (scores >= np.quantile(scores, 0.6)).astype(int)
    return y, scores, calls


def _presence_only(n_pres: int, n_bg: int, seed: int):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n_pres, dtype=int), np.zeros(n_bg, dtype=int)]
    scores = np.round(np.clip(rng.beta(2, 5, len(y)) + 0.3 * y * rng.random(len(y)), 0, 1), 2)
    perm = rng.permutation(len(y))  # presences need not come first
    return y[perm], scores[perm]


def _abundance(n: int, seed: int):
    rng = np.random.default_rng(seed)
    mu = np.exp(rng.normal(0.0, 1.0, n))
    observed = rng.poisson(mu)
    predicted = np.exp(0.6 * np.log(mu) + rng.normal(0.0, 0.5, n))
    return observed, predicted


# ----------------------------------------------------------------------------- intervals


def test_percentile_interval_constant_nan_and_level():
    assert percentile_interval(np.full(1000, 0.7)) == (0.7, 0.7)
    assert all(math.isnan(v) for v in percentile_interval(np.full(10, np.nan)))
    samples = np.r_[np.arange(1001, dtype=float), np.full(50, np.nan)]
    assert percentile_interval(samples) == pytest.approx((25.0, 975.0))
    assert percentile_interval(samples, 0.5) == pytest.approx((250.0, 750.0))
    with pytest.raises(ValueError, match="level"):
        percentile_interval(samples, 95)


def test_mean_interval_of_a_constant_is_the_constant():
    for c in (0.1, 0.7, -3.3, 1e6 + 0.1):
        assert mean_interval([c] * 37) == (c, c)


def test_mean_interval_drops_nan_and_needs_two_values():
    assert all(math.isnan(v) for v in mean_interval([0.5]))
    assert all(math.isnan(v) for v in mean_interval([0.5, np.nan]))
    assert mean_interval([1.0, np.nan, 2.0, 3.0], seed=3) == mean_interval([1.0, 2.0, 3.0], seed=3)


def test_mean_interval_of_normal_samples_is_mean_pm_1_96_se():
    n = 400
    x = np.random.default_rng(11).normal(0.0, 1.0, n)
    low, high = mean_interval(x, seed=5)
    half = 1.96 * x.std(ddof=1) / math.sqrt(n)
    assert low == pytest.approx(x.mean() - half, abs=0.012)
    assert high == pytest.approx(x.mean() + half, abs=0.012)


def test_mean_interval_covers_the_truth_about_95_percent_of_the_time():
    truth, hits = 2.0, 0
    for k in range(200):
        x = np.random.default_rng(1000 + k).normal(truth, 1.0, 60)
        low, high = mean_interval(x, seed=k)
        hits += low <= truth <= high
    assert 0.90 <= hits / 200 <= 0.99


def test_mean_interval_is_seeded():
    x = np.random.default_rng(0).random(30)
    assert mean_interval(x, seed=4) == mean_interval(x, seed=4)
    assert mean_interval(x, seed=4) != mean_interval(x, seed=5)


# ----------------------------------------------------------------------------- paired


def _exact_wilcoxon_two_sided(diff: np.ndarray) -> float:
    """P(min(T+, T−) ≤ observed) over all 2^n sign patterns (no ties, no zeros)."""
    ranks = np.argsort(np.argsort(np.abs(diff))) + 1
    observed = min(ranks[diff > 0].sum(), ranks[diff < 0].sum())
    n, extreme = len(diff), 0
    for signs in itertools.product((0, 1), repeat=n):
        t_plus = sum(r for r, s in zip(ranks, signs, strict=True) if s)
        extreme += min(t_plus, ranks.sum() - t_plus) <= observed
    return min(1.0, extreme / 2**n)


@pytest.mark.parametrize("n", [5, 8, 11])
def test_paired_source_better_on_every_species(n: int):
    rng = np.random.default_rng(n)
    species = [f"sp{j}" for j in range(n)]
    b = dict(zip(species, rng.uniform(0.5, 0.8, n), strict=True))
    gains = rng.permutation(np.arange(1, n + 1)) * 0.01  # distinct: exact test applies
    a = {s: b[s] + g for s, g in zip(species, gains, strict=True)}
    out = paired_comparison(a, b)
    assert out["n_species"] == n
    assert out["n_better"] == n and out["n_worse"] == 0
    assert out["mean_difference"] == pytest.approx(gains.mean())
    assert 0 < out["ci_low"] <= out["mean_difference"] <= out["ci_high"]
    assert out["p_value"] == pytest.approx(2.0 / 2**n)
    assert out["p_value"] == pytest.approx(_exact_wilcoxon_two_sided(gains))


def test_paired_mixed_differences_match_the_exact_test():
    rng = np.random.default_rng(2)
    b = {f"s{j}": float(v) for j, v in enumerate(rng.random(9))}
    diff = np.array([0.05, -0.02, 0.08, 0.011, -0.031, 0.062, 0.074, 0.043, -0.009])
    a = {s: b[s] + d for s, d in zip(b, diff, strict=True)}
    out = paired_comparison(a, b)
    assert (out["n_better"], out["n_worse"]) == (6, 3)
    assert out["p_value"] == pytest.approx(_exact_wilcoxon_two_sided(diff))


def test_paired_identical_sources():
    scores = {f"s{j}": v for j, v in enumerate(np.random.default_rng(3).random(12))}
    out = paired_comparison(scores, dict(scores))
    assert out == {
        "n_species": 12,
        "mean_difference": 0.0,
        "ci_low": 0.0,
        "ci_high": 0.0,
        "p_value": 1.0,
        "n_better": 0,
        "n_worse": 0,
    }


def test_paired_uses_only_species_both_scored():
    a = {"x": 0.9, "y": 0.8, "z": np.nan, "only_a": 0.1, "w": 0.7}
    b = {"x": 0.5, "y": 0.6, "z": 0.4, "only_b": 0.3, "w": 0.75}
    out = paired_comparison(a, b)
    assert out["n_species"] == 3
    assert (out["n_better"], out["n_worse"]) == (2, 1)
    assert out["mean_difference"] == pytest.approx((0.4 + 0.2 - 0.05) / 3)
    # the order of the mappings does not matter
    assert paired_comparison(dict(reversed(a.items())), b) == out
    one = paired_comparison({"x": 0.9}, {"x": 0.5})
    assert one["n_species"] == 1 and math.isnan(one["p_value"]) and math.isnan(one["ci_low"])


# ----------------------------------------------------------------------------- sites


@pytest.mark.parametrize("seed", range(4))
def test_site_metrics_equal_the_metrics_module(seed: int):
    y, scores, calls = _presence_absence(150 + 40 * seed, seed, ties=seed % 2 == 0)
    got = site_metrics("presence_absence", y, scores, calls=calls)
    assert got["auc"] == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert got["tss"] == pytest.approx(tss_at(y, calls, 0.5), abs=1e-12)
    assert got["kappa"] == pytest.approx(kappa_at(y, calls, 0.5), abs=1e-12)
    assert got["cor"] == pytest.approx(point_biserial(y, scores), abs=1e-12)

    y, scores = _presence_only(30 + 10 * seed, 400, seed)
    got = site_metrics("presence_only", y, scores)
    expected = presence_only_metrics(scores[y == 1], scores[y == 0])
    assert got == pytest.approx(expected, abs=1e-12)

    observed, predicted = _abundance(200, seed)
    got = site_metrics("abundance", observed, predicted)
    assert got == pytest.approx(abundance_metrics(observed, predicted), abs=1e-12)


def _naive_intervals(kind: str, y, scores, calls, n_resamples: int, seed: int):
    """Each metric of :mod:`metrics` on each resample, in a plain loop; then the percentiles."""
    values: dict[str, list[float]] = {}
    for i in site_resamples(kind, y, n_resamples=n_resamples, seed=seed):
        yi, si = y[i], scores[i]
        if kind == "presence_absence":
            if yi.min() == yi.max():
                continue
            m = {
                "auc": roc_auc_score(yi, si),
                "tss": tss_at(yi, calls[i], 0.5),
                "kappa": kappa_at(yi, calls[i], 0.5),
                "cor": point_biserial(yi, si),
            }
        elif kind == "presence_only":
            m = presence_only_metrics(si[yi == 1], si[yi == 0])
        else:
            if yi.min() == yi.max():
                continue
            m = abundance_metrics(yi, si)
        for name, v in m.items():
            values.setdefault(name, []).append(v)
    return {name: percentile_interval(np.array(v)) for name, v in values.items()}


@pytest.mark.parametrize("kind", ["presence_absence", "presence_only", "abundance"])
def test_site_intervals_match_a_naive_loop_over_the_same_resamples(kind: str):
    calls = None
    if kind == "presence_absence":
        y, scores, calls = _presence_absence(60, 8, prevalence=0.08)  # one-class resamples
    elif kind == "presence_only":
        y, scores = _presence_only(25, 200, 8)
    else:
        y, scores = _abundance(40, 8)
        y[y > 0] = np.where(np.arange((y > 0).sum()) < 3, y[y > 0], 0)  # sparse: constant draws
    got = site_intervals(kind, y, scores, calls=calls, n_resamples=200, seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy on constant resamples
        expected = _naive_intervals(kind, y, scores, calls, 200, 9)
    assert got.keys() == expected.keys()
    for name in got:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("kind", ["presence_absence", "presence_only"])
def test_auc_interval_equals_sklearn_on_each_resample(kind: str):
    if kind == "presence_absence":
        y, scores, _ = _presence_absence(300, 21)
    else:
        y, scores = _presence_only(60, 240, 21)
    got = site_intervals(kind, y, scores, n_resamples=250, seed=4)["auc"]
    naive = [
        roc_auc_score(y[i], scores[i])
        for i in site_resamples(kind, y, n_resamples=250, seed=4)
        if y[i].min() != y[i].max()
    ]
    assert len(naive) == 250
    np.testing.assert_allclose(got, percentile_interval(np.array(naive)), rtol=0, atol=1e-12)


def test_presence_only_resamples_are_stratified():
    y, _ = _presence_only(20, 100, 1)
    idx = site_resamples("presence_only", y, n_resamples=50, seed=0)
    assert idx.shape == (50, 120)
    assert (y[idx].sum(1) == 20).all()


@pytest.mark.parametrize("kind", ["presence_absence", "presence_only", "abundance"])
def test_site_intervals_contain_the_estimate_and_shrink_with_more_sites(kind: str):
    widths = []
    for n in (100, 1600):
        calls = None
        if kind == "presence_absence":
            y, scores, calls = _presence_absence(n, 5)
        elif kind == "presence_only":
            y, scores = _presence_only(n // 4, n, 5)
        else:
            y, scores = _abundance(n, 5)
        point = site_metrics(kind, y, scores, calls=calls)
        intervals = site_intervals(kind, y, scores, calls=calls)
        assert intervals.keys() == point.keys()
        for name, (low, high) in intervals.items():
            assert low <= point[name] <= high, name
        widths.append({name: high - low for name, (low, high) in intervals.items()})
    for name in widths[0]:
        assert widths[1][name] < 0.75 * widths[0][name], name


def test_site_intervals_without_calls_drop_nan_scores_and_are_seeded():
    y, scores, _ = _presence_absence(120, 3)
    with_nan = scores.copy()
    with_nan[:10] = np.nan
    got = site_intervals("presence_absence", y, with_nan, seed=2)
    assert set(got) == {"auc", "cor"}
    assert got == site_intervals("presence_absence", y[10:], scores[10:], seed=2)
    assert got != site_intervals("presence_absence", y[10:], scores[10:], seed=3)


def test_site_intervals_of_constant_scores():
    y = np.r_[np.ones(20), np.zeros(80)]
    got = site_intervals("presence_absence", y, np.full(100, 0.4), n_resamples=200)
    assert got["auc"] == (0.5, 0.5)
    assert all(math.isnan(v) for v in got["cor"])
    with pytest.raises(ValueError, match="unknown kind"):
        site_intervals("counts", y, y)
