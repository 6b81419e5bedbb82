"""Pixel inputs of the DOFA training modes: input checks, augmentations and batches."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from botaclip_core.augment import Augmentation
from botaclip_core.errors import InputDataError
from botaclip_core.models.dofa import IMG_SIZE

logger = logging.getLogger(__name__)

BRIGHTNESS_RANGE = (0.9, 1.1)


def check_pixel_inputs(
    chips: np.ndarray,
    releves: np.ndarray,
    coords: np.ndarray,
    species: list[str],
    wavelengths_um: Sequence[float],
    mean: Sequence[float],
    std: Sequence[float],
    margin: int,
) -> None:
    """Check that chips, relevés, coordinates and band descriptions match.

    Args:
        chips: ``(n_plots, bands, S + 2 * margin, S + 2 * margin)`` DN.
        releves: ``(n_plots, n_species)`` cover or presence.
        coords: ``(n_plots, 2)`` map coordinates.
        species: Vocabulary.
        wavelengths_um: Centre wavelength of each band, in µm.
        mean: Per-band normalisation mean, in DN.
        std: Per-band normalisation std, in DN.
        margin: Pixels around the model window (``finetune.max_shift``).

    Raises:
        InputDataError: If the shapes or lengths do not match, or the window is under 16 px.

    """
    if chips.ndim != 4 or chips.shape[-1] != chips.shape[-2]:
        raise InputDataError(
            f"pixel chips have shape {tuple(chips.shape)}; expected square chips "
            "(n_plots, bands, S + 2 * max_shift, S + 2 * max_shift)"
        )
    n, bands, side = chips.shape[0], chips.shape[1], chips.shape[-1]
    if len(releves) != n or len(coords) != n or releves.shape[1] != len(species):
        raise InputDataError(
            f"{n} chips but {len(releves)} relevés and {len(coords)} coordinates "
            f"(relevés have {releves.shape[1]} species columns, vocabulary {len(species)}); "
            "pass one chip, relevé and coordinate pair per plot"
        )
    for name, values in (("wavelengths_um", wavelengths_um), ("mean", mean), ("std", std)):
        if len(values) != bands:
            raise InputDataError(f"{name} has {len(values)} values for {bands}-band chips")
    size = side - 2 * margin
    if size < 16:
        raise InputDataError(
            f"chips of {side} px with finetune.max_shift={margin} leave a {size} px window; cut "
            f"chips of {IMG_SIZE} + 2 * max_shift = {IMG_SIZE + 2 * margin} px"
        )
    if size != IMG_SIZE:
        logger.warning(
            "finetune: %d px model input (chips of %d px minus 2 x max_shift %d); DOFA was "
            "trained at %d px, so its position embedding is resampled",
            size,
            side,
            margin,
            IMG_SIZE,
        )


def draw_epoch_augmentations(
    gen: np.random.Generator, n: int, max_shift: int
) -> list[Augmentation]:
    """One random augmentation per plot: crop offset (chip-centre shift), flip, rot90, brightness.

    Drawn for every plot (not only the batch's), so a plot's augmentation depends only on the
    generator, never on the batch composition.

    Args:
        gen: The epoch's generator.
        n: Number of plots.
        max_shift: Largest chip-centre shift, in px, along rows and columns.

    Returns:
        ``n`` augmentations; brightness factors are uniform in :data:`BRIGHTNESS_RANGE`.

    """
    shifts = gen.integers(-max_shift, max_shift + 1, size=(n, 2))
    flips = gen.integers(0, 2, size=n)
    rots = gen.integers(0, 4, size=n)
    brightness = gen.uniform(*BRIGHTNESS_RANGE, size=n)
    return [
        Augmentation(
            flip=bool(flips[i]),
            rot90=int(rots[i]),
            shift_rows=int(shifts[i, 0]),
            shift_cols=int(shifts[i, 1]),
            brightness=float(brightness[i]),
        )
        for i in range(n)
    ]


def crop_chip(chip: np.ndarray, aug: Augmentation, *, margin: int, size: int) -> np.ndarray:
    """Cut the ``size`` px window of a ``(C, size + 2 margin, ...)`` chip, then flip and rotate.

    The order (window, flip, rotation) is :class:`botaclip_core.chips.ChipReader`'s; brightness
    is applied later, on the device.

    Args:
        chip: ``(C, size + 2 * margin, size + 2 * margin)`` DN.
        aug: The plot's augmentation.
        margin: Pixels around the model window.
        size: Side of the model window.

    Returns:
        ``(C, size, size)`` view of the chip.

    """
    r0, c0 = margin + aug.shift_rows, margin + aug.shift_cols
    out = chip[:, r0 : r0 + size, c0 : c0 + size]
    if aug.flip:
        out = out[:, :, ::-1]
    if aug.rot90:
        out = np.rot90(out, aug.rot90, axes=(1, 2))
    return out


class PixelBatches:
    """Turns plot indices + augmentations into normalised DOFA inputs on the device.

    Calling it with rows and per-plot augmentations (or None for the plain centre window)
    returns ``(len(rows), bands, S, S)`` float32 images standardised with ``mean``/``std``.

    Args:
        chips: ``(n_plots, bands, S + 2 * margin, S + 2 * margin)`` DN, 0 = nodata.
        margin: Pixels around the model window (the largest chip-centre shift).
        mean: Per-band normalisation mean, in DN.
        std: Per-band normalisation std, in DN.
        device: Where the images go.

    """

    def __init__(
        self,
        chips: np.ndarray,
        *,
        margin: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
    ) -> None:
        self.chips = chips
        self.margin = margin
        self.size = chips.shape[-1] - 2 * margin
        self.device = device
        bands = chips.shape[1]
        self.mean = torch.as_tensor(np.asarray(mean, np.float32), device=device).view(
            1, bands, 1, 1
        )
        self.std = torch.as_tensor(np.asarray(std, np.float32), device=device).view(1, bands, 1, 1)
        dtype = chips.dtype
        self.top = float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else math.inf

    def __call__(self, rows: np.ndarray, augs: Sequence[Augmentation] | None) -> Tensor:
        """Images of plots ``rows``; ``augs`` is indexed by plot (None: plain centre window)."""
        return self._on_device(torch.from_numpy(self._crops(rows, augs)), rows, augs)

    def stream(
        self,
        batches: Sequence[np.ndarray],
        augs: Sequence[Augmentation] | None,
        *,
        depth: int = 2,
    ) -> Iterator[Tensor]:
        """The images of each batch of rows in turn, cut ahead on a thread (the embed feeding path).

        The crops of the next ``depth`` batches are cut, flipped and rotated on a loader thread
        while the device trains on the current one; on CUDA they wait in pinned memory, so that
        the copy to the device does not block. Each batch equals ``self(rows, augs)``.
        """
        from botaclip_core.feeding import prefetch

        pin = self.device.type == "cuda"

        def load(rows: np.ndarray) -> Tensor:
            host = torch.from_numpy(self._crops(rows, augs))
            return host.pin_memory() if pin else host

        for rows, host in prefetch(batches, load, workers=1, depth=depth):
            yield self._on_device(host, rows, augs)

    def _crops(self, rows: np.ndarray, augs: Sequence[Augmentation] | None) -> np.ndarray:
        if augs is None:
            m, s = self.margin, self.size
            crops = np.ascontiguousarray(self.chips[rows][:, :, m : m + s, m : m + s])
        else:
            crops = np.stack(
                [
                    crop_chip(self.chips[i], augs[i], margin=self.margin, size=self.size)
                    for i in rows
                ]
            )
        if crops.dtype == np.uint16 or crops.dtype == np.uint32:  # torch lacks most uint16 ops
            crops = crops.astype(np.int64 if crops.dtype == np.uint32 else np.int32)
        return crops

    def _on_device(
        self, host: Tensor, rows: np.ndarray, augs: Sequence[Augmentation] | None
    ) -> Tensor:
        x = host.to(self.device, non_blocking=True).float()
        if augs is not None:
            factor = torch.tensor([augs[i].brightness for i in rows], dtype=torch.float32)
            factor = factor.to(self.device, non_blocking=True).view(-1, 1, 1, 1)
            # nodata (0) stays nodata, and valid pixels stay valid and in the data type's range
            x = torch.where(x > 0, (x * factor).clamp(1.0, self.top), x)
        return (x - self.mean) / self.std
