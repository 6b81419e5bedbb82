"""Block sizes from variograms of simulated fields, and presence-balanced block folds."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from botaclip_core.downstream import spatial_blocks
from botaclip_core.errors import StageError
from botaclip_core.sdm.blocks import (
    MAX_VARIOGRAM_POINTS,
    autocorrelation_range,
    balanced_folds,
    block_ids,
    block_size,
    empirical_variogram,
    fit_range,
    spherical,
)


def _spherical_field(
    n: int, range_m: float, k: int, seed: int, *, side: float = 1500.0, nugget: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """``k`` independent Gaussian random fields with a spherical covariance, at ``n`` points."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0.0, side, (n, 2))
    r = np.minimum(cdist(xy, xy) / range_m, 1.0)
    cov = (1.0 - nugget) * (1.0 - (1.5 * r - 0.5 * r**3)) + nugget * np.eye(n)
    chol = np.linalg.cholesky(cov + 1e-8 * np.eye(n))
    return xy, chol @ rng.standard_normal((n, k))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_range_of_a_simulated_field_is_within_30_percent(seed: int):
    xy, X = _spherical_field(600, 300.0, 5, seed)
    info = autocorrelation_range(xy, X, seed=seed)
    assert info["range_m"] == pytest.approx(300.0, rel=0.3)
    assert len(info["ranges_m"]) == 5 and info["range_m"] == np.median(info["ranges_m"])
    assert info["method"] == "median range of spherical variograms of the first k components"


def test_range_survives_a_large_nugget():
    xy, X = _spherical_field(600, 300.0, 5, 4, nugget=0.5)
    assert autocorrelation_range(xy, X)["range_m"] == pytest.approx(300.0, rel=0.3)


def test_white_noise_has_the_smallest_lag_as_range_and_many_sites_are_subsampled():
    rng = np.random.default_rng(3)
    xy = rng.uniform(0.0, 1500.0, (MAX_VARIOGRAM_POINTS + 300, 2))
    info = autocorrelation_range(xy, rng.standard_normal((len(xy), 5)))
    assert info["n_points"] == MAX_VARIOGRAM_POINTS
    assert info["range_m"] == pytest.approx(info["smallest_lag_m"])
    assert info["range_m"] < 60.0  # bins of 1/20 of ~1,000 m
    assert info["models"].count("nugget") >= 3  # one noisy component may look structured


def test_only_the_first_components_count():
    xy, X = _spherical_field(600, 300.0, 2, 0)
    noise = np.random.default_rng(0).standard_normal((600, 3))
    info = autocorrelation_range(xy, np.hstack([X, noise]), n_components=2)
    assert len(info["ranges_m"]) == 2
    assert info["range_m"] == pytest.approx(300.0, rel=0.3)
    assert autocorrelation_range(xy, np.hstack([noise, X]), n_components=2)["range_m"] < 60.0


def test_spherical_fit_recovers_an_exact_model():
    lag = np.linspace(10.0, 1000.0, 20)
    gamma = spherical(lag, 0.2, 0.8, 420.0)
    assert fit_range(lag, gamma, np.full(20, 500)) == (pytest.approx(420.0, rel=1e-3), "spherical")


def test_empirical_variogram_against_a_naive_pair_loop():
    rng = np.random.default_rng(5)
    xy, z = rng.uniform(0, 100, (40, 2)), rng.standard_normal(40)
    from scipy.spatial.distance import pdist

    lag, gamma, n = empirical_variogram(pdist(xy), z, 50.0, n_lags=5)
    sums, counts, dist = np.zeros(5), np.zeros(5), np.zeros(5)
    for i in range(40):
        for j in range(i + 1, 40):
            d = float(np.hypot(*(xy[i] - xy[j])))
            if d <= 50.0:
                b = min(int(d / 10.0), 4)
                sums[b] += 0.5 * (z[i] - z[j]) ** 2
                counts[b] += 1
                dist[b] += d
    np.testing.assert_allclose(gamma, sums / counts)
    np.testing.assert_allclose(lag, dist / counts)
    np.testing.assert_array_equal(n, counts)


def test_block_size_is_the_range_above_the_minimum():
    xy, X = _spherical_field(600, 300.0, 5, 1)
    size, info = block_size(xy, X, minimum=10.0, folds=5)
    assert size == info["block_size_m"] == info["range_m"]
    assert info["limited_by"] == "range" and info["n_blocks"] >= 10
    size, info = block_size(xy, X, minimum=400.0, folds=3)
    assert size == 400.0 and info["limited_by"] == "minimum"
    assert info["range_m"] < 400.0


def test_block_size_never_below_the_minimum_for_white_noise():
    rng = np.random.default_rng(2)
    xy = rng.uniform(0.0, 1500.0, (800, 2))
    size, info = block_size(xy, rng.standard_normal((800, 3)), minimum=100.0, folds=5)
    assert size == 100.0 and info["limited_by"] == "minimum" and info["minimum_m"] == 100.0


def test_block_size_shrinks_until_there_are_two_blocks_per_fold():
    xy, X = _spherical_field(300, 900.0, 5, 3, side=1500.0)
    size, info = block_size(xy, X, minimum=10.0, folds=5)
    assert info["range_m"] > 600.0
    assert size < info["range_m"] and info["limited_by"] == "folds"
    assert len(np.unique(block_ids(xy, size))) >= 10 == 2 * 5
    assert len(np.unique(block_ids(xy, size / 0.95))) < 10  # the largest such size
    # the minimum still wins over the folds
    size, info = block_size(xy, X, minimum=800.0, folds=10)
    assert size == 800.0 and info["limited_by"] == "minimum" and info["n_blocks"] < 20


def test_block_size_errors_name_the_setting():
    with pytest.raises(StageError, match="downstream.block_size_m"):
        autocorrelation_range(np.zeros((10, 2)), np.random.default_rng(0).random((10, 2)))
    with pytest.raises(StageError, match="downstream.block_size_m"):
        autocorrelation_range(np.random.default_rng(0).random((10, 2)), np.ones((10, 2)))


def test_block_ids_equal_the_downstream_blocks():
    xy = np.random.default_rng(0).uniform(-5000, 5000, (500, 2))
    np.testing.assert_array_equal(block_ids(xy, 700.0), spatial_blocks(xy, 700.0))


def _blocks_and_presences(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0.0, 3000.0, (400, 2))
    y = (rng.random(400) < 0.1 + 0.5 * (xy[:, 0] > 2000)).astype(int)  # clustered presences
    return block_ids(xy, 400.0), y


@pytest.mark.parametrize("seed", range(4))
def test_folds_are_balanced_disjoint_and_complete(seed: int):
    blocks, y = _blocks_and_presences(seed)
    folds = balanced_folds(blocks, y, 5, seed=seed)
    assert len(folds) == 5
    tests = np.concatenate([test for _, test in folds])
    np.testing.assert_array_equal(np.sort(tests), np.arange(len(y)))  # each site once
    per_block = np.bincount(np.unique(blocks, return_inverse=True)[1], weights=y)
    counts = [y[test].sum() for _, test in folds]
    assert max(counts) - min(counts) <= per_block.max()
    for train, test in folds:
        assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == len(y)
        assert not set(blocks[train]) & set(blocks[test])  # whole blocks


def test_folds_follow_the_greedy_rule_on_a_known_case():
    # blocks of 5, 4, 3, 3 and 1 presences into 2 folds: 5 | 4, then 3 to the 4 (7), 3 to the
    # 5 (8), 1 to the 7: 8 and 8
    presences = [5, 4, 3, 3, 1]
    blocks = np.repeat(np.arange(5), 6)
    y = np.concatenate([np.r_[np.ones(k), np.zeros(6 - k)] for k in presences])
    folds = balanced_folds(blocks, y, 2, seed=0)
    assert sorted(y[test].sum() for _, test in folds) == [8, 8]
    groups = sorted(sorted({int(blocks[i]) for i in test}) for _, test in folds)
    assert groups == [[0, 3], [1, 2, 4]]


def test_folds_without_y_balance_sites_and_are_seeded():
    blocks = np.repeat(np.arange(12), np.arange(1, 13))
    folds = balanced_folds(blocks, None, 4, seed=1)
    sizes = [len(test) for _, test in folds]
    assert max(sizes) - min(sizes) <= 12
    again = balanced_folds(blocks, None, 4, seed=1)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again, strict=True))


def test_fewer_blocks_than_folds_and_one_block():
    folds = balanced_folds(np.array([0, 0, 1, 1, 2]), np.array([1, 0, 1, 0, 1]), 5)
    assert len(folds) == 3
    with pytest.raises(StageError, match="downstream.block_size_m"):
        balanced_folds(np.zeros(10, dtype=int), np.ones(10), 5)
