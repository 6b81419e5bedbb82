import logging
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from dofa_reference import reference_features
from torch import nn

from botaclip_core.errors import CatalogError, InputDataError, WeightsError
from botaclip_core.models import (
    DOFA,
    DOFA_SIZES,
    Adapter,
    LoRALinear,
    ReleveEncoder,
    apply_lora,
    build_dofa,
    merge_lora,
    save_dofa,
    set_trainable_blocks,
)

RGB = [0.665, 0.56, 0.49]
RGBN = [0.665, 0.56, 0.49, 0.842]


def perturb(model: nn.Module, seed: int = 1, std: float = 0.02) -> nn.Module:
    """Move every tensor (LayerNorms, cls token, pos embed too) away from its structured init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in model.state_dict().values():
            value.add_(torch.randn(value.shape, generator=gen) * std)
    return model


def images(batch: int, bands: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, bands, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny() -> DOFA:
    return perturb(build_dofa("tiny", seed=0)).eval()


# --- numerics against the independent reference ------------------------------------------


@pytest.mark.parametrize("wavelengths", [RGB, RGBN], ids=["rgb", "rgbn"])
def test_tiny_matches_reference(tiny: DOFA, wavelengths: list[float]) -> None:
    x = images(2, len(wavelengths))
    with torch.no_grad():
        out = tiny.forward_features(x, wavelengths)
    ref = reference_features(tiny.state_dict(), x, wavelengths, tiny.num_heads)
    assert out.shape == (2, 64)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_published_size_matches_reference() -> None:
    # "small" has the published layout (12 blocks, 6 heads) at a quarter of base's cost
    model = perturb(build_dofa("small", seed=0)).eval()
    x = images(1, 3)
    with torch.no_grad():
        out = model(x, torch.tensor(RGB))
    ref = reference_features(model.state_dict(), x, RGB, model.num_heads)
    assert out.shape == (1, 384)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_reference_check_is_sensitive_to_wavelengths(tiny: DOFA) -> None:
    x = images(1, 4)
    with torch.no_grad():
        out = tiny.forward_features(x, RGBN)
    ref = reference_features(tiny.state_dict(), x, RGBN[::-1], tiny.num_heads)
    assert (out - ref).abs().max() > 1e-3


# --- shapes and inputs --------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("wavelengths", [RGB, RGBN], ids=["rgb", "rgbn"])
def test_output_shape(tiny: DOFA, batch: int, wavelengths: list[float]) -> None:
    with torch.no_grad():
        out = tiny(images(batch, len(wavelengths)), wavelengths)
    assert out.shape == (batch, tiny.embed_dim)
    assert torch.isfinite(out).all()


def bicubic_resample(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resample ``(h, w, D)`` with cubic convolution (a = -0.75), half-pixel centres, edges clamped.

    Written out per output index, as PyTorch documents ``interpolate(mode="bicubic",
    align_corners=False)``, in float64.
    """
    a = -0.75

    def weights(t: float) -> list[float]:
        def near(x: float) -> float:  # |x| <= 1
            return ((a + 2) * x - (a + 3)) * x * x + 1

        def far(x: float) -> float:  # 1 < |x| < 2
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

        return [far(t + 1), near(t), near(1 - t), far(2 - t)]

    def along(values: np.ndarray, n_out: int) -> np.ndarray:  # resample axis 0
        n_in = values.shape[0]
        out = np.zeros((n_out, *values.shape[1:]))
        for i in range(n_out):
            src = (i + 0.5) * n_in / n_out - 0.5
            x0 = math.floor(src)
            for k, w in zip(range(x0 - 1, x0 + 3), weights(src - x0), strict=True):
                out[i] += w * values[min(max(k, 0), n_in - 1)]
        return out

    rows = along(grid.astype(np.float64), out_h)
    return along(rows.transpose(1, 0, 2), out_w).transpose(1, 0, 2)


def test_bicubic_reference_keeps_the_native_grid_and_constants() -> None:
    grid = np.random.default_rng(0).normal(size=(14, 14, 3))
    np.testing.assert_allclose(bicubic_resample(grid, 14, 14), grid, atol=1e-12)
    np.testing.assert_allclose(bicubic_resample(np.full((14, 14, 2), 0.7), 6, 10), 0.7)


@pytest.mark.parametrize("height,width", [(96, 96), (96, 160), (320, 256)])
def test_other_tile_size_resamples_position_embedding(tiny: DOFA, height: int, width: int) -> None:
    # patch grid of DOFA's conv (kernel 16, stride 16, padding 1): 96 px -> 6, 160 -> 10, 320 -> 20
    grid_h, grid_w = (height + 2 - 16) // 16 + 1, (width + 2 - 16) // 16 + 1
    native = tiny.pos_embed.detach()[0, 1:].reshape(14, 14, -1).numpy()
    resampled = bicubic_resample(native, grid_h, grid_w).reshape(grid_h * grid_w, -1)
    state = dict(tiny.state_dict())
    state["pos_embed"] = torch.cat(
        [tiny.pos_embed.detach()[:, :1], torch.from_numpy(resampled)[None].float()], dim=1
    )
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = tiny(x, RGB)
    ref = reference_features(state, x, RGB, tiny.num_heads)
    assert out.shape == (2, 64)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_band_count_mismatch(tiny: DOFA) -> None:
    with pytest.raises(InputDataError, match="4 wavelengths"):
        tiny(images(1, 3), RGBN)


def test_state_dict_layout() -> None:
    model = build_dofa("tiny", seed=0)
    keys = set(model.state_dict())
    for key in [
        "cls_token",
        "pos_embed",
        "fc_norm.weight",
        "patch_embed.weight_generator.weight_tokens",
        "patch_embed.weight_generator.bias_token",
        "patch_embed.weight_generator.fc_weight.weight",
        "patch_embed.weight_generator.fc_bias.bias",
        "patch_embed.weight_generator.transformer_encoder.layers.0.self_attn.in_proj_weight",
        "patch_embed.weight_generator.transformer_encoder.layers.0.linear1.weight",
        "patch_embed.fclayer.w1.weight",
        "patch_embed.fclayer.w2.bias",
        "blocks.1.norm1.weight",
        "blocks.1.attn.qkv.weight",
        "blocks.1.attn.qkv.bias",
        "blocks.1.attn.proj.weight",
        "blocks.1.norm2.bias",
        "blocks.1.mlp.fc1.weight",
        "blocks.1.mlp.fc2.bias",
    ]:
        assert key in keys, key
    assert model.pos_embed.shape == (1, 197, 64)
    assert not model.pos_embed.requires_grad
    fc_weight = model.state_dict()["patch_embed.weight_generator.fc_weight.weight"]
    assert fc_weight.shape == (16 * 16 * 64, 128)
    assert model.embed_dim == DOFA_SIZES["tiny"].embed_dim


def test_unknown_size() -> None:
    with pytest.raises(CatalogError, match="huge"):
        build_dofa("huge")


def test_random_init_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="botaclip_core.models"):
        build_dofa("tiny")
    assert "meaningless" in caplog.text


def test_deterministic() -> None:
    a = build_dofa("tiny", seed=7).state_dict()
    b = build_dofa("tiny", seed=7).state_dict()
    c = build_dofa("tiny", seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])
    torch.manual_seed(3)
    d = build_dofa("tiny").state_dict()
    torch.manual_seed(3)
    e = build_dofa("tiny").state_dict()
    assert all(torch.equal(d[k], e[k]) for k in d)


# --- checkpoints --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["torchgeo", "official"])
def test_round_trip(tiny: DOFA, tmp_path: Path, fmt: str) -> None:
    model = build_dofa("tiny", seed=5)
    perturb(model, seed=5)
    with torch.no_grad():
        model.fc_norm.weight.fill_(1.0)  # the official layout has no fc_norm
        model.fc_norm.bias.zero_()
    path = save_dofa(model, tmp_path / f"dofa_{fmt}.pth", format=fmt)
    saved = torch.load(path, weights_only=True)
    if fmt == "official":
        assert {"mask_token", "norm.weight", "projector.weight"} <= set(saved)
        assert "fc_norm.weight" not in saved
    loaded = build_dofa("tiny", weights=path, seed=99)
    x = images(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, RGBN), model(x, RGBN), atol=0, rtol=0)


def official_checkpoint(dim: int = 64, depth: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict laid out like the authors' ``DOFA_ViT_base_e100.pth``, key by key.

    The MAE-style pre-training encoder: ``cls_token``, ``pos_embed``, ``mask_token``, the
    wavelength-conditioned patch embedding (``patch_embed.fclayer`` and
    ``patch_embed.weight_generator`` with a one-layer ``nn.TransformerEncoder`` of width 128,
    feed-forward 2048, 128 weight tokens), timm ViT ``blocks``, a final ``norm`` and a
    ``projector``; no ``fc_norm`` (the fine-tuning head's norm) and no classification head.
    """
    gen = torch.Generator().manual_seed(seed)

    def t(*shape: int, base: float = 0.0) -> torch.Tensor:
        return base + 0.05 * torch.randn(shape, generator=gen)

    w, k = 128, 16  # wavelength embedding width, patch size
    gen_w = "patch_embed.weight_generator."
    enc = gen_w + "transformer_encoder.layers.0."
    state = {
        "cls_token": t(1, 1, dim),
        "pos_embed": t(1, 1 + 14 * 14, dim),
        "mask_token": t(1, 1, dim),
        gen_w + "weight_tokens": t(128, w),
        gen_w + "bias_token": t(1, w),
        enc + "self_attn.in_proj_weight": t(3 * w, w),
        enc + "self_attn.in_proj_bias": t(3 * w),
        enc + "self_attn.out_proj.weight": t(w, w),
        enc + "self_attn.out_proj.bias": t(w),
        enc + "linear1.weight": t(2048, w),
        enc + "linear1.bias": t(2048),
        enc + "linear2.weight": t(w, 2048),
        enc + "linear2.bias": t(w),
        enc + "norm1.weight": t(w, base=1.0),
        enc + "norm1.bias": t(w),
        enc + "norm2.weight": t(w, base=1.0),
        enc + "norm2.bias": t(w),
        gen_w + "fc_weight.weight": t(k * k * dim, w),
        gen_w + "fc_weight.bias": t(k * k * dim),
        gen_w + "fc_bias.weight": t(dim, w),
        gen_w + "fc_bias.bias": t(dim),
        "patch_embed.fclayer.w1.weight": t(w, w),
        "patch_embed.fclayer.w1.bias": t(w),
        "patch_embed.fclayer.w2.weight": t(w, w),
        "patch_embed.fclayer.w2.bias": t(w),
        "norm.weight": t(dim, base=1.0),
        "norm.bias": t(dim),
        "projector.weight": t(dim, dim),
        "projector.bias": t(dim),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        state |= {
            b + "norm1.weight": t(dim, base=1.0),
            b + "norm1.bias": t(dim),
            b + "attn.qkv.weight": t(3 * dim, dim),
            b + "attn.qkv.bias": t(3 * dim),
            b + "attn.proj.weight": t(dim, dim),
            b + "attn.proj.bias": t(dim),
            b + "norm2.weight": t(dim, base=1.0),
            b + "norm2.bias": t(dim),
            b + "mlp.fc1.weight": t(4 * dim, dim),
            b + "mlp.fc1.bias": t(4 * dim),
            b + "mlp.fc2.weight": t(dim, 4 * dim),
            b + "mlp.fc2.bias": t(dim),
        }
    return state


def test_official_checkpoint_layout_loads(tmp_path: Path) -> None:
    state = official_checkpoint()
    torch.save(state, tmp_path / "DOFA_ViT_tiny_e100.pth")
    model = build_dofa("tiny", weights=tmp_path / "DOFA_ViT_tiny_e100.pth", seed=99).eval()
    loaded = model.state_dict()
    for key in loaded.keys() - {"fc_norm.weight", "fc_norm.bias"}:
        assert torch.equal(loaded[key], state[key]), key
    # no fc_norm in the file: LayerNorm's default, not the pre-training ``norm``
    assert torch.equal(model.fc_norm.weight, torch.ones(64))
    assert torch.equal(model.fc_norm.bias, torch.zeros(64))
    x = images(2, 4)
    with torch.no_grad():
        out = model(x, RGBN)
    with_fc_norm = {**state, "fc_norm.weight": torch.ones(64), "fc_norm.bias": torch.zeros(64)}
    ref = reference_features(with_fc_norm, x, RGBN, model.num_heads)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_save_official_writes_the_official_keys(tiny: DOFA, tmp_path: Path) -> None:
    saved = torch.load(save_dofa(tiny, tmp_path / "o.pth", format="official"), weights_only=True)
    expected = official_checkpoint()
    assert set(saved) == set(expected)
    for key, value in expected.items():
        if not key.startswith("projector."):  # a placeholder: its shape is the writer's choice
            assert saved[key].shape == value.shape, key


def test_torchgeo_file_without_fc_norm_keeps_default(tiny: DOFA, tmp_path: Path) -> None:
    state = {k: v for k, v in tiny.state_dict().items() if not k.startswith("fc_norm")}
    state["head.weight"] = torch.zeros(45, 64)  # a TorchGeo model built with num_classes=45
    state["head.bias"] = torch.zeros(45)
    torch.save(state, tmp_path / "tg.pth")
    loaded = build_dofa("tiny", weights=tmp_path / "tg.pth")
    assert torch.equal(loaded.fc_norm.weight, torch.ones(64))
    assert torch.equal(loaded.fc_norm.bias, torch.zeros(64))
    assert torch.equal(loaded.cls_token, tiny.cls_token)


@pytest.mark.parametrize("wrap", ["model", "state_dict", "module."])
def test_wrapped_checkpoints(tiny: DOFA, tmp_path: Path, wrap: str) -> None:
    state = tiny.state_dict()
    if wrap == "module.":
        obj: object = {"module." + k: v for k, v in state.items()}
    else:
        obj = {wrap: state, "epoch": 100}
    torch.save(obj, tmp_path / "ckpt.pth")
    loaded = build_dofa("tiny", weights=tmp_path / "ckpt.pth")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_random_dict_lists_missing_and_unexpected_keys(tmp_path: Path) -> None:
    torch.save({"encoder.layer1.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="does not match DOFA") as info:
        build_dofa("tiny", weights=tmp_path / "other.pth")
    message = str(info.value)
    assert "other.pth" in message
    assert "missing keys" in message and "cls_token" in message
    assert "encoder.layer1.weight" in message
    assert "TorchGeo or the official release" in message


def test_unknown_extra_key_strict_and_lenient(tiny: DOFA, tmp_path: Path) -> None:
    state = dict(tiny.state_dict())
    state["extra.thing"] = torch.zeros(2)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(WeightsError, match="extra.thing"):
        build_dofa("tiny", weights=tmp_path / "extra.pth")
    loaded = build_dofa("tiny", weights=tmp_path / "extra.pth", strict_keys=False)
    assert torch.equal(loaded.cls_token, tiny.cls_token)


def test_missing_block_is_an_error_even_when_lenient(tiny: DOFA, tmp_path: Path) -> None:
    state = {k: v for k, v in tiny.state_dict().items() if not k.startswith("blocks.1.")}
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(WeightsError, match=r"blocks\.1\.norm1\.weight"):
        build_dofa("tiny", weights=tmp_path / "short.pth", strict_keys=False)


def test_wrong_size_names_key_shapes_and_size(tiny: DOFA, tmp_path: Path) -> None:
    path = save_dofa(tiny, tmp_path / "tiny.pth")
    with pytest.raises(WeightsError, match="looks like DOFA 'tiny'") as info:
        build_dofa("small", weights=path)
    message = str(info.value)
    assert "'cls_token'" in message
    assert "(1, 1, 64)" in message and "(1, 1, 384)" in message
    assert "size='tiny'" in message


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a checkpoint\x00\x01\x02")
    with pytest.raises(WeightsError, match="garbage.pth"):
        build_dofa("tiny", weights=path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        build_dofa("tiny", weights=tmp_path / "nope.pth")


class Payload:
    """An arbitrary class: unpickling it would run code outside torch's allow-list."""

    def __init__(self) -> None:
        self.value = 1


def test_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "object.pth"
    torch.save({"cls_token": torch.zeros(1), "payload": Payload()}, path)
    with pytest.raises(WeightsError, match="weights_only"):
        build_dofa("tiny", weights=path)
    with path.open("wb") as f:
        pickle.dump(Payload(), f, protocol=2)
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        build_dofa("tiny", weights=path)


def test_non_tensor_values_are_refused(tmp_path: Path) -> None:
    torch.save({"cls_token": torch.zeros(1), "lr": 0.1}, tmp_path / "mixed.pth")
    with pytest.raises(WeightsError, match="not tensors"):
        build_dofa("tiny", weights=tmp_path / "mixed.pth")


# --- heads (adapter, relevé encoders, LoRA, block freezing) -------------------------------


def test_adapter_starts_as_identity() -> None:
    adapter = Adapter(8)
    x = torch.randn(5, 8)
    torch.testing.assert_close(adapter(x), x)
    assert set(adapter.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_releve_encoder(kind: str) -> None:
    encoder = ReleveEncoder(30, 16, kind=kind, hidden=12)
    assert encoder(torch.rand(4, 30)).shape == (4, 16)
    n_linear = sum(isinstance(m, nn.Linear) for m in encoder.modules())
    assert n_linear == (1 if kind == "linear" else 2)


def test_releve_encoder_unknown_kind() -> None:
    with pytest.raises(CatalogError, match="'linear' or 'mlp'"):
        ReleveEncoder(30, 16, kind="transformer")  # type: ignore[arg-type]


def test_lora_starts_as_base_and_trains_only_low_rank(tiny: DOFA, tmp_path: Path) -> None:
    model = build_dofa("tiny", seed=0)
    model.load_state_dict(tiny.state_dict())
    x = images(1, 3)
    with torch.no_grad():
        before = model(x, RGB)
    names = apply_lora(model, rank=4, alpha=8)
    assert names == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert isinstance(model.blocks[0].attn.qkv, LoRALinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.attn.qkv.lora_{m}" for i in range(2) for m in "AB"}
    with torch.no_grad():
        torch.testing.assert_close(model(x, RGB), before)

    model(x, RGB).sum().backward()
    lora = model.blocks[1].attn.qkv
    assert isinstance(lora, LoRALinear)
    assert lora.lora_B.grad is not None and lora.lora_B.grad.abs().sum() > 0
    with torch.no_grad():
        lora.lora_B.normal_(std=0.1)
        adapted = model(x, RGB)
    assert (adapted - before).abs().max() > 1e-4

    with pytest.raises(WeightsError, match="merge_lora"):
        save_dofa(model, tmp_path / "lora.pth")
    assert merge_lora(model) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(x, RGB), adapted, atol=1e-5, rtol=1e-5)
    reloaded = build_dofa("tiny", weights=save_dofa(model, tmp_path / "merged.pth"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, RGB), adapted, atol=1e-5, rtol=1e-5)


def test_apply_lora_without_match() -> None:
    with pytest.raises(CatalogError, match="attn.nothing"):
        apply_lora(build_dofa("tiny", seed=0), target="attn.nothing")


@pytest.mark.parametrize("n_last", [0, 1, 2])
def test_set_trainable_blocks(n_last: int) -> None:
    model = build_dofa("tiny", seed=0)
    set_trainable_blocks(model, n_last)
    trainable = {
        n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "")
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    expected = {"fc_norm"} | {f"blocks.{i}" for i in range(2 - n_last, 2)}
    assert trainable == expected


def test_set_trainable_blocks_out_of_range() -> None:
    with pytest.raises(CatalogError, match="between 0 and 2"):
        set_trainable_blocks(build_dofa("tiny", seed=0), 3)
