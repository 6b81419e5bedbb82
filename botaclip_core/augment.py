"""Augmented views of chips: flips, 90° rotations, shifts and brightness, drawn reproducibly.

No raster library here: the training code (and a GPU box without GDAL) uses these too; the
chip readers that apply them to orthophotos are in :mod:`botaclip_core.chips`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["IDENTITY", "Augmentation", "draw_augmentations"]


@dataclass(frozen=True)
class Augmentation:
    """One augmented view: flips, 90° rotations, a chip-centre shift and a brightness factor."""

    flip: bool = False
    rot90: int = 0
    shift_rows: int = 0
    shift_cols: int = 0
    brightness: float = 1.0


IDENTITY = Augmentation()


def draw_augmentations(n_views: int, *, seed: int, max_shift: int = 16) -> list[Augmentation]:
    """View 0 is the plain chip; later views are random, deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    views = [IDENTITY]
    for _ in range(n_views - 1):
        views.append(
            Augmentation(
                flip=bool(rng.integers(2)),
                rot90=int(rng.integers(4)),
                shift_rows=int(rng.integers(-max_shift, max_shift + 1)),
                shift_cols=int(rng.integers(-max_shift, max_shift + 1)),
                brightness=float(rng.uniform(0.9, 1.1)),
            )
        )
    return views
