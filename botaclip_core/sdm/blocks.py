"""Spatial blocks sized from the data's autocorrelation, and folds balanced in presences.

As blockCV's ``cv_spatial_autocor``: an empirical semivariogram of each leading principal
component of the predictors at the sites, a spherical model fitted to each, and the block size
the median of their ranges, so that held-out blocks are about as far from the training sites as
the predictors stay correlated.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit
from scipy.spatial.distance import pdist

from botaclip_core.errors import StageError

logger = logging.getLogger(__name__)

#: Sites used for the variograms (a seeded subsample beyond this).
MAX_VARIOGRAM_POINTS = 2000
#: Equal-width distance bins of the empirical semivariograms, up to half the largest distance.
N_LAGS = 20
#: A variogram whose structured part (partial sill) is below this share of the sill is pure
#: nugget: no spatial structure that the lags resolve, its range the smallest lag.
PURE_NUGGET_SHARE = 0.1
#: Each step of the search for a block size that gives enough blocks shrinks it by this factor.
SHRINK = 0.95
METHOD = "median range of spherical variograms of the first k components"


def block_ids(xy: np.ndarray, size: float) -> np.ndarray:
    """Integer id of the square block (side ``size``, grid anchored at 0) holding each point."""
    keys = np.floor(np.asarray(xy, dtype=float) / size).astype(np.int64)
    _, ids = np.unique(keys, axis=0, return_inverse=True)
    return np.asarray(ids.reshape(-1), dtype=np.int64)


def spherical(h: np.ndarray, nugget: float, psill: float, range_: float) -> np.ndarray:
    """Spherical semivariogram: rises as 1.5 h/a − 0.5 (h/a)³ to the sill at the range ``a``."""
    r = np.minimum(np.asarray(h, dtype=float) / range_, 1.0)
    return np.asarray(nugget + psill * (1.5 * r - 0.5 * r**3), dtype=float)


def exponential(h: np.ndarray, nugget: float, psill: float, scale: float) -> np.ndarray:
    """Exponential semivariogram; its practical range (95% of the sill) is ``3 · scale``."""
    return np.asarray(nugget + psill * (1.0 - np.exp(-np.asarray(h, dtype=float) / scale)))


def empirical_variogram(
    distances: np.ndarray, z: np.ndarray, cutoff: float, *, n_lags: int = N_LAGS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binned semivariance ½·mean((z_i − z_j)²) of the point pairs closer than ``cutoff``.

    Args:
        distances: condensed pairwise distances (``scipy.spatial.distance.pdist`` order).
        z: the variable at the points.
        cutoff: largest distance binned.
        n_lags: equal-width bins over ``[0, cutoff]``.

    Returns:
        Mean distance, semivariance and number of pairs of each non-empty bin.
    """
    half_sq = 0.5 * pdist(np.asarray(z, dtype=float)[:, None], "sqeuclidean")
    near = distances <= cutoff
    d, g = distances[near], half_sq[near]
    bins = np.minimum((d / cutoff * n_lags).astype(np.int64), n_lags - 1)
    n = np.bincount(bins, minlength=n_lags)
    with np.errstate(invalid="ignore"):
        lag = np.bincount(bins, weights=d, minlength=n_lags) / n
        gamma = np.bincount(bins, weights=g, minlength=n_lags) / n
    ok = n > 0
    return lag[ok], gamma[ok], n[ok]


def fit_range(lag: np.ndarray, gamma: np.ndarray, n_pairs: np.ndarray) -> tuple[float, str]:
    """Range of a spherical model fitted to an empirical semivariogram.

    Weighted least squares with weights ``N_j / h_j²`` (gstat's default, ``fit.method = 7``).
    When the spherical fit fails, an exponential one gives its practical range ``3a``. A pure
    nugget variogram (see :data:`PURE_NUGGET_SHARE`), or a range below the smallest lag, gives
    the smallest lag: the data resolve no structure below it.

    Returns:
        The range in the units of ``lag``, and the model that gave it (``spherical``,
        ``exponential`` or ``nugget``).
    """
    smallest = float(lag[0])
    if len(lag) < 3 or not np.ptp(gamma) > 0:
        return smallest, "nugget"
    sigma = np.maximum(lag, smallest) / np.sqrt(n_pairs)
    top = float(lag[-1])
    p0 = [float(gamma[0]), float(np.ptp(gamma)), top / 2.0]
    bounds = ([0.0, 0.0, smallest * 1e-3], [np.inf, np.inf, 2.0 * top])
    for model, factor, name in ((spherical, 1.0, "spherical"), (exponential, 3.0, "exponential")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                params, _ = curve_fit(
                    model, lag, gamma, p0=p0, sigma=sigma, bounds=bounds, maxfev=5000
                )
        except (RuntimeError, ValueError):
            continue
        nugget, psill, scale = (float(v) for v in params)
        if psill < PURE_NUGGET_SHARE * (nugget + psill):
            return smallest, "nugget"
        return max(factor * scale, smallest), name
    return smallest, "nugget"


def autocorrelation_range(
    xy: np.ndarray, X: np.ndarray, *, n_components: int = 5, seed: int = 0
) -> dict[str, Any]:
    """Spatial autocorrelation range of the predictors, as blockCV's ``cv_spatial_autocor``.

    Args:
        xy: site coordinates in metres (a projected CRS), shape ``(n, 2)``.
        X: predictors at the sites, already projected by PCA (leading components first).
        n_components: leading columns of ``X`` given a variogram each.
        seed: seeds the subsample of at most :data:`MAX_VARIOGRAM_POINTS` sites.

    Returns:
        ``range_m`` (median of the ranges), ``ranges_m`` (one per component), ``models``
        (``spherical``, ``exponential`` or ``nugget`` per component), ``method``, ``n_points``
        ``cutoff_m`` (half the largest distance between the points used) and
        ``smallest_lag_m`` (mean distance of the pairs in the first lag bin).

    Raises:
        StageError: with fewer than three distinct sites, or no component that varies.
    """
    xy = np.asarray(xy, dtype=float)
    X = np.asarray(X, dtype=float).reshape(len(xy), -1)
    ok = np.isfinite(xy).all(1) & np.isfinite(X).all(1)
    xy, X = xy[ok], X[ok]
    if len(xy) > MAX_VARIOGRAM_POINTS:
        keep = np.sort(
            np.random.default_rng(seed).choice(len(xy), MAX_VARIOGRAM_POINTS, replace=False)
        )
        xy, X = xy[keep], X[keep]
    if len(np.unique(xy, axis=0)) < 3:
        raise StageError(
            f"the block size cannot be derived from {len(xy)} site(s) at fewer than three "
            "places; set downstream.block_size_m to a size in metres"
        )
    distances = pdist(xy)
    cutoff = float(distances.max()) / 2.0
    ranges: list[float] = []
    models: list[str] = []
    smallest = float("nan")
    for k in range(min(n_components, X.shape[1])):
        if not np.ptp(X[:, k]) > 0:
            continue
        lag, gamma, n_pairs = empirical_variogram(distances, X[:, k], cutoff)
        smallest = float(lag[0])
        value, model = fit_range(lag, gamma, n_pairs)
        ranges.append(value)
        models.append(model)
    if not ranges:
        raise StageError(
            "the predictors do not vary over the sites, so no variogram can size the blocks; "
            "set downstream.block_size_m to a size in metres"
        )
    info = {
        "range_m": float(np.median(ranges)),
        "ranges_m": ranges,
        "models": models,
        "method": METHOD,
        "n_points": len(xy),
        "cutoff_m": cutoff,
        "smallest_lag_m": smallest,
    }
    logger.info("autocorrelation range %.0f m (components: %s)", info["range_m"], ranges)
    return info


def block_size(
    xy: np.ndarray,
    X: np.ndarray,
    *,
    minimum: float,
    folds: int = 5,
    n_components: int = 5,
    seed: int = 0,
) -> tuple[float, dict[str, Any]]:
    """Block side from the autocorrelation range: at least ``minimum``, and small enough for folds.

    Starting from the range, the size shrinks by :data:`SHRINK` until the sites fall in at
    least ``2 × folds`` blocks; it never goes below ``minimum`` (one embedding cell), which wins
    when even that leaves fewer blocks.

    Args:
        xy: site coordinates in metres.
        X: PCA-projected predictors at the sites.
        minimum: smallest block side (the embedding resolution), in metres.
        folds: cross-validation folds the blocks are shared among.
        n_components: leading components given a variogram each.
        seed: seeds the variogram subsample.

    Returns:
        The block side in metres and what it came from: the keys of
        :func:`autocorrelation_range` plus ``block_size_m``, ``minimum_m``, ``n_blocks`` and
        ``limited_by`` (``range``, ``minimum`` or ``folds``).
    """
    if not minimum > 0:
        raise ValueError(f"minimum must be a positive size in metres, got {minimum!r}")
    info = autocorrelation_range(xy, X, n_components=n_components, seed=seed)
    size, limited_by = float(info["range_m"]), "range"
    if size <= minimum:
        size, limited_by = float(minimum), "minimum"
    xy = np.asarray(xy, dtype=float)
    needed = 2 * folds
    n_blocks = len(np.unique(block_ids(xy, size)))
    while n_blocks < needed and size > minimum:
        size, limited_by = max(size * SHRINK, float(minimum)), "folds"
        n_blocks = len(np.unique(block_ids(xy, size)))
    if n_blocks < needed:
        if size <= minimum:
            limited_by = "minimum"
        logger.warning(
            "%d spatial blocks of %.0f m for %d folds (wanted %d)", n_blocks, size, folds, needed
        )
    info.update(block_size_m=size, minimum_m=float(minimum), n_blocks=n_blocks)
    info["limited_by"] = limited_by
    return size, info


def balanced_folds(
    blocks: np.ndarray, y: np.ndarray | None, n_folds: int, *, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Whole blocks assigned to folds so that each fold holds about as many presences.

    Blocks are taken in decreasing order of presences (``y > 0``; of sites when ``y`` is None),
    ties in a seeded random order, each to the fold with the fewest presences so far (ties: the
    fewest sites, then the first fold); blocks without presences go to the fold with the fewest
    absences (sites without presence). Presence counts of the folds then differ by at most the
    largest block's count, and every training part holds presences and absences.

    Args:
        blocks: block id of each site (:func:`block_ids`).
        y: observations of the sites, or None to balance sites.
        n_folds: folds wanted; fewer when there are fewer blocks.
        seed: seeds the order of blocks with equal counts.

    Returns:
        ``(train_idx, test_idx)`` per fold, like scikit-learn's splitters; every site is in
        exactly one test fold.

    Raises:
        StageError: when the sites fall in fewer than two blocks.
    """
    blocks = np.asarray(blocks).reshape(-1)
    ids, site_block = np.unique(blocks, return_inverse=True)
    if len(ids) < 2:
        raise StageError(
            f"all {len(blocks)} sites fall in one spatial block; lower downstream.block_size_m "
            "so that cross-validation can hold out space"
        )
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds!r}")
    weight = np.ones(len(blocks)) if y is None else (np.asarray(y).reshape(-1) > 0).astype(float)
    if len(weight) != len(blocks):
        raise ValueError(f"y has {len(weight)} sites but blocks has {len(blocks)}")
    presences = np.bincount(site_block, weights=weight, minlength=len(ids))
    sites = np.bincount(site_block, minlength=len(ids))
    n_folds = min(n_folds, len(ids))
    shuffled = np.random.default_rng(seed).permutation(len(ids))
    order = shuffled[np.argsort(-presences[shuffled], kind="stable")]
    fold_presences, fold_sites = np.zeros(n_folds), np.zeros(n_folds, dtype=np.int64)
    fold_of_block = np.empty(len(ids), dtype=np.int64)
    for b in order:
        if presences[b] > 0 or y is None:
            fold = int(np.lexsort((np.arange(n_folds), fold_sites, fold_presences))[0])
        else:
            # a block of absences (or background) only changes no fold's presences: it goes
            # where the absences are fewest, so that no training part is left without any
            absences = fold_sites - fold_presences
            fold = int(np.lexsort((np.arange(n_folds), fold_presences, absences))[0])
        fold_of_block[b] = fold
        fold_presences[fold] += presences[b]
        fold_sites[fold] += sites[b]
    fold_of_site = fold_of_block[site_block]
    return [
        (np.flatnonzero(fold_of_site != f), np.flatnonzero(fold_of_site == f))
        for f in range(n_folds)
    ]
