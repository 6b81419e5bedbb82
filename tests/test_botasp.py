import json
import math

import numpy as np
import pytest
import torch

from botaclip_core.botasp import (
    load_botasp,
    load_botasp_adapter,
    mean_species_auc,
    train_botasp,
)
from botaclip_core.catalog import FinetuneSettings
from botaclip_core.errors import StageError, WeightsError
from botaclip_core.finetune import TrainingData, spatial_split, train_adapter
from botaclip_core.models import Adapter


def make_data(n=96, views=2, dim=16, n_species=12, seed=0) -> TrainingData:
    """Features that are a noisy linear function of which species are present."""
    rng = np.random.default_rng(seed)
    releves = (rng.random((n, n_species)) < 0.3) * rng.uniform(1, 50, (n, n_species))
    mixing = rng.normal(size=(n_species, dim))
    base = (releves > 0) @ mixing
    features = base[:, None, :] + 0.5 * rng.normal(size=(n, views, dim))
    coords = rng.uniform(0, 1000, size=(n, 2))
    species = [f"sp{i}" for i in range(n_species)]
    return TrainingData(features.astype(np.float32), releves.astype(np.float32), coords, species)


SETTINGS = FinetuneSettings(epochs=6, batch_size=16, lr=1e-2, patience=50, device="cpu")


def auc_by_pairs(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the share of (presence, absence) pairs ranked right, ties counting half."""
    pos, neg = scores[labels > 0], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def bce_by_loop(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy of logits, one term at a time in float64."""
    total = 0.0
    for y, z in zip(labels.ravel().tolist(), logits.ravel().tolist(), strict=True):
        p = 1.0 / (1.0 + math.exp(-z))
        total -= y * math.log(p) + (1 - y) * math.log(1 - p)
    return total / labels.size


def test_mean_species_auc():
    presence = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]], dtype=np.float32)
    perfect = presence * 2.0 - 1.0
    assert mean_species_auc(presence, perfect) == 1.0  # species 1 and 2 have one class only
    assert mean_species_auc(presence, -perfect) == 0.0
    assert math.isnan(mean_species_auc(presence[:, 1:], perfect[:, 1:]))
    # partial rankings and ties: species 0 ranks 5 of 6 pairs right; species 1 ranks 2 pairs
    # right, 2 wrong and ties 2 (counted half)
    presence = np.array([[1, 1], [1, 0], [0, 0], [0, 1], [0, 0]], dtype=np.float32)
    scores = np.array([[0.9, 0.5], [0.3, 0.5], [0.4, 0.1], [0.2, 0.4], [0.1, 0.5]])
    assert auc_by_pairs(presence[:, 0], scores[:, 0]) == pytest.approx(5 / 6)
    assert auc_by_pairs(presence[:, 1], scores[:, 1]) == pytest.approx(3 / 6)
    assert mean_species_auc(presence, scores) == pytest.approx((5 / 6 + 3 / 6) / 2)
    rng = np.random.default_rng(0)
    presence = (rng.random((40, 6)) < 0.3).astype(np.float32)
    scores = presence + rng.normal(size=(40, 6))
    expected = np.mean([auc_by_pairs(presence[:, j], scores[:, j]) for j in range(6)])
    assert mean_species_auc(presence, scores) == pytest.approx(expected, abs=1e-12)


def test_botasp_learns_species(tmp_path):
    data = make_data()
    summary = train_botasp(data, SETTINGS.model_copy(update={"epochs": 15}), tmp_path)
    history = summary["history"]
    assert len(history) == 15
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert summary["val_auc"] > 0.7
    val = spatial_split(data.coords, SETTINGS.val_fraction, seed=SETTINGS.seed)
    assert summary["n_val"] == val.sum()
    assert json.loads((tmp_path / "botasp_history.json").read_text()) == history
    assert (tmp_path / "botasp_training_curve.png").stat().st_size > 1000

    state = torch.load(tmp_path / "botasp.pt", weights_only=True)
    assert state["dim"] == 16 and state["species"] == data.species
    assert {"adapter.weight", "adapter.bias"} <= state["model"].keys()
    adapter = load_botasp_adapter(tmp_path / "botasp.pt")
    assert isinstance(adapter, Adapter) and not adapter.training
    assert torch.equal(adapter.weight, state["model"]["adapter.weight"])
    assert not torch.allclose(adapter.weight, torch.eye(16))  # moved away from identity

    # the saved model reproduces the validation AUC and loss of the best epoch
    model = load_botasp(tmp_path / "botasp.pt")
    with torch.no_grad():
        logits = model(torch.from_numpy(data.features[val, 0])).numpy()
    presence = (data.releves[val] > 0).astype(np.float64)
    both = [j for j in range(presence.shape[1]) if 0 < presence[:, j].sum() < len(presence)]
    assert len(both) >= 8
    auc = np.mean([auc_by_pairs(presence[:, j], logits[:, j]) for j in both])
    assert summary["val_auc"] == pytest.approx(auc, abs=1e-6)
    assert summary["best_val_loss"] == pytest.approx(bce_by_loop(presence, logits), rel=1e-5)
    best = history[summary["best_epoch"]]
    assert best["val_loss"] == min(h["val_loss"] for h in history) == summary["best_val_loss"]


def test_botasp_resume_after_crash_matches_uninterrupted(tmp_path, monkeypatch):
    data = make_data()
    train_botasp(data, SETTINGS, tmp_path / "full")
    reference = torch.load(tmp_path / "full" / "botasp_last.pt", weights_only=True)["model"]

    original_step = torch.optim.Adam.step
    calls = {"n": 0}

    def crashing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 14:  # mid-epoch 3 (4 batches per epoch)
            raise KeyboardInterrupt("killed")
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt, match="killed"):
        train_botasp(data, SETTINGS, tmp_path / "crashed")
    monkeypatch.setattr(torch.optim.Adam, "step", original_step)
    assert torch.load(tmp_path / "crashed" / "botasp_last.pt", weights_only=True)["epoch"] == 2
    train_botasp(data, SETTINGS, tmp_path / "crashed")
    resumed = torch.load(tmp_path / "crashed" / "botasp_last.pt", weights_only=True)["model"]
    assert resumed.keys() == reference.keys()
    for k in reference:
        assert torch.equal(resumed[k], reference[k]), k


def test_botasp_shares_a_folder_with_botaclip(tmp_path):
    data = make_data()
    settings = SETTINGS.model_copy(update={"epochs": 2})
    clip = train_adapter(data, settings, tmp_path)
    sp = train_botasp(data, settings, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {
        "model.pt",
        "last.pt",
        "history.json",
        "botasp.pt",
        "botasp_last.pt",
        "botasp_history.json",
    }
    assert clip["model"] != sp["model"]
    with pytest.raises(WeightsError, match="not a BotaSP checkpoint"):
        load_botasp_adapter(tmp_path / "model.pt")


def test_botasp_too_few_plots(tmp_path):
    with pytest.raises(StageError, match="at least 8"):
        train_botasp(make_data(n=5), SETTINGS, tmp_path)
