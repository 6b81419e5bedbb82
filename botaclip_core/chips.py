"""Image chips centred on plots, read from the image Zarr, with seeded augmentations."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import zarr
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from botaclip_core.augment import IDENTITY, Augmentation
from botaclip_core.grid import RegionGrid
from botaclip_core.tiling import aligned_offset


def _augment(chip: np.ndarray, aug: Augmentation) -> np.ndarray:
    """Flip, rotate and scale the brightness of a (bands, h, w) chip; nodata (0) stays 0."""
    if aug.flip:
        chip = chip[:, :, ::-1]
    if aug.rot90:
        chip = np.rot90(chip, aug.rot90, axes=(1, 2))
    if aug.brightness != 1.0:
        top = np.iinfo(chip.dtype).max if np.issubdtype(chip.dtype, np.integer) else np.inf
        valid = chip > 0
        chip = np.where(valid, np.clip(chip * aug.brightness, 1, top), 0).astype(chip.dtype)
    return np.ascontiguousarray(chip)


class ChipReader:
    """Reads ``size`` × ``size`` chips of the image Zarr around pixel positions, zero-padded."""

    def __init__(self, image_zarr: Path, size: int) -> None:
        self.image = zarr.open_array(str(Path(image_zarr) / "image"), mode="r")
        self.size = size
        self.n_bands, self.height, self.width = (int(n) for n in self.image.shape)
        self.dtype = np.dtype(self.image.dtype)

    def read(self, row: int, col: int, aug: Augmentation = IDENTITY) -> np.ndarray:
        """The chip centred on (row, col) after ``aug``; pixels outside the image are 0."""
        half = self.size // 2
        r0, c0 = row + aug.shift_rows - half, col + aug.shift_cols - half
        chip = np.zeros((self.n_bands, self.size, self.size), dtype=self.dtype)
        rr0, cc0 = max(r0, 0), max(c0, 0)
        rr1, cc1 = min(r0 + self.size, self.height), min(c0 + self.size, self.width)
        if rr1 > rr0 and cc1 > cc0:
            chip[:, rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0] = np.asarray(
                self.image[:, rr0:rr1, cc0:cc1]
            )
        return _augment(chip, aug)


class SourceChipReader:
    """Reads chips straight from the orthophoto files, on the region grid, without tiling.

    Training needs pixels only around the relevé plots: reading those windows from the sources
    (warped onto the grid where a source is not on it) avoids tiling a whole département first.
    Sources are read in ``sources`` order and the first valid source wins at each pixel, as in
    :func:`botaclip_core.tiling.tile_orthophotos` with ``catalog_order`` precedence.

    Args:
        sources: orthophoto files in precedence order.
        grid: the region grid.
        size: chip side in pixels.
        nodata: overrides the files' nodata value.
        resampling: resampling for sources not on the grid.
    """

    def __init__(
        self,
        sources: list[Path],
        grid: RegionGrid,
        size: int,
        *,
        nodata: float | None = None,
        resampling: str = "bilinear",
    ) -> None:
        self.size = size
        self.grid = grid
        self._stack = contextlib.ExitStack()
        self._readers: list[tuple[Any, tuple[int, int] | None]] = []
        self._nodata_override = nodata
        method = Resampling[resampling]
        for path in sources:
            ds = self._stack.enter_context(rasterio.open(path))
            if nodata is not None:
                ds_nodata: float | None = nodata
            else:
                ds_nodata = ds.nodata
            offset = aligned_offset(ds, grid)
            if offset is None:
                vrt = self._stack.enter_context(
                    WarpedVRT(
                        ds,
                        crs=grid.crs_obj,
                        transform=grid.transform,
                        width=grid.width,
                        height=grid.height,
                        resampling=method,
                        src_nodata=ds_nodata,
                        nodata=ds_nodata,
                    )
                )
                self._readers.append((vrt, None))
            else:
                self._readers.append((ds, offset))
        first = self._readers[0][0]
        self.n_bands = first.count
        self.dtype = np.dtype(first.dtypes[0])

    def close(self) -> None:
        """Close the source files."""
        self._stack.close()

    def read_with_mask(
        self, row: int, col: int, size: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(bands, size, size)`` pixels centred on grid (row, col) and their validity."""
        size = size or self.size
        r0, c0 = row - size // 2, col - size // 2
        chip = np.zeros((self.n_bands, size, size), dtype=self.dtype)
        filled = np.zeros((size, size), dtype=bool)
        for reader, offset in self._readers:
            if filled.all():
                break
            if offset is None:  # a WarpedVRT spanning the grid: clip the window to it
                rr0, cc0 = max(r0, 0), max(c0, 0)
                rr1, cc1 = min(r0 + size, self.grid.height), min(c0 + size, self.grid.width)
                if rr1 <= rr0 or cc1 <= cc0:
                    continue
                window = Window(cc0, rr0, cc1 - cc0, rr1 - rr0)
                data = np.zeros((self.n_bands, size, size), dtype=self.dtype)
                mask = np.zeros((size, size), dtype=bool)
                inner = (slice(rr0 - r0, rr1 - r0), slice(cc0 - c0, cc1 - c0))
                data[(slice(None), *inner)] = reader.read(window=window)
                mask[inner] = reader.read_masks(window=window).max(axis=0) > 0
            else:
                window = Window(c0 - offset[1], r0 - offset[0], size, size)
                data = reader.read(window=window, boundless=True, fill_value=0)
                mask = reader.read_masks(window=window, boundless=True).max(axis=0) > 0
            valid = mask
            if self._nodata_override is not None:
                valid &= (data != self._nodata_override).any(axis=0)
            take = valid & ~filled
            chip[:, take] = data[:, take]
            filled |= take
        return chip, filled

    def read(self, row: int, col: int, aug: Augmentation = IDENTITY) -> np.ndarray:
        """The chip centred on (row, col) after ``aug``, like :meth:`ChipReader.read`."""
        chip, _ = self.read_with_mask(row + aug.shift_rows, col + aug.shift_cols)
        return _augment(chip, aug)
