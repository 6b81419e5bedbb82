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
    split_plots,
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


# device pinned: "auto" would pick CUDA on a GPU machine, where results are not bit-exact
SETTINGS = FinetuneSettings(epochs=6, batch_size=16, lr=1e-2, patience=50, device="cpu")


def test_spatial_split_holds_out_blocks():
    data = make_data()
    val = spatial_split(data.coords, 0.25, seed=0)
    assert 0.2 <= val.mean() <= 0.5
    np.testing.assert_array_equal(val, spatial_split(data.coords, 0.25, seed=0))
    with pytest.raises(StageError, match="cannot hold out"):
        spatial_split(np.zeros((10, 2)), 0.2, seed=0)


def separation(coords: np.ndarray, val: np.ndarray) -> tuple[float, float]:
    """Mean distance from a validation plot to the nearest training plot, and the share of
    validation plots whose nearest other plot is also a validation plot."""
    dist = np.hypot(*(coords[:, None, :] - coords[None, :, :]).transpose(2, 0, 1))
    to_train = dist[np.ix_(val, ~val)].min(axis=1).mean()
    np.fill_diagonal(dist, np.inf)
    nearest = dist.argmin(axis=1)
    return float(to_train), float(val[nearest[val]].mean())


def test_validation_plots_lie_apart_from_training_plots():
    coords = np.random.default_rng(0).uniform(0, 1000, size=(200, 2))
    settings = SETTINGS.model_copy(update={"val_fraction": 0.25})
    # a random hold-out of the same size: validation plots sit among training plots
    random_dist, random_share = [], []
    for seed in range(5):
        val = np.zeros(200, dtype=bool)
        val[np.random.default_rng(seed).choice(200, 50, replace=False)] = True
        d, share = separation(coords, val)
        random_dist.append(d)
        random_share.append(share)
    assert max(random_share) < 0.4
    for seed in range(3):
        train_idx, val_idx = split_plots(coords, settings.model_copy(update={"seed": seed}))
        assert sorted([*train_idx, *val_idx]) == list(range(200))
        val = np.zeros(200, dtype=bool)
        val[val_idx] = True
        np.testing.assert_array_equal(val, spatial_split(coords, 0.25, seed=seed))
        d, share = separation(coords, val)
        assert d > 1.5 * max(random_dist), seed
        assert share > 0.75, seed


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
    with pytest.raises(KeyboardInterrupt, match="killed"):
        train_adapter(data, SETTINGS, tmp_path / "crashed")
    monkeypatch.setattr(torch.optim.Adam, "step", original_step)
    assert torch.load(tmp_path / "crashed" / "last.pt", weights_only=True)["epoch"] == 2
    train_adapter(data, SETTINGS, tmp_path / "crashed")
    resumed = torch.load(tmp_path / "crashed" / "last.pt", weights_only=True)["model"]
    assert resumed.keys() == reference.keys()
    for k in reference:
        assert torch.equal(resumed[k], reference[k]), k


def test_early_stopping_keeps_the_best_epoch(tmp_path):
    data = make_data()
    # a high learning rate: the validation loss bottoms out well before 40 epochs
    settings = SETTINGS.model_copy(update={"lr": 5e-2, "epochs": 40, "patience": 3})
    summary = train_adapter(data, settings, tmp_path / "stopped")
    history = summary["history"]
    val_loss = np.array([h["val_loss"] for h in history])
    best = int(np.argmin(val_loss))
    assert summary["best_epoch"] == best and summary["best_val_loss"] == val_loss[best]
    # stopped after `patience` epochs without improvement, not at the epoch budget
    assert len(history) == summary["epochs_run"] == best + 1 + settings.patience < settings.epochs
    assert (val_loss[best + 1 :] > val_loss[best]).all()
    # the kept model is the best epoch's: the same run stopped right after that epoch
    train_adapter(data, settings.model_copy(update={"epochs": best + 1}), tmp_path / "to_best")
    at_best = torch.load(tmp_path / "to_best" / "last.pt", weights_only=True)["model"]
    kept = torch.load(tmp_path / "stopped" / "model.pt", weights_only=True)["model"]
    last = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)["model"]
    assert kept.keys() == at_best.keys()
    for k in at_best:
        assert torch.equal(kept[k], at_best[k]), k
    assert not torch.equal(kept["adapter.weight"], last["adapter.weight"])


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
    assert summary["card"]["device"] == "cpu"
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


def test_bf16_autocast_path_matches_fp32(tmp_path, monkeypatch, init_weights):
    # CUDA runs the DOFA forwards under bf16 autocast and the losses in fp32: exercise it on CPU
    settings = PIXEL_SETTINGS.model_copy(update={"epochs": 1, "regularizer": "similarity"})
    fp32 = run_pixels(settings, tmp_path / "fp32", init_weights, n=8)
    monkeypatch.setattr(
        finetune,
        "precision_context",
        lambda device: ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)), "bf16 autocast"),
    )
    bf16 = run_pixels(settings, tmp_path / "bf16", init_weights, n=8)
    assert bf16["card"]["precision"] == "bf16 autocast" and fp32["card"]["precision"] == "fp32"
    (a,), (b,) = fp32["history"], bf16["history"]
    # one batch per epoch: the training loss is one step's, from the same start weights
    assert fp32["n_train"] // settings.batch_size == 1
    assert b["train_loss"] != a["train_loss"]  # autocast was on
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=3e-2)
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=3e-2)
    assert bf16["best_val_loss"] == pytest.approx(fp32["best_val_loss"], rel=3e-2)
    # the same weights trained, each within about one Adam step (lr) of the fp32 run's
    changed, _ = changed_keys(init_weights, tmp_path / "bf16" / "backbone.pt")
    assert changed == changed_keys(init_weights, tmp_path / "fp32" / "backbone.pt")[0]
    a_state = build_dofa("tiny", weights=tmp_path / "fp32" / "backbone.pt").state_dict()
    b_state = build_dofa("tiny", weights=tmp_path / "bf16" / "backbone.pt").state_dict()
    for k in a_state:
        assert (a_state[k] - b_state[k]).abs().max() <= 2.5 * settings.lr, k


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
    with pytest.raises(KeyboardInterrupt, match="killed"):
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


def augment_by_hand(window: np.ndarray, aug) -> np.ndarray:
    """Flip (columns reversed), then rotate 90° counter-clockwise ``rot90`` times."""
    if aug.flip:
        window = np.flip(window, axis=2)
    return np.rot90(window, aug.rot90, axes=(1, 2))


def test_crop_chip_matches_chip_reader(tmp_path):
    import zarr

    from botaclip_core.augment import Augmentation
    from botaclip_core.chips import ChipReader

    rng = np.random.default_rng(0)
    image = rng.integers(1, 255, size=(3, 40, 40), dtype=np.uint8)
    group = zarr.open_group(str(tmp_path / "img.zarr"), mode="w")
    group.create_array("image", data=image)
    size, margin, row, col = 8, 3, 20, 17
    half, side = size // 2, size + 2 * margin
    big = image[
        :, row - side // 2 : row - side // 2 + side, col - side // 2 : col - side // 2 + side
    ]
    np.testing.assert_array_equal(ChipReader(tmp_path / "img.zarr", side).read(row, col), big)
    small = ChipReader(tmp_path / "img.zarr", size)
    augs = draw_epoch_augmentations(np.random.default_rng(1), 12, margin)
    assert {a.flip for a in augs} == {False, True} and {a.rot90 for a in augs} == {0, 1, 2, 3}
    for aug in augs:
        r0, c0 = row - half + aug.shift_rows, col - half + aug.shift_cols
        expected = augment_by_hand(image[:, r0 : r0 + size, c0 : c0 + size], aug)
        np.testing.assert_array_equal(crop_chip(big, aug, margin=margin, size=size), expected)
        geometric = Augmentation(aug.flip, aug.rot90, aug.shift_rows, aug.shift_cols)
        np.testing.assert_array_equal(small.read(row, col, geometric), expected)
    shifts = [
        (a.shift_rows, a.shift_cols)
        for a in draw_epoch_augmentations(np.random.default_rng(1), 50, margin)
    ]
    assert max(abs(v) for pair in shifts for v in pair) == margin


def test_pixel_batches_crop_flip_rotate_brighten_and_normalise():
    from botaclip_core.finetune import PixelBatches

    rng = np.random.default_rng(0)
    margin, size = 3, 12
    chips = rng.integers(1, 256, size=(5, 4, size + 2 * margin, size + 2 * margin), dtype=np.uint8)
    chips[:, :, :6, :6] = 0  # nodata stays nodata
    chips[:, :, -3:, -3:] = 250  # bright pixels that a factor above 1 saturates at 255
    batches = PixelBatches(chips, margin=margin, mean=MEAN, std=STD, device=torch.device("cpu"))
    mean = np.asarray(MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(STD, dtype=np.float32)[:, None, None]
    augs = draw_epoch_augmentations(np.random.default_rng(4), len(chips), margin)
    factors = np.array([a.brightness for a in augs])
    assert ((0.9 <= factors) & (factors <= 1.1)).all()
    rows = np.array([4, 0, 2])
    assert (factors[rows] > 255 / 250).any() and (factors[rows] < 1).any()
    x = batches(rows, augs).numpy()
    for got, i in zip(x, rows, strict=True):
        aug = augs[i]
        r0, c0 = margin + aug.shift_rows, margin + aug.shift_cols
        window = augment_by_hand(chips[i, :, r0 : r0 + size, c0 : c0 + size], aug)
        dn = window.astype(np.float64)
        bright = np.where(dn > 0, np.clip(dn * aug.brightness, 1, 255), 0)
        np.testing.assert_allclose(got, (bright - mean) / std, rtol=1e-5, atol=1e-5)
    plain = batches(rows, None).numpy()
    centre = chips[rows][:, :, margin : margin + size, margin : margin + size]
    np.testing.assert_allclose(plain, (centre - mean) / std, rtol=1e-6, atol=1e-6)
