"""Training data: cached features and relevés, the spatial split and the relevé encoder input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from botaclip_core.catalog import FinetuneSettings
from botaclip_core.errors import StageError

MIN_PLOTS = 8


@dataclass
class TrainingData:
    """Cached frozen features and the matching relevés.

    Attributes:
        features: ``(n_plots, n_views, D)`` frozen DOFA features, view 0 un-augmented.
        releves: ``(n_plots, n_species)`` cover or presence.
        coords: ``(n_plots, 2)`` map coordinates, for the spatial validation split.
        species: vocabulary.

    """

    features: np.ndarray
    releves: np.ndarray
    coords: np.ndarray
    species: list[str]


def spatial_split(coords: np.ndarray, val_fraction: float, *, seed: int) -> np.ndarray:
    """Boolean validation mask holding out whole spatial blocks (about 25 blocks in all).

    Args:
        coords: ``(n_plots, 2)`` map coordinates.
        val_fraction: Share of the plots to hold out (at least; whole blocks are taken).
        seed: Seed of the block order.

    Returns:
        ``(n_plots,)`` boolean mask, True for validation plots.

    Raises:
        StageError: If the hold-out would be empty or take every plot.

    """
    n = len(coords)
    span = np.ptp(coords, axis=0).max() or 1.0
    block = span / 5.0
    keys = np.floor((coords - coords.min(axis=0)) / block).astype(np.int64)
    block_id = keys[:, 0] * 1000 + keys[:, 1]
    blocks = np.unique(block_id)
    rng = np.random.default_rng(seed)
    rng.shuffle(blocks)
    val = np.zeros(n, dtype=bool)
    for b in blocks:
        if val.sum() >= val_fraction * n:
            break
        val |= block_id == b
    if val.all() or not val.any():
        raise StageError(
            f"cannot hold out {val_fraction:.0%} of {n} plots spatially; add relevés or change "
            "finetune.val_fraction"
        )
    return val


def split_plots(coords: np.ndarray, settings: FinetuneSettings) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation plot indices from :func:`spatial_split`.

    Args:
        coords: ``(n_plots, 2)`` map coordinates.
        settings: ``val_fraction`` and ``seed`` are used.

    Returns:
        The training and the validation plot indices.

    Raises:
        StageError: If there are fewer than 8 plots or no spatial hold-out is possible.

    """
    n = len(coords)
    if n < MIN_PLOTS:
        raise StageError(
            f"only {n} relevés with image chips; BotaCLIP needs at least {MIN_PLOTS} to train"
        )
    val_mask = spatial_split(
        np.asarray(coords, dtype=np.float64), settings.val_fraction, seed=settings.seed
    )
    return np.flatnonzero(~val_mask), np.flatnonzero(val_mask)


def releve_input(releves: np.ndarray, kind: str) -> np.ndarray:
    """Relevé encoder input: presence/absence, or cover as a fraction (0–1).

    Args:
        releves: ``(n_plots, n_species)`` cover (percent or fraction) or presence.
        kind: ``"presence"``, or anything else for cover.

    Returns:
        ``(n_plots, n_species)`` float32 input.

    """
    if kind == "presence":
        return (releves > 0).astype(np.float32)
    top = float(releves.max()) or 1.0
    return (releves / (100.0 if top > 1.0 else 1.0)).astype(np.float32)


def feature_tensor(features: np.ndarray, device: torch.device) -> torch.Tensor:
    """Cached features as a contiguous float32 tensor on ``device``.

    Args:
        features: ``(n_plots, n_views, D)`` frozen DOFA features.
        device: Where the tensor goes.

    Returns:
        The features on ``device``.

    """
    return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(device)
