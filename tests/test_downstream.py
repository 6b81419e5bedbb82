import numpy as np
import pytest

from botaclip_core.catalog import DownstreamSettings
from botaclip_core.downstream import (
    boyce_index,
    evaluate_abundance,
    evaluate_presence_absence,
    evaluate_presence_only,
    spatial_blocks,
    true_skill_statistic,
)
from botaclip_core.errors import StageError

RNG = np.random.default_rng(0)
N, D = 300, 16
XY = RNG.uniform(0, 1000, size=(N, 2))
X = RNG.normal(size=(N, D))
SETTINGS = DownstreamSettings(folds=4, pca_components=None, min_presences=5, C=1.0)


def test_spatial_blocks_group_neighbours():
    ids = spatial_blocks(np.array([[0, 0], [10, 10], [260, 0], [0, 260]]), 250)
    assert ids[0] == ids[1] and len(set(ids)) == 3


def test_presence_absence_learns_signal_and_not_noise():
    Y = np.column_stack(
        [(X[:, 0] + 0.3 * RNG.normal(size=N)) > 0, (X[:, 1] > 0.5), RNG.random(N) > 0.5]
    ).astype(float)
    scores = evaluate_presence_absence(X, Y, XY, ["a", "b", "noise"], SETTINGS, block_size=200)
    assert scores.n_targets == 3
    assert scores.per_target["a"]["auc"] > 0.9 and scores.per_target["b"]["auc"] > 0.85
    assert 0.3 < scores.per_target["noise"]["auc"] < 0.7
    assert 0 <= scores.metrics["tss"] <= 1


def test_rare_species_are_skipped():
    Y = np.zeros((N, 1))
    Y[:3, 0] = 1
    assert evaluate_presence_absence(X, Y, XY, ["rare"], SETTINGS, block_size=200).n_targets == 0


def test_presence_only_against_background():
    bg = RNG.normal(size=(400, D))
    bg_xy = RNG.uniform(0, 1000, size=(400, 2))
    pres = RNG.normal(size=(80, D)) + np.r_[2.0, np.zeros(D - 1)]
    Y = np.ones((80, 1))
    scores = evaluate_presence_only(
        pres, Y, RNG.uniform(0, 1000, (80, 2)), bg, bg_xy, ["sp"], SETTINGS, block_size=200
    )
    assert scores.per_target["sp"]["auc"] > 0.8 and scores.per_target["sp"]["boyce"] > 0.5


def test_abundance_spearman():
    Y = np.column_stack(
        [np.exp(X[:, 2] + 0.2 * RNG.normal(size=N)).round(), RNG.poisson(3, N)]
    ).astype(float)
    scores = evaluate_abundance(X, Y, XY, ["signal", "noise"], SETTINGS, block_size=200)
    assert scores.per_target["signal"]["spearman"] > 0.7
    assert abs(scores.per_target["noise"]["spearman"]) < 0.3


def test_metrics_against_hand_values():
    y = np.array([0, 0, 1, 1])
    assert true_skill_statistic(y, np.array([0.1, 0.2, 0.8, 0.9])) == pytest.approx(1.0)
    assert true_skill_statistic(y, np.array([0.9, 0.8, 0.1, 0.2])) == pytest.approx(0.0)
    bg = np.linspace(0, 1, 1000)
    assert boyce_index(np.sqrt(np.linspace(0, 1, 500)), bg) > 0.9  # presence density ∝ suitability
    assert boyce_index(1 - np.sqrt(np.linspace(0, 1, 500)), bg) < -0.9


def test_one_block_is_an_error():
    Y = (X[:, :1] > 0).astype(float)
    with pytest.raises(StageError, match="block_size_m"):
        evaluate_presence_absence(X, Y, XY, ["a"], SETTINGS, block_size=1e6)
