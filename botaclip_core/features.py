"""Frozen DOFA features of image tiles: normalisation, device, precision, a per-process cache."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from botaclip_core.errors import CatalogError
from botaclip_core.models import build_dofa
from botaclip_core.models.dofa import DOFA
from botaclip_core.seeding import seeded

logger = logging.getLogger(__name__)

# without per-sensor statistics in the catalog, 8-bit DN are centred and scaled to unit-ish range
DEFAULT_MEAN_UINT8 = 127.5
DEFAULT_STD_UINT8 = 64.0

PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
CPU_BATCH_SIZE = 8
# tiles per forward that keep an H100-class GPU busy in bf16 (activations well under 20 GiB)
CUDA_BATCH_SIZES = {"tiny": 1024, "small": 512, "base": 256, "large": 128}


def band_statistics(
    n_bands: int, dtype: str, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-band normalisation mean/std in DN: the catalog's, or defaults for the data type."""
    scale = 1.0 if np.dtype(dtype) == np.uint8 else 257.0  # uint16 orthophotos span 0–65535
    m = np.asarray(
        mean if mean is not None else [DEFAULT_MEAN_UINT8 * scale] * n_bands, dtype=np.float32
    )
    s = np.asarray(
        std if std is not None else [DEFAULT_STD_UINT8 * scale] * n_bands, dtype=np.float32
    )
    return m, s


def normalize(tiles: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """``(N, C, H, W)`` DN → float tensor standardised per band."""
    x = torch.from_numpy(np.ascontiguousarray(tiles)).float()
    m = torch.from_numpy(mean).view(1, -1, 1, 1)
    s = torch.from_numpy(std).view(1, -1, 1, 1)
    return (x - m) / s


def plan_precision(device: str, requested: str = "auto") -> str:
    """The precision a run on ``embed.device`` computes in, decided when the stage is planned.

    ``auto`` is bf16 on CUDA (``cuda``, ``cuda:N``, or ``auto`` where this process sees a GPU)
    and fp32 on the CPU. The stage key holds this precision, not the device: fp32 maps computed
    on a GPU or a CPU are the same map, a bf16 map is another.

    Raises:
        CatalogError: for an unknown precision.
    """
    if requested not in ("auto", *PRECISIONS):
        raise CatalogError(
            f"embed.precision: {requested!r} is not a precision; use auto, {', '.join(PRECISIONS)}"
        )
    if requested != "auto":
        return requested
    if device == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return "bf16" if device.startswith("cuda") else "fp32"


def default_batch_size(device: torch.device, size: str) -> int:
    """Tiles per forward: a full GPU on CUDA, 8 on the CPU (larger batches gain nothing there)."""
    if device.type == "cuda":
        return CUDA_BATCH_SIZES.get(size, 256)
    return CPU_BATCH_SIZE


def precision_context(device: torch.device, precision: str) -> Callable[[], Any]:
    """A factory of the context DOFA forwards run in: bf16 autocast on CUDA, else nothing.

    Raises:
        CatalogError: for bf16 on a CPU (CPU autocast is slower than fp32, and a map's precision
            must not depend on where a block ran).
    """
    if precision == "bf16":
        if device.type != "cuda":
            raise CatalogError(
                f"embed.precision is bf16 but the forward runs on {device}; bf16 maps are "
                "computed on CUDA devices only: set embed.device to cuda, or embed.precision "
                "to fp32 (or auto)"
            )
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


@functools.lru_cache(maxsize=4)
def _cached_backbone(size: str, weights: str | None, seed: int, device: str) -> DOFA:
    with seeded(seed):
        model = build_dofa(size=size, weights=weights)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(torch.device(device))


def load_backbone(
    size: str, weights: str | None, seed: int = 0, device: str | torch.device | None = None
) -> DOFA:
    """The DOFA backbone in eval mode on ``device``, built once per process (workers reuse it).

    Random initialisation is seeded so that every worker, and every rerun, builds the same model.

    Args:
        size: DOFA size.
        weights: checkpoint path, or None for seeded random weights.
        seed: seed of the random initialisation.
        device: where the model lives (default: the CPU); it stays there between calls.
    """
    name = str(torch.device(device)) if device is not None else "cpu"
    return _cached_backbone(size, weights, seed, name)


load_backbone.cache_clear = _cached_backbone.cache_clear  # type: ignore[attr-defined]


def encode_tiles(
    model: DOFA,
    tiles: np.ndarray,
    wavelengths_um: Sequence[float],
    mean: np.ndarray,
    std: np.ndarray,
    *,
    batch_size: int | None = 8,
    precision: str | None = None,
) -> np.ndarray:
    """DOFA features ``(N, D)`` float32 of DN tiles ``(N, C, H, W)``, on the model's device.

    Args:
        model: the backbone (its device is where the forward runs).
        tiles: DN tiles.
        wavelengths_um: one wavelength per band, in µm.
        mean: per-band normalisation mean, in DN.
        std: per-band normalisation std, in DN.
        batch_size: tiles per forward; None: the device's default.
        precision: ``fp32`` or ``bf16``; None: bf16 on CUDA, fp32 on the CPU.
    """
    device = next(model.parameters()).device
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    autocast = precision_context(device, precision)
    batch = batch_size or default_batch_size(device, _size_of(model))
    out = []
    with torch.inference_mode():
        for start in range(0, len(tiles), batch):
            x = normalize(tiles[start : start + batch], mean, std).to(device)
            with autocast():
                feats = model.forward_features(x, list(wavelengths_um))
            out.append(feats.float().cpu().numpy())
    dim = int(getattr(model, "embed_dim", 0))
    return np.concatenate(out, axis=0) if out else np.zeros((0, dim), dtype=np.float32)


def _size_of(model: DOFA) -> str:
    from botaclip_core.models.dofa import DOFA_SIZES

    for name, spec in DOFA_SIZES.items():
        if (spec.embed_dim, spec.depth) == (model.embed_dim, model.depth):
            return name
    return "base"
