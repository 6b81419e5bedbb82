import json

import numpy as np
import pytest
import torch

from botaclip_core.catalog import FinetuneSettings
from botaclip_core.errors import CatalogError, InputDataError, StageError
from botaclip_core.finetune import (
    TrainingData,
    check_settings,
    crop_chip,
    draw_epoch_augmentations,
    load_adapter,
    spatial_split,
    train_adapter,
    train_backbone,
)
from botaclip_core.models import build_dofa, save_dofa
from botaclip_core.training import backbone as finetune


def make_data(n=96, views=2, dim=16, n_species=12, seed=0) -> TrainingData:
    rng = np.random.default_rng(seed)
    releves = (rng.random((n, n_species)) < 0.3) * rng.uniform(1, 50, (n, n_species))
    mixing = rng.normal(size=(n_species, dim))
    base = (releves > 0) @ mixing
    features = base[:, None, :] + 0.5 * rng.normal(size=(n, views, dim))
    coords = rng.uniform(0, 1000, size=(n, 2))
    return TrainingData(
        features.astype(np.float32),
        releves.astype(np.float32),
        coords,
        [f"sp{i}" for i in range(n_species)],
    )


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


# --- settings, checkpoint guard ------------------------------------------------------------------


def test_settings_combinations():
    FinetuneSettings(mode="partial", lora_rank=4, lora_alpha=8)
    FinetuneSettings(mode="full", max_shift=0, device="cpu", botasp=False)
    with pytest.raises(ValueError, match="lora_rank=4 needs mode 'partial'"):
        FinetuneSettings(mode="full", lora_rank=4)
    with pytest.raises(ValueError, match="extra"):
        FinetuneSettings(lora_ranks=4)
    # model_copy skips validation; training re-validates
    bad = FinetuneSettings().model_copy(update={"lora_rank": 4})
    with pytest.raises(CatalogError, match="lora_rank=4 needs mode 'partial'"):
        check_settings(bad)


def test_train_adapter_refuses_pixel_modes(tmp_path):
    with pytest.raises(CatalogError, match="train_backbone"):
        train_adapter(make_data(), FinetuneSettings(mode="full"), tmp_path)


def test_resume_refuses_other_settings(tmp_path):
    train_adapter(make_data(), SETTINGS.model_copy(update={"epochs": 1}), tmp_path)
    # more epochs resume the run; another learning rate cannot
    train_adapter(make_data(), SETTINGS.model_copy(update={"epochs": 2}), tmp_path)
    assert len(json.loads((tmp_path / "history.json").read_text())) == 2
    with pytest.raises(StageError, match="lr differ"):
        train_adapter(make_data(), SETTINGS.model_copy(update={"lr": 0.5}), tmp_path)


def test_adapter_summary_has_card(tmp_path):
    summary = train_adapter(make_data(), SETTINGS.model_copy(update={"epochs": 1}), tmp_path)
    assert summary["card"]["mode"] == "adapter"
    assert summary["card"]["device"] in ("cpu", "cuda")
    assert summary["training_curve"] == str(tmp_path / "training_curve.png")


# --- pixel modes (partial, full) on a tiny DOFA -----------------------------------------------

WAVES = [0.49, 0.56, 0.665, 0.842]
MEAN = [120.0, 118.0, 110.0, 130.0]
STD = [60.0, 58.0, 62.0, 64.0]
MARGIN = 4
PIXEL_SETTINGS = FinetuneSettings(
    epochs=2,
    batch_size=4,
    lr=1e-3,
    patience=10,
    val_fraction=0.25,
    max_shift=MARGIN,
    device="cpu",
    mode="full",
)


def make_pixels(n=12, n_species=10, seed=0):
    rng = np.random.default_rng(seed)
    side = 224 + 2 * MARGIN
    chips = rng.integers(1, 255, size=(n, len(WAVES), side, side), dtype=np.uint8)
    chips[:, :, :10, :10] = 0  # a nodata corner
    releves = (rng.random((n, n_species)) < 0.4).astype(np.float32)
    coords = rng.uniform(0, 1000, size=(n, 2))
    return chips, releves, coords, [f"sp{i}" for i in range(n_species)]


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("dofa") / "tiny_init.pt"
    save_dofa(build_dofa("tiny", seed=1), path)
    return path


def run_pixels(settings, out_dir, weights, n=12):
    chips, releves, coords, species = make_pixels(n)
    return train_backbone(
        chips,
        releves,
        coords,
        species,
        size="tiny",
        weights=weights,
        wavelengths_um=WAVES,
        mean=MEAN,
        std=STD,
        settings=settings,
        out_dir=out_dir,
    )


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, init_weights):
    out = tmp_path_factory.mktemp("full")
    return out, run_pixels(PIXEL_SETTINGS, out, init_weights)


def changed_keys(init_weights, backbone):
    before = build_dofa("tiny", weights=init_weights).state_dict()
    after = build_dofa("tiny", weights=backbone).state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}, set(before)


def check_run(summary, out_dir):
    assert summary["epochs_run"] == 2
    for h in summary["history"]:
        assert np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"])
    assert summary["backbone"] == str(out_dir / "backbone.pt")
    assert (out_dir / "training_curve.png").is_file() and (out_dir / "last.pt").is_file()
    heads = torch.load(out_dir / "model.pt", weights_only=True)
    assert heads["mode"] == summary["card"]["mode"] and heads["backbone"] == "backbone.pt"
    assert all(k.startswith(("releve_encoder.", "loss.")) for k in heads["model"])
    with pytest.raises(StageError, match="holds no adapter"):
        load_adapter(out_dir / "model.pt")


def test_full_mode_trains_all_of_dofa(full_run, init_weights):
    out, summary = full_run
    check_run(summary, out)
    changed, keys = changed_keys(init_weights, out / "backbone.pt")
    assert changed == keys - {"pos_embed"}  # the fixed sine-cosine table stays
    assert summary["card"]["precision"] == "fp32" and summary["card"]["device"] == "cpu"
    assert summary["card"]["trainable_parameters"] < summary["card"]["dofa_parameters"]


def test_partial_mode_trains_last_blocks(tmp_path, init_weights):
    settings = PIXEL_SETTINGS.model_copy(update={"mode": "partial", "trainable_blocks": 1})
    summary = run_pixels(settings, tmp_path, init_weights)
    check_run(summary, tmp_path)
    changed, keys = changed_keys(init_weights, tmp_path / "backbone.pt")
    assert changed == {k for k in keys if k.startswith(("blocks.1.", "fc_norm."))}
    assert summary["card"]["trainable"] == "last 1 of 2 DOFA blocks + fc_norm"


def test_partial_mode_lora(tmp_path, init_weights):
    settings = PIXEL_SETTINGS.model_copy(
        update={"mode": "partial", "lora_rank": 4, "regularizer": "similarity", "loss": "sigmoid"}
    )
    summary = run_pixels(settings, tmp_path, init_weights)
    check_run(summary, tmp_path)
    changed, _ = changed_keys(init_weights, tmp_path / "backbone.pt")  # LoRA merged on export
    assert changed == {"blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight"}
    assert "lora_A" in " ".join(torch.load(tmp_path / "last.pt", weights_only=True)["model"])
    assert summary["card"]["trainable"] == "LoRA rank 4, alpha 16 on attn.qkv of every block"


def test_bf16_autocast_path_runs(tmp_path, monkeypatch, init_weights):
    # CUDA runs the DOFA forwards under bf16 autocast and the losses in fp32: exercise it on CPU
    monkeypatch.setattr(
        finetune,
        "precision_context",
        lambda device: ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)), "bf16 autocast"),
    )
    settings = PIXEL_SETTINGS.model_copy(update={"epochs": 1, "regularizer": "similarity"})
    summary = run_pixels(settings, tmp_path, init_weights, n=8)
    assert np.isfinite(summary["history"][0]["train_loss"])
    assert np.isfinite(summary["best_val_loss"])
    assert summary["card"]["precision"] == "bf16 autocast"


def test_pixel_resume_after_crash_matches_uninterrupted(
    tmp_path, monkeypatch, full_run, init_weights
):
    ref_dir, ref_summary = full_run
    reference = torch.load(ref_dir / "last.pt", weights_only=True)["model"]
    steps_per_epoch = ref_summary["n_train"] // PIXEL_SETTINGS.batch_size
    assert steps_per_epoch >= 2
    original_step = torch.optim.Adam.step
    calls = {"n": 0}

    def crashing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == steps_per_epoch + 2:  # second step of epoch 1
            raise KeyboardInterrupt("killed")
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        run_pixels(PIXEL_SETTINGS, tmp_path, init_weights)
    monkeypatch.setattr(torch.optim.Adam, "step", original_step)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 0
    summary = run_pixels(PIXEL_SETTINGS, tmp_path, init_weights)
    resumed = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    assert resumed.keys() == reference.keys()
    for k in reference:
        assert torch.equal(resumed[k], reference[k]), k
    assert summary["history"] == ref_summary["history"]


def test_pixel_mode_errors(tmp_path, init_weights):
    with pytest.raises(CatalogError, match="trainable_blocks=3 but DOFA 'tiny' has 2 blocks"):
        run_pixels(
            PIXEL_SETTINGS.model_copy(update={"mode": "partial", "trainable_blocks": 3}),
            tmp_path,
            init_weights,
        )
    with pytest.raises(CatalogError, match="train_adapter"):
        run_pixels(PIXEL_SETTINGS.model_copy(update={"mode": "adapter"}), tmp_path, init_weights)
    chips, releves, coords, species = make_pixels(n=10)
    with pytest.raises(InputDataError, match="wavelengths_um has 3 values"):
        train_backbone(
            chips,
            releves,
            coords,
            species,
            size="tiny",
            weights=init_weights,
            wavelengths_um=WAVES[:3],
            mean=MEAN,
            std=STD,
            settings=PIXEL_SETTINGS,
            out_dir=tmp_path,
        )


def test_crop_chip_matches_chip_reader(tmp_path):
    import zarr

    from botaclip_core.chips import Augmentation, ChipReader

    rng = np.random.default_rng(0)
    image = rng.integers(1, 255, size=(3, 40, 40), dtype=np.uint8)
    group = zarr.open_group(str(tmp_path / "img.zarr"), mode="w")
    group.create_array("image", data=image)
    size, margin, row, col = 8, 3, 20, 17
    big = ChipReader(tmp_path / "img.zarr", size + 2 * margin).read(row, col)
    small = ChipReader(tmp_path / "img.zarr", size)
    for aug in draw_epoch_augmentations(np.random.default_rng(1), 12, margin):
        geometric = Augmentation(aug.flip, aug.rot90, aug.shift_rows, aug.shift_cols)
        np.testing.assert_array_equal(
            crop_chip(big, aug, margin=margin, size=size), small.read(row, col, geometric)
        )
    assert (
        max(
            abs(a.shift_rows)
            for a in draw_epoch_augmentations(np.random.default_rng(1), 50, margin)
        )
        <= margin
    )
