import json

import numpy as np
import pytest
import torch

from botaclip_core.catalog import FinetuneSettings
from botaclip_core.errors import StageError
from botaclip_core.finetune import TrainingData, load_adapter, spatial_split, train_adapter


def make_data(n=96, views=2, dim=16, n_species=12, seed=0) -> TrainingData:
    rng = np.random.default_rng(seed)
    releves = (rng.random((n, n_species)) < 0.3) * rng.uniform(1, 50, (n, n_species))
    mixing = rng.normal(size=(n_species, dim))
    base = (releves > 0) @ mixing
    features = base[:, None, :] + 0.5 * rng.normal(size=(n, views, dim))
    coords = rng.uniform(0, 1000, size=(n, 2))
    return TrainingData(features.astype(np.float32), releves.astype(np.float32), coords, [f"sp{i}" for i in range(n_species)])


SETTINGS = FinetuneSettings(epochs=6, batch_size=16, lr=1e-2, patience=50)


def test_spatial_split_holds_out_blocks():
    data = make_data()
    val = spatial_split(data.coords, 0.25, seed=0)
    assert 0.2 <= val.mean() <= 0.5
    np.testing.assert_array_equal(val, spatial_split(data.coords, 0.25, seed=0))
    with pytest.raises(StageError, match="cannot hold out"):
        spatial_split(np.zeros((10, 2)), 0.2, seed=0)


@pytest.mark.parametrize("loss,reg", [("infonce", "l2sp"), ("sigmoid", "similarity")])
def test_training_learns_and_writes_outputs(tmp_path, loss, reg):
    settings = SETTINGS.model_copy(update={"loss": loss, "regularizer": reg, "epochs": 15})
    summary = train_adapter(make_data(), settings, tmp_path)
    history = summary["history"]
    assert len(history) == 15
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert summary["val_recall_at_5"] > 0.2  # chance is 5 / n_val ≈ 0.1–0.2
    assert (tmp_path / "training_curve.png").stat().st_size > 1000
    assert json.loads((tmp_path / "history.json").read_text()) == history
    model = load_adapter(tmp_path / "model.pt")
    assert model.adapter.weight.shape == (16, 16)
    assert not torch.allclose(model.adapter.weight, torch.eye(16))  # moved away from identity


def test_resume_after_crash_matches_uninterrupted(tmp_path, monkeypatch):
    data = make_data()
    train_adapter(data, SETTINGS, tmp_path / "full")
    reference = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]

    original_step = torch.optim.Adam.step
    calls = {"n": 0}

    def crashing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 14:  # mid-epoch 3 (4 batches per epoch)
            raise KeyboardInterrupt("killed")
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(data, SETTINGS, tmp_path / "crashed")
    monkeypatch.setattr(torch.optim.Adam, "step", original_step)
    assert torch.load(tmp_path / "crashed" / "last.pt", weights_only=True)["epoch"] == 2
    train_adapter(data, SETTINGS, tmp_path / "crashed")
    resumed = torch.load(tmp_path / "crashed" / "last.pt", weights_only=True)["model"]
    assert resumed.keys() == reference.keys()
    for k in reference:
        assert torch.equal(resumed[k], reference[k]), k


def test_too_few_plots(tmp_path):
    data = make_data(n=5)
    with pytest.raises(StageError, match="at least 8"):
        train_adapter(data, SETTINGS, tmp_path)
