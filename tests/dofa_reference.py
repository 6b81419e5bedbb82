"""Independent functional re-implementation of TorchGeo's DOFA forward, for tests only.

Everything is written out from the state-dict tensors with elementary torch ops, following
``torchgeo/models/dofa.py`` (post-2024 layout) step by step, without using
``botaclip_core.models.dofa`` or any ``nn.Module``/``F.conv2d``/``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

KERNEL = 16
SCALER = 0.01
N_WEIGHT_TOKENS = 128
GENERATOR_HEADS = 4


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _dense(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return torch.einsum("...i,oi->...o", x, weight) + bias


def _multi_head_attention(q: Tensor, k: Tensor, v: Tensor, n_heads: int) -> Tensor:
    """q, k, v: (..., N, D) → (..., N, D), heads split along D."""
    *lead, n, d = q.shape
    hd = d // n_heads

    def split(t: Tensor) -> Tensor:
        return t.reshape(*lead, n, n_heads, hd).transpose(-3, -2)  # (..., H, N, hd)

    qh, kh, vh = split(q), split(k), split(v)
    scores = torch.einsum("...hnc,...hmc->...hnm", qh, kh) / math.sqrt(hd)
    scores = scores - scores.amax(dim=-1, keepdim=True)
    probs = scores.exp()
    probs = probs / probs.sum(dim=-1, keepdim=True)
    out = torch.einsum("...hnm,...hmc->...hnc", probs, vh)
    return out.transpose(-3, -2).reshape(*lead, n, d)


def _sincos_1d(dim: int, positions: Tensor) -> Tensor:
    half = dim // 2
    out = torch.empty(positions.shape[0], dim, dtype=torch.float64)
    for j in range(half):
        freq = 1.0 / (10000.0 ** (j / half))
        out[:, j] = torch.sin(positions * freq)
        out[:, half + j] = torch.cos(positions * freq)
    return out


def _generator_encoder_layer(s: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """torch.nn.TransformerEncoderLayer, post-norm, GELU, eps 1e-5, dropout 0; x: (S, E)."""
    p = "patch_embed.weight_generator.transformer_encoder.layers.0."
    e = x.shape[-1]
    w_in, b_in = s[p + "self_attn.in_proj_weight"], s[p + "self_attn.in_proj_bias"]
    q = _dense(x, w_in[:e], b_in[:e])
    k = _dense(x, w_in[e : 2 * e], b_in[e : 2 * e])
    v = _dense(x, w_in[2 * e :], b_in[2 * e :])
    attn = _multi_head_attention(q, k, v, GENERATOR_HEADS)
    attn = _dense(attn, s[p + "self_attn.out_proj.weight"], s[p + "self_attn.out_proj.bias"])
    x = _layer_norm(x + attn, s[p + "norm1.weight"], s[p + "norm1.bias"], 1e-5)
    ff = _dense(
        _gelu(_dense(x, s[p + "linear1.weight"], s[p + "linear1.bias"])),
        s[p + "linear2.weight"],
        s[p + "linear2.bias"],
    )
    return _layer_norm(x + ff, s[p + "norm2.weight"], s[p + "norm2.bias"], 1e-5)


def reference_features(
    state: Mapping[str, Tensor], x: Tensor, wavelengths: Sequence[float], num_heads: int
) -> Tensor:
    """TorchGeo DOFA ``forward_features`` (global_pool=True) from a state dict.

    Args:
        state: DOFA state dict (TorchGeo keys, including ``fc_norm.*``).
        x: Images (B, C, H, W), H and W giving the checkpoint's patch grid.
        wavelengths: C wavelengths in µm.
        num_heads: ViT attention heads.

    Returns:
        Features (B, D).
    """
    s = {k: v.detach().to(torch.float64) for k, v in state.items()}
    x = x.to(torch.float64)
    dim = s["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("blocks."))
    bands = len(wavelengths)

    # --- wavelength embedding → FCResLayer
    waves_nm = torch.tensor(list(wavelengths), dtype=torch.float32) * 1000
    emb = _sincos_1d(128, waves_nm.to(torch.float64))
    p = "patch_embed.fclayer."
    h = torch.relu(_dense(emb, s[p + "w1.weight"], s[p + "w1.bias"]))
    h = torch.relu(_dense(h, s[p + "w2.weight"], s[p + "w2.bias"]))
    waves = emb + h

    # --- weight generator: [128 weight tokens | C wave tokens | bias token]
    g = "patch_embed.weight_generator."
    tokens = torch.cat([s[g + "weight_tokens"], waves, s[g + "bias_token"]])
    enc = _generator_encoder_layer(s, tokens)
    wave_out = enc[N_WEIGHT_TOKENS : N_WEIGHT_TOKENS + bands]
    gen_w = _dense(wave_out + waves, s[g + "fc_weight.weight"], s[g + "fc_weight.bias"])
    gen_b = _dense(enc[-1], s[g + "fc_bias.weight"], s[g + "fc_bias.bias"])
    kernel = gen_w.reshape(bands, KERNEL, KERNEL, dim) * SCALER  # [c, u, v, d]
    bias = gen_b * SCALER

    # --- patch embedding as an explicit sum over 16x16 windows (zero padding 1, stride 16)
    b, _, hh, ww = x.shape
    padded = torch.zeros(b, bands, hh + 2, ww + 2, dtype=x.dtype)
    padded[:, :, 1:-1, 1:-1] = x
    gh = (hh + 2 - KERNEL) // KERNEL + 1
    gw = (ww + 2 - KERNEL) // KERNEL + 1
    cropped = padded[:, :, : gh * KERNEL, : gw * KERNEL]
    windows = cropped.reshape(b, bands, gh, KERNEL, gw, KERNEL)  # [b, c, i, u, j, v]
    patches = torch.einsum("bciujv,cuvd->bijd", windows, kernel) + bias
    patches = patches.reshape(b, gh * gw, dim)  # row-major patch order

    # --- tokens
    pos = s["pos_embed"]
    seq = torch.cat([(s["cls_token"] + pos[:, :1]).expand(b, 1, dim), patches + pos[:, 1:]], dim=1)

    # --- ViT blocks (timm Block: pre-norm, eps 1e-6)
    for i in range(depth):
        p = f"blocks.{i}."
        y = _layer_norm(seq, s[p + "norm1.weight"], s[p + "norm1.bias"], 1e-6)
        qkv = _dense(y, s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"])
        q, k, v = qkv[..., :dim], qkv[..., dim : 2 * dim], qkv[..., 2 * dim :]
        attn = _multi_head_attention(q, k, v, num_heads)
        seq = seq + _dense(attn, s[p + "attn.proj.weight"], s[p + "attn.proj.bias"])
        y = _layer_norm(seq, s[p + "norm2.weight"], s[p + "norm2.bias"], 1e-6)
        y = _dense(
            _gelu(_dense(y, s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"])),
            s[p + "mlp.fc2.weight"],
            s[p + "mlp.fc2.bias"],
        )
        seq = seq + y

    pooled = seq[:, 1:].mean(dim=1)
    out = _layer_norm(pooled, s["fc_norm.weight"], s["fc_norm.bias"], 1e-6)
    return out.to(torch.float32)
