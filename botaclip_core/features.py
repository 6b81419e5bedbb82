"""Frozen DOFA features of image tiles: normalisation, batching, a per-process model cache."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import numpy as np
import torch

from botaclip_core.models import build_dofa
from botaclip_core.models.dofa import DOFA
from botaclip_core.seeding import seeded

logger = logging.getLogger(__name__)

# without per-sensor statistics in the catalog, 8-bit DN are centred and scaled to unit-ish range
DEFAULT_MEAN_UINT8 = 127.5
DEFAULT_STD_UINT8 = 64.0


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


@functools.lru_cache(maxsize=2)
def load_backbone(size: str, weights: str | None, seed: int = 0) -> DOFA:
    """The DOFA backbone in eval mode, built once per process (Dask workers reuse it).

    Random initialisation is seeded so that every worker, and every rerun, builds the same model.
    """
    with seeded(seed):
        model = build_dofa(size=size, weights=weights)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def encode_tiles(
    model: DOFA,
    tiles: np.ndarray,
    wavelengths_um: Sequence[float],
    mean: np.ndarray,
    std: np.ndarray,
    *,
    batch_size: int = 8,
) -> np.ndarray:
    """DOFA features ``(N, D)`` float32 of DN tiles ``(N, C, H, W)``."""
    out = []
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(tiles), batch_size):
            x = normalize(tiles[start : start + batch_size], mean, std).to(device)
            out.append(model.forward_features(x, list(wavelengths_um)).float().cpu().numpy())
    dim = int(getattr(model, "embed_dim", 0))
    return np.concatenate(out, axis=0) if out else np.zeros((0, dim), dtype=np.float32)
