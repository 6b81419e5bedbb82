"""Image chips centred on plots, read from the image Zarr, with seeded augmentations."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr


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


class ChipReader:
    """Reads ``size`` × ``size`` chips of the image Zarr around pixel positions, zero-padded."""

    def __init__(self, image_zarr: Path, size: int) -> None:
        group = zarr.open_group(str(image_zarr), mode="r")
        self.image = group["image"]
        self.size = size
        self.n_bands, self.height, self.width = self.image.shape
        self.dtype = self.image.dtype

    def read(self, row: int, col: int, aug: Augmentation = IDENTITY) -> np.ndarray:
        """The chip centred on (row, col) after ``aug``; pixels outside the image are 0."""
        half = self.size // 2
        r0, c0 = row + aug.shift_rows - half, col + aug.shift_cols - half
        chip = np.zeros((self.n_bands, self.size, self.size), dtype=self.dtype)
        rr0, cc0 = max(r0, 0), max(c0, 0)
        rr1, cc1 = min(r0 + self.size, self.height), min(c0 + self.size, self.width)
        if rr1 > rr0 and cc1 > cc0:
            chip[:, rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0] = self.image[:, rr0:rr1, cc0:cc1]
        if aug.flip:
            chip = chip[:, :, ::-1]
        if aug.rot90:
            chip = np.rot90(chip, aug.rot90, axes=(1, 2))
        if aug.brightness != 1.0:
            top = np.iinfo(self.dtype).max if np.issubdtype(self.dtype, np.integer) else np.inf
            valid = chip > 0  # nodata stays nodata
            chip = np.where(valid, np.clip(chip * aug.brightness, 1, top), 0).astype(self.dtype)
        return np.ascontiguousarray(chip)
