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


def test_mean_species_auc():
    presence = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]], dtype=np.float32)
    perfect = presence * 2.0 - 1.0
    assert mean_species_auc(presence, perfect) == 1.0  # species 1 and 2 have one class only
    assert mean_species_auc(presence, -perfect) == 0.0
    assert math.isnan(mean_species_auc(presence[:, 1:], perfect[:, 1:]))


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

    # the saved model reproduces the validation AUC of the best epoch
    model = load_botasp(tmp_path / "botasp.pt")
    with torch.no_grad():
        scores = model(torch.from_numpy(data.features[val, 0])).numpy()
    auc = mean_species_auc((data.releves[val] > 0).astype(np.float32), scores)
    assert auc == pytest.approx(summary["val_auc"], abs=1e-6)


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
    with pytest.raises(KeyboardInterrupt):
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
