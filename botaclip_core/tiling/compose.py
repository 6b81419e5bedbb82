"""Composition of a block from the pieces of its sources, in precedence order."""

from __future__ import annotations

import numpy as np

from botaclip_core.tiling.blocks import _block_window, _Job, _Piece
from botaclip_core.tiling.sources import _Source
from botaclip_core.tiling.tile_cache import _read_aligned
from botaclip_core.tiling.warp import _TaskWarps


def _compose_block(
    job: _Job, block_id: int, srcs: list[_Source], warps: _TaskWarps
) -> tuple[int, int, np.ndarray | None, np.ndarray | None]:
    """Pixels of one block from its sources in precedence order.

    Returns:
        (block row, block col, image, valid), image None where no source had a valid pixel, and
        valid None where every pixel of the block is valid.

    """
    brow, bcol, r0, c0, h, w = _block_window(job, block_id)
    image: np.ndarray | None = None
    filled = np.zeros((h, w), dtype=bool)
    n_filled = 0  # pixels filled, counted while every piece so far was wholly valid
    masked = False  # a piece had a validity mask: n_filled no longer counts
    first = True  # the pieces of the first contributing source do not overlap each other
    for src in srcs:
        contributed = False
        for ys, xs, data, valid in _source_pieces(src, job, warps, r0, c0, h, w):
            if valid is not None and not valid.any():
                continue
            contributed = True
            if image is None:
                # not zeroed: pixels left unfilled are zeroed at the end
                image = np.empty((job.n_bands, h, w), dtype=job.dtype)
            region = filled[ys, xs]  # a view: updating it updates filled
            if not first and region.any():
                take = ~region if valid is None else valid & ~region
                np.copyto(image[:, ys, xs], data, where=take)
                region |= take
                masked = True
            elif valid is None:
                image[:, ys, xs] = data
                region[...] = True
                n_filled += region.size
            else:
                np.copyto(image[:, ys, xs], data, where=valid)
                region[...] = valid
                masked = True
        first = first and not contributed
        if contributed and (n_filled == h * w if not masked else bool(filled.all())):
            return brow, bcol, image, None
    if image is None or not filled.any():
        return brow, bcol, None, None
    np.copyto(image, 0, where=~filled)
    return brow, bcol, image, filled


def _source_pieces(
    src: _Source, job: _Job, warps: _TaskWarps, r0: int, c0: int, h: int, w: int
) -> list[_Piece]:
    """A source's pieces on block (r0, c0, h, w): copied if aligned, else warped."""
    if src.offset is not None:
        return _read_aligned(src, job, r0, c0, h, w)
    return warps.pieces(src, r0, c0, h, w)
