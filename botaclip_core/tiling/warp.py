"""Warping of sources off the grid lattice onto it with GDAL, their validity warped alongside."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from affine import Affine
from rasterio.enums import Resampling
from rasterio.warp import reproject
from rasterio.windows import Window

from botaclip_core.tiling.blocks import _footprint_blocks, _Job, _Piece, _super_block_side
from botaclip_core.tiling.handles import _dataset, _transformer
from botaclip_core.tiling.sources import _Source, _source_valid

# source pixels read around a block's footprint so that the resampling kernel has support
_KERNEL_PAD = {"nearest": 1, "bilinear": 2, "cubic": 3, "average": 2}


class _TaskWarps:
    """Warped sources of one task, each warped once onto the task's super-block.

    GDAL's warper costs milliseconds to set up, more than warping a block: a source is warped
    onto the whole super-block (the shard, or the 8×8 blocks of an unsharded task), cut to the
    source's footprint on block boundaries, and blocks are sliced from it. The region depends
    only on the super-block and the source, not on which of its blocks a (resumed) run still
    has to do, so resumed runs warp the same pixels as uninterrupted ones.
    """

    def __init__(self, job: _Job, block_id: int) -> None:
        side = _super_block_side(job.shard_blocks)
        n_bcols = math.ceil(job.grid.width / job.tile_size)
        brow, bcol = divmod(block_id, n_bcols)
        t = job.tile_size
        self.job = job
        self.rows = (brow // side * side * t, min((brow // side + 1) * side * t, job.grid.height))
        self.cols = (bcol // side * side * t, min((bcol // side + 1) * side * t, job.grid.width))
        self._warped: dict[str, tuple[int, int, np.ndarray, np.ndarray] | None] = {}

    def pieces(self, src: _Source, r0: int, c0: int, h: int, w: int) -> list[_Piece]:
        """The warped source on block (r0, c0, h, w), if it has valid pixels there."""
        if src.path not in self._warped:
            self._warped[src.path] = self._warp(src)
        warped = self._warped[src.path]
        if warped is None:
            return []
        wr0, wc0, data, valid = warped
        ys = slice(max(r0 - wr0, 0), max(min(r0 + h - wr0, valid.shape[0]), 0))
        xs = slice(max(c0 - wc0, 0), max(min(c0 + w - wc0, valid.shape[1]), 0))
        if ys.start >= ys.stop or xs.start >= xs.stop or not valid[ys, xs].any():
            return []
        return [
            (
                slice(ys.start + wr0 - r0, ys.stop + wr0 - r0),
                slice(xs.start + wc0 - c0, xs.stop + wc0 - c0),
                data[:, ys, xs],
                valid[ys, xs],
            )
        ]

    def _warp(self, src: _Source) -> tuple[int, int, np.ndarray, np.ndarray] | None:
        job, t = self.job, self.job.tile_size
        # the footprint's blocks, in grid pixels, inside the super-block
        br0, br1, bc0, bc1 = _footprint_blocks(src, job.grid, t)
        r0, r1 = max(self.rows[0], br0 * t), min(self.rows[1], br1 * t)
        c0, c1 = max(self.cols[0], bc0 * t), min(self.cols[1], bc1 * t)
        if r0 >= r1 or c0 >= c1:
            return None
        warped = _warp_window(src, job, r0, c0, r1 - r0, c1 - c0)
        return None if warped is None else (r0, c0, *warped)


@dataclass(frozen=True)
class _Reprojection:
    """A source window's reprojection onto a grid window: what its GDAL warps share."""

    src_transform: Affine
    src_crs: Any
    dst_transform: Affine
    dst_crs: Any
    resampling: Resampling
    alpha_max: int  # the validity band's "valid": the dtype's maximum, 1 for floats

    def __call__(
        self, source: np.ndarray, dest: np.ndarray, row: int, col: int, alpha: int = 0
    ) -> None:
        """Warp ``source`` onto ``dest``, whose (0, 0) is pixel (row, col) of the grid window.

        ``alpha`` is the 1-based band of ``source`` holding its validity (0: none). The last band
        of ``dest`` marks the destination pixels the source covers.
        """
        kwargs = {"SRC_ALPHA_MAX": self.alpha_max, "DST_ALPHA_MAX": self.alpha_max} if alpha else {}
        reproject(
            source=source,
            destination=dest,
            src_transform=self.src_transform,
            src_crs=self.src_crs,
            dst_transform=self.dst_transform * Affine.translation(col, row),
            dst_crs=self.dst_crs,
            src_alpha=alpha,
            dst_alpha=dest.shape[0],
            resampling=self.resampling,
            num_threads=1,
            init_dest_nodata=False,
            **kwargs,
        )


def _warp_window(
    src: _Source, job: _Job, r0: int, c0: int, h: int, w: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Warp the part of a source around grid window (r0, c0, h, w) onto it: (data, valid)."""
    dst_transform = job.grid.transform * Affine.translation(c0, r0)
    ds = _dataset(src.path, src.stamp)
    window = _source_window(src, job, ds, dst_transform, h, w)
    if window is None:
        return None
    data = ds.read(window=window)
    valid = _source_valid(ds, src, data, window)
    if not valid.any():
        return None
    warp = _Reprojection(
        src_transform=ds.window_transform(window),
        src_crs=ds.crs,
        dst_transform=dst_transform,
        dst_crs=job.grid.crs_obj,
        resampling=Resampling[job.resampling],
        alpha_max=np.iinfo(data.dtype).max if data.dtype.kind in "ui" else 1,
    )
    if valid.all():
        # no source mask: GDAL's fast kernels
        n = data.shape[0]
        dest = np.zeros((n + 1, h, w), dtype=data.dtype)
        warp(data, dest, 0, 0)
        return dest[:n], dest[n] > 0
    return _warp_masked(warp, data, valid, h, w)


def _source_window(
    src: _Source, job: _Job, ds: Any, dst_transform: Affine, h: int, w: int
) -> Window | None:
    """Source pixels under an h × w grid window, padded for the kernel, clipped to the source."""
    # the block outline, densified, in source pixel coordinates
    t = np.linspace(0.0, 1.0, 9)
    px = np.concatenate([t * w, np.full(9, float(w)), t * w, np.zeros(9)])
    py = np.concatenate([np.zeros(9), t * h, np.full(9, float(h)), t * h])
    mx = dst_transform.c + px * dst_transform.a
    my = dst_transform.f + py * dst_transform.e
    sx, sy = _transformer(job.grid.crs, src.crs_wkt).transform(mx, my)
    inv = ~ds.transform
    xs = inv.a * sx + inv.b * sy + inv.c
    ys = inv.d * sx + inv.e * sy + inv.f
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        return None
    pad = _KERNEL_PAD[job.resampling]
    if job.resampling == "average":
        # average spans the whole destination pixel: pad by the scale ratio
        pad += math.ceil(job.grid.resolution / min(abs(ds.transform.a), abs(ds.transform.e)))
    col0 = max(math.floor(xs.min()) - pad, 0)
    col1 = min(math.ceil(xs.max()) + pad, src.width)
    row0 = max(math.floor(ys.min()) - pad, 0)
    row1 = min(math.ceil(ys.max()) + pad, src.height)
    if col0 >= col1 or row0 >= row1:
        return None
    return Window(col0, row0, col1 - col0, row1 - row0)


def _warp_masked(
    warp: _Reprojection, data: np.ndarray, valid: np.ndarray, h: int, w: int
) -> tuple[np.ndarray, np.ndarray]:
    """Warp a source window with a validity mask, the mask as an alpha band: (data, valid)."""
    n = data.shape[0]
    stack = np.empty((n + 1, *data.shape[1:]), dtype=data.dtype)
    stack[:n] = data
    stack[n] = np.where(valid, warp.alpha_max, 0)
    if data.dtype.kind not in "ui":
        dest = np.zeros((n + 1, h, w), dtype=data.dtype)
        warp(stack, dest, 0, 0, alpha=n + 1)
        return dest[:n], dest[n] > 0
    return _warp_integer_masked(warp, stack, h, w)


def _warp_integer_masked(
    warp: _Reprojection, stack: np.ndarray, h: int, w: int
) -> tuple[np.ndarray, np.ndarray]:
    """Warp integer bands whose last band is the validity, fast where the kernel is all valid.

    GDAL honours a source mask only in its general kernels, 3× slower: warp the validity as a
    plain band with the fast kernels first. Where it comes out at its maximum, every source pixel
    under the kernel was valid and the fast values are exact; only pixels whose kernel straddles
    the edge of the valid area are warped again, on their bounding box, with the mask.
    """
    n = stack.shape[0] - 1
    amax = warp.alpha_max
    dest = np.zeros((n + 2, h, w), dtype=stack.dtype)
    warp(stack, dest, 0, 0)
    covered = dest[n + 1] > 0
    out_valid = covered & (dest[n] == amax)
    edge = covered & (dest[n] > 0) & (dest[n] < amax)
    if edge.any():
        rows, cols = np.flatnonzero(edge.any(axis=1)), np.flatnonzero(edge.any(axis=0))
        ys, xs = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
        sub = np.zeros((n + 1, ys.stop - ys.start, xs.stop - xs.start), dtype=stack.dtype)
        warp(stack, sub, ys.start, xs.start, alpha=n + 1)
        fix = edge[ys, xs]
        np.copyto(dest[:n, ys, xs], sub[:n], where=fix)
        out_valid[ys, xs] |= fix & (sub[n] > 0)
    return dest[:n], out_valid
