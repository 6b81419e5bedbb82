"""Percentile bootstrap intervals of SDM scores: over species, over sites, and paired sources.

Every interval is a 95% (``level``) percentile interval of 1,000 seeded resamples
(``np.random.default_rng(seed)``). Resampling sites never recomputes a metric per resample in
Python: a resample is a row of counts (how often each site was drawn), and every metric is
written as a function of those counts, so that all resamples are scored at once with array
operations. Each resample's value is the metric of :mod:`botaclip_core.sdm.metrics` on the
resampled sites (the tests check this against a loop over the same resamples).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.special import xlogy
from scipy.stats import wilcoxon

from botaclip_core.sdm.metrics import BOYCE_RESOLUTION

#: The metrics of each kind of data, in the order :func:`site_intervals` reports them.
SITE_METRICS: dict[str, tuple[str, ...]] = {
    "presence_absence": ("auc", "tss", "kappa", "cor"),
    "presence_only": ("auc", "boyce"),
    "abundance": ("spearman", "r2", "deviance_explained"),
}

_NAN_INTERVAL = (float("nan"), float("nan"))


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of ``samples``, ignoring NaNs.

    Args:
        samples: bootstrap replicates (any shape; flattened).
        level: coverage of the interval, in (0, 1).

    Returns:
        ``(low, high)``; ``(nan, nan)`` when no sample is finite or NaN.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    values = np.asarray(samples, dtype=float).ravel()
    values = values[~np.isnan(values)]
    if not len(values):
        return _NAN_INTERVAL
    tail = 50.0 * (1.0 - level)
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def _resampled_means(values: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_resamples, len(values)))
    # shifted by one of the values, so that the mean of a constant is that constant exactly
    shift = values[0]
    return np.asarray(shift + (values - shift)[idx].mean(axis=1), dtype=float)


def mean_interval(
    values: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (species of a task, say).

    Args:
        values: one score per species; NaNs are dropped first.
        n_resamples: bootstrap resamples.
        seed: seeds ``np.random.default_rng``.
        level: coverage of the interval.

    Returns:
        ``(low, high)``; ``(nan, nan)`` with fewer than two values.
    """
    x = np.asarray(values, dtype=float).ravel()
    x = x[~np.isnan(x)]
    if len(x) < 2:
        return _NAN_INTERVAL
    return percentile_interval(_resampled_means(x, n_resamples, seed), level)


def site_resamples(
    kind: str, y: np.ndarray, *, n_resamples: int = 1000, seed: int = 0
) -> np.ndarray:
    """The site indices of each bootstrap resample that :func:`site_intervals` scores.

    ``presence_only`` resamples presences (``y == 1``) and background (``y == 0``) separately,
    presences first in each row; the other kinds resample all sites together.

    Args:
        kind: ``presence_absence``, ``presence_only`` or ``abundance``.
        y: observations of the sites.
        n_resamples: bootstrap resamples.
        seed: seeds ``np.random.default_rng``.

    Returns:
        ``(n_resamples, n_sites)`` integer indices into ``y``.
    """
    _check_kind(kind)
    y = np.asarray(y).ravel()
    rng = np.random.default_rng(seed)
    if kind != "presence_only":
        return rng.integers(0, len(y), size=(n_resamples, len(y)))
    presences, background = np.flatnonzero(y > 0), np.flatnonzero(y <= 0)
    return np.hstack(
        [
            presences[rng.integers(0, len(presences), size=(n_resamples, len(presences)))],
            background[rng.integers(0, len(background), size=(n_resamples, len(background)))],
        ]
    )


def site_metrics(
    kind: str, y: np.ndarray, scores: np.ndarray, *, calls: np.ndarray | None = None
) -> dict[str, float]:
    """The metrics of all the sites, computed as :func:`site_intervals` computes each resample.

    Equal (to rounding) to :mod:`botaclip_core.sdm.metrics` on the same data; given for checks
    and for point estimates that must match the intervals' arithmetic.

    Args:
        kind: ``presence_absence``, ``presence_only`` or ``abundance``.
        y: observations (0/1, or counts for abundance).
        scores: predictions at the sites.
        calls: presence calls (0/1) of ``presence_absence``; without them TSS and kappa are
            left out.

    Returns:
        Metric name → value.
    """
    y, scores, calls = _clean(kind, y, scores, calls)
    values = _score_resamples(kind, y, scores, calls, np.arange(len(y))[None, :])
    return {name: float(v[0]) for name, v in values.items()}


def site_intervals(
    kind: str,
    y: np.ndarray,
    scores: np.ndarray,
    *,
    calls: np.ndarray | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of one species' metrics, resampling its sites.

    ``presence_absence``: ``auc``, ``tss`` and ``kappa`` of the fixed ``calls`` (made at
    thresholds chosen on training folds, so not re-chosen per resample) and ``cor``; resamples
    with one class only are dropped. ``presence_only``: presences and background resampled
    separately (stratified); ``auc`` and ``boyce``. ``abundance``: ``spearman``, ``r2`` on
    log(1 + abundance) and ``deviance_explained`` (Poisson D²); resamples whose observations are
    all equal are dropped (every metric is undefined there). Sites with a NaN score (or call)
    are dropped before resampling. A metric undefined on a resample (a constant score's
    correlation, a Boyce index with too few windows) is left out of that metric's interval.

    Args:
        kind: ``presence_absence``, ``presence_only`` or ``abundance``.
        y: observations: 0/1 (presence_only: 1 presence, 0 background), or counts.
        scores: predictions at the sites (probability, suitability or abundance).
        calls: presence calls (0/1) for ``presence_absence``; without them TSS and kappa are
            left out.
        n_resamples: bootstrap resamples.
        seed: seeds ``np.random.default_rng`` (see :func:`site_resamples`).
        level: coverage of the intervals.

    Returns:
        Metric name → ``(low, high)``.
    """
    y, scores, calls = _clean(kind, y, scores, calls)
    names = _metric_names(kind, calls)
    if kind == "presence_only" and (not (y == 1).any() or not (y == 0).any()):
        return dict.fromkeys(names, _NAN_INTERVAL)
    if not len(y):
        return dict.fromkeys(names, _NAN_INTERVAL)
    idx = site_resamples(kind, y, n_resamples=n_resamples, seed=seed)
    values = _score_resamples(kind, y, scores, calls, idx)
    return {name: percentile_interval(values[name], level) for name in names}


def paired_comparison(
    a: Mapping[str, float],
    b: Mapping[str, float],
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Paired comparison of two feature sources over the species both scored.

    Args:
        a: species → score of source A (NaN: not scored).
        b: species → score of source B.
        n_resamples: bootstrap resamples (over species) of the mean difference.
        seed: seeds ``np.random.default_rng``.
        level: coverage of the interval.

    Returns:
        ``n_species``; ``mean_difference`` (A − B) with its percentile bootstrap interval
        ``ci_low``/``ci_high``; ``p_value`` of the two-sided Wilcoxon signed-rank test
        (``scipy.stats.wilcoxon``, zero differences dropped; 1.0 when every difference is zero,
        NaN with fewer than two species); ``n_better`` (A > B) and ``n_worse`` (A < B).
    """
    species = sorted(
        s for s in set(a) & set(b) if not (np.isnan(float(a[s])) or np.isnan(float(b[s])))
    )
    diff = np.array([float(a[s]) - float(b[s]) for s in species], dtype=float)
    n = len(diff)
    if n < 2:
        p_value = float("nan")
    elif not diff.any():
        p_value = 1.0
    else:
        p_value = float(wilcoxon(diff, alternative="two-sided").pvalue)
    low, high = mean_interval(diff, n_resamples=n_resamples, seed=seed, level=level)
    return {
        "n_species": n,
        "mean_difference": float(diff.mean()) if n else float("nan"),
        "ci_low": low,
        "ci_high": high,
        "p_value": p_value,
        "n_better": int((diff > 0).sum()),
        "n_worse": int((diff < 0).sum()),
    }


# ---------------------------------------------------------------------------------------------
# Metrics of weighted sites. ``w`` is (resamples, sites): how often each site was drawn, with
# the sites in the order of their scores (a ``_Layout``), so that ranks and window counts are
# cumulative sums and per-site sums are one matrix product.

#: Resamples scored at once are limited to this many (resample, site) cells (memory).
_CHUNK_CELLS = 1 << 21


def _check_kind(kind: str) -> None:
    if kind not in SITE_METRICS:
        raise ValueError(f"unknown kind {kind!r}; use one of {tuple(SITE_METRICS)}")


def _metric_names(kind: str, calls: np.ndarray | None) -> tuple[str, ...]:
    if kind == "presence_absence" and calls is None:
        return ("auc", "cor")
    return SITE_METRICS[kind]


def _clean(
    kind: str, y: np.ndarray, scores: np.ndarray, calls: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    _check_kind(kind)
    y = np.asarray(y, dtype=float).ravel()
    scores = np.asarray(scores, dtype=float).ravel()
    if len(y) != len(scores):
        raise ValueError(f"y has {len(y)} sites but scores has {len(scores)}")
    ok = ~np.isnan(scores) & ~np.isnan(y)
    if kind == "presence_absence" and calls is not None:
        calls = np.asarray(calls, dtype=float).ravel()
        if len(calls) != len(y):
            raise ValueError(f"y has {len(y)} sites but calls has {len(calls)}")
        ok &= ~np.isnan(calls)
        calls = (calls[ok] > 0).astype(float)
    else:
        calls = None
    y = y[ok]
    if kind != "abundance":
        y = (y > 0).astype(float)
    if kind == "abundance":
        scores = np.clip(scores, 1e-9, None)  # as abundance_metrics
    return y, scores[ok], calls


class _Layout:
    """Values in ascending order, with the run of equal values each position belongs to."""

    def __init__(self, values: np.ndarray) -> None:
        self.order = np.argsort(values, kind="stable")
        self.sorted = values[self.order]
        n = len(values)
        self.position = np.empty(n, dtype=np.intp)
        self.position[self.order] = np.arange(n)
        new = np.r_[True, self.sorted[1:] != self.sorted[:-1]]
        self.run_starts = np.flatnonzero(new)
        self.run_ends = np.flatnonzero(np.r_[new[1:], True])
        self.ties = len(self.run_starts) < n
        lengths = np.diff(np.r_[self.run_starts, n])
        self.start = np.repeat(self.run_starts, lengths)
        self.end = np.repeat(self.run_ends, lengths)

    def below_and_through(self, cum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per position: weight of smaller values and of values up to its own (``cum``: padded)."""
        if not self.ties:
            return cum[:-1], cum[1:]
        return cum[self.start], cum[self.end + 1]

    def tie_term(self, cum: np.ndarray) -> np.ndarray:
        """Σ (t³ − t) over runs of equal values, ``t`` the weight of a run (repeat draws tie)."""
        t = cum[self.run_ends + 1] - cum[self.run_starts]
        return np.asarray((t**3 - t).sum(0), dtype=float)

    def lowest_and_highest(self, cum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The smallest and largest value drawn in each resample (``cum``: padded, ``n + 1`` rows)."""
        n = len(self.sorted)
        first = np.minimum((cum[1:] == 0).sum(0), n - 1)
        last = n - (cum[1:] == cum[-1]).sum(0)
        return self.sorted[first], self.sorted[last]


def _cumulative(w: np.ndarray) -> np.ndarray:
    """Cumulative sums over sites (axis 0), with a leading row of zeros."""
    cum = np.zeros((w.shape[0] + 1, w.shape[1]))
    np.cumsum(w, axis=0, out=cum[1:])
    return cum


def _counts(positions: np.ndarray, n: int) -> np.ndarray:
    """``(n, resamples)``: how often each of ``n`` positions is drawn in each row of ``positions``."""
    n_rows = positions.shape[0]
    flat = positions * n_rows + np.arange(n_rows, dtype=np.intp)[:, None]
    return np.bincount(flat.ravel(), minlength=n * n_rows).reshape(n, n_rows).astype(float)


def _score_resamples(
    kind: str, y: np.ndarray, scores: np.ndarray, calls: np.ndarray | None, idx: np.ndarray
) -> dict[str, np.ndarray]:
    """Every metric of each resample (row of ``idx``), in chunks of resamples."""
    layout = _Layout(scores)
    ys = y[layout.order]
    cs = None if calls is None else calls[layout.order]
    step = max(1, _CHUNK_CELLS // max(1, len(y)))
    parts = [
        _score(kind, layout, ys, cs, _counts(layout.position[idx[i : i + step]], len(y)))
        for i in range(0, idx.shape[0], step)
    ]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _score(
    kind: str, layout: _Layout, y: np.ndarray, calls: np.ndarray | None, w: np.ndarray
) -> dict[str, np.ndarray]:
    """Metrics of each resample; ``w`` is (sites in ``layout`` order, resamples)."""
    if kind == "abundance":
        return _abundance(layout, y, w)
    pos = w * y[:, None]
    neg = w - pos
    cum_pos, cum_neg = _cumulative(pos), _cumulative(neg)
    n_pos, n_neg = cum_pos[-1], cum_neg[-1]
    below, through = layout.below_and_through(cum_neg)
    with np.errstate(divide="ignore", invalid="ignore"):
        # Mann–Whitney: presences above absences, ties counted half
        auc = 0.5 * (pos * (below + through)).sum(0) / (n_pos * n_neg)
    if kind == "presence_only":
        return {"auc": auc, "boyce": _boyce(layout, cum_pos, cum_neg)}
    out = {"auc": auc}
    yc = y - y.mean()
    sc = layout.sorted - layout.sorted.mean()
    columns = [yc, sc, yc * yc, sc * sc, yc * sc]
    if calls is not None:
        columns += [y * calls, (1 - y) * calls]
    sums = _weighted_sums(columns, w)
    total = n_pos + n_neg
    if calls is not None:
        tp, fp = sums[5], sums[6]
        fn, tn = n_pos - tp, n_neg - fp
        with np.errstate(divide="ignore", invalid="ignore"):
            out["tss"] = tp / n_pos + tn / n_neg - 1.0
            # as sklearn's cohen_kappa_score: 1 − observed / expected disagreement
            expected = (n_pos * (fn + tn) + n_neg * (tp + fp)) / total
            out["kappa"] = np.where(expected == 0, np.nan, 1.0 - (fp + fn) / expected)
    lowest, highest = layout.lowest_and_highest(cum_pos + cum_neg)
    cov = sums[4] - sums[0] * sums[1] / total
    var_y = sums[2] - sums[0] ** 2 / total
    var_s = sums[3] - sums[1] ** 2 / total
    with np.errstate(divide="ignore", invalid="ignore"):
        cor = np.clip(cov / np.sqrt(var_y * var_s), -1.0, 1.0)
    out["cor"] = np.where(lowest == highest, np.nan, cor)
    both = (n_pos > 0) & (n_neg > 0)
    return {name: np.where(both, v, np.nan) for name, v in out.items()}


def _abundance(layout: _Layout, observed: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """Spearman ρ, R² of log(1 + abundance) and Poisson D²; ``layout`` orders the predictions."""
    predicted = layout.sorted
    # midranks have mean (N + 1) / 2 and the tie-corrected sum of squares (N³ − N − Σ(t³ − t)) / 12
    cum = _cumulative(w)
    total = cum[-1]
    below, through = layout.below_and_through(cum)
    rank_pred = (below + through + 1.0) / 2.0
    ss_pred = (total**3 - total - layout.tie_term(cum)) / 12.0
    by_obs = _Layout(observed)
    cum = _cumulative(w[by_obs.order])
    below, through = by_obs.below_and_through(cum)
    rank_obs = np.empty_like(w)
    rank_obs[by_obs.order] = (below + through + 1.0) / 2.0
    ss_obs = (total**3 - total - by_obs.tie_term(cum)) / 12.0
    cross = (w * rank_obs * rank_pred).sum(0) - total * ((total + 1.0) / 2.0) ** 2
    log_obs, log_pred = np.log1p(observed), np.log1p(predicted)
    centred = log_obs - log_obs.mean()
    columns = [
        centred,
        centred * centred,
        (log_obs - log_pred) ** 2,
        observed,
        predicted,
        xlogy(observed, observed),
        xlogy(observed, predicted),
    ]
    sums = _weighted_sums(columns, w)
    varying = ss_obs > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(ss_pred > 0, np.clip(cross / np.sqrt(ss_obs * ss_pred), -1.0, 1.0), np.nan)
        r2 = 1.0 - sums[2] / (sums[1] - sums[0] ** 2 / total)
        # Poisson deviance Σ [y log(y/μ) − y + μ] of the predictions and of the resample's mean
        model = sums[5] - sums[6] - sums[3] + sums[4]
        null = sums[5] - xlogy(sums[3], sums[3] / total)
        d2 = 1.0 - model / null
    return {
        name: np.where(varying, v, np.nan)
        for name, v in (("spearman", rho), ("r2", r2), ("deviance_explained", d2))
    }


def _weighted_sums(columns: list[np.ndarray], w: np.ndarray) -> np.ndarray:
    """``Σ_sites w · column`` for each column and resample.

    One vector product per column: a thin matrix product goes to multi-threaded BLAS, many
    times slower on a busy machine.
    """
    return np.stack([column @ w for column in columns])


def _boyce(layout: _Layout, cum_pos: np.ndarray, cum_neg: np.ndarray) -> np.ndarray:
    """The continuous Boyce index of each resample, step by step as ``metrics.boyce_index``.

    ``cum_pos``/``cum_neg``: padded cumulative weights of presences and background over the
    sites in ``layout`` (ascending score) order, one column per resample.
    """
    ordered = layout.sorted
    n_pres, n_bg = cum_pos[-1][:, None], cum_neg[-1][:, None]
    p_min, p_max = layout.lowest_and_highest(cum_pos)
    b_min, b_max = layout.lowest_and_highest(cum_neg)
    lo, hi = np.minimum(b_min, p_min), np.maximum(b_max, p_max)
    width = (b_max - b_min) / 10.0
    starts = _linspace_rows(lo, hi - width, BOYCE_RESOLUTION + 1)
    starts[:, -1] += 1.0
    ends = starts + width[:, None]
    # closed windows [start, end]: weights up to the end minus weights below the start
    upper = np.searchsorted(ordered, ends, "right")
    lower = np.searchsorted(ordered, starts, "left")
    column = np.arange(cum_pos.shape[1])[:, None]
    in_pres = cum_pos[upper, column] - cum_pos[lower, column]
    in_bg = cum_neg[upper, column] - cum_neg[lower, column]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.round((in_pres / n_pres) / (in_bg / n_bg), 10)
    kept = ~np.isnan(ratio)
    n_rows, m = ratio.shape
    # each kept ratio against the next kept one (the last against 1): the ends of runs survive
    positions = np.where(kept, np.arange(m), m)
    following = np.minimum.accumulate(positions[:, ::-1], axis=1)[:, ::-1]
    following = np.hstack([following[:, 1:], np.full((n_rows, 1), m)])
    padded = np.hstack([ratio, np.ones((n_rows, 1))])
    keep = kept & (ratio != np.take_along_axis(padded, following, 1))
    valid = (kept.sum(1) >= 2) & (keep.sum(1) >= 2)
    valid &= np.where(keep, ratio, np.inf).min(1) != np.where(keep, ratio, -np.inf).max(1)
    rho = _pearson_rows(_row_midranks(ratio, keep), _row_midranks(starts, keep), keep)
    return np.where(valid, rho, np.nan)


def _linspace_rows(start: np.ndarray, stop: np.ndarray, num: int) -> np.ndarray:
    """``np.linspace(start[r], stop[r], num)`` for every row ``r``, rounded as numpy's scalar one.

    ``np.linspace`` of arrays switches every row to its zero-step arithmetic when any row has a
    zero step, which rounds the others differently from their scalar calls.
    """
    steps = np.arange(num, dtype=float)
    delta = stop - start
    step = delta / (num - 1)
    y = np.where((step == 0)[:, None], (steps / (num - 1)) * delta[:, None], steps * step[:, None])
    y += start[:, None]
    y[:, -1] = stop
    return y


def _row_midranks(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Rank (ties: the mean rank) of each masked entry among the masked entries of its row."""
    # unmasked entries sort last; infinities become the largest finite numbers, as sorting
    # with NaN or inf in the keys is many times slower
    big = np.finfo(float).max
    key = np.where(mask, np.clip(values, -big, big), np.inf)
    order = np.argsort(key, axis=1)  # ties share their mean rank: any order of them will do
    ordered = np.take_along_axis(key, order, 1)
    m = values.shape[1]
    index = np.broadcast_to(np.arange(m), values.shape)
    new = np.ones(values.shape, dtype=bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    last = np.ones(values.shape, dtype=bool)
    last[:, :-1] = new[:, 1:]
    first_of_run = np.maximum.accumulate(np.where(new, index, 0), axis=1)
    last_of_run = np.minimum.accumulate(np.where(last, index, m)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty(values.shape)
    np.put_along_axis(ranks, order, (first_of_run + last_of_run) / 2.0 + 1.0, 1)
    return ranks


def _pearson_rows(x: np.ndarray, z: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Pearson correlation of ``x`` and ``z`` over the masked entries of each row."""
    w = mask.astype(float)
    total = w.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        xc = np.where(mask, x - (w * x).sum(1)[:, None] / total[:, None], 0.0)
        zc = np.where(mask, z - (w * z).sum(1)[:, None] / total[:, None], 0.0)
        sxx, szz = (xc * xc).sum(1), (zc * zc).sum(1)
        r = (xc * zc).sum(1) / np.sqrt(sxx * szz)
    return np.where((sxx > 0) & (szz > 0), np.clip(r, -1.0, 1.0), np.nan)
