"""Block geometry of a run: the settings its blocks share, and the blocks sources touch."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from botaclip_core.grid import RegionGrid
from botaclip_core.tiling.sources import _Source

logger = logging.getLogger(__name__)

# a Dask task is one shard (written whole, by one task), or 8×8 blocks when unsharded: blocks of
# a task share decompressed source tiles and warps
_TASK_SIDE = 8


@dataclass(frozen=True)
class _Job:
    """Settings shared by every block of a run."""

    out: str
    records: str
    grid: RegionGrid
    tile_size: int
    n_bands: int
    dtype: str
    resampling: str
    shard_blocks: int


_Piece = tuple[slice, slice, np.ndarray, np.ndarray | None]
"""(block rows, block cols, data (band, y, x), valid (y, x) or None where all valid)."""


def _super_block_side(shard_blocks: int) -> int:
    """Blocks per side of a task's super-block: the shard, or _TASK_SIDE when unsharded."""
    return shard_blocks if shard_blocks > 1 else _TASK_SIDE


def _block_window(job: _Job, block_id: int) -> tuple[int, int, int, int, int, int]:
    """(block row, block col, first grid row, first grid col, height, width) of a block."""
    n_bcols = math.ceil(job.grid.width / job.tile_size)
    brow, bcol = divmod(block_id, n_bcols)
    r0, c0 = brow * job.tile_size, bcol * job.tile_size
    h = min(job.tile_size, job.grid.height - r0)
    w = min(job.tile_size, job.grid.width - c0)
    return brow, bcol, r0, c0, h, w


def _footprint_blocks(src: _Source, grid: RegionGrid, tile_size: int) -> tuple[int, ...]:
    """(row0, row1, col0, col1) of the grid blocks a source's footprint touches, unclipped."""
    left, bottom, right, top = src.footprint
    step = grid.resolution * tile_size
    return (
        math.floor((grid.top - top) / step + 1e-9),
        math.ceil((grid.top - bottom) / step - 1e-9),
        math.floor((left - grid.left) / step + 1e-9),
        math.ceil((right - grid.left) / step - 1e-9),
    )


def _candidate_blocks(
    infos: list[_Source], grid: RegionGrid, tile_size: int, n_bcols: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Blocks touched by a source footprint, with their sources in precedence order."""
    n_brows = math.ceil(grid.height / tile_size)
    pair_blocks, pair_srcs = [], []
    for idx, s in enumerate(infos):
        r0, r1, c0, c1 = _footprint_blocks(s, grid, tile_size)
        c0, r0 = max(c0, 0), max(r0, 0)
        c1, r1 = min(c1, n_bcols), min(r1, n_brows)
        if c0 >= c1 or r0 >= r1:
            logger.warning(
                "%s: does not intersect the region grid %s; skipped", s.path, grid.bounds
            )
            continue
        rows, cols = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
        ids = (rows * n_bcols + cols).ravel()
        pair_blocks.append(ids)
        pair_srcs.append(np.full(ids.size, idx, dtype=np.int32))
    if not pair_blocks:
        return np.empty(0, dtype=np.int64), []
    blocks = np.concatenate(pair_blocks).astype(np.int64)
    srcs = np.concatenate(pair_srcs)
    order = np.lexsort((srcs, blocks))
    blocks, srcs = blocks[order], srcs[order]
    unique, starts = np.unique(blocks, return_index=True)
    return unique, np.split(srcs, starts[1:])


def _shard_ids(block_ids: np.ndarray, n_bcols: int, side: int) -> np.ndarray:
    """Id of the ``side`` × ``side`` super-block (shard) of each block."""
    rows, cols = block_ids // n_bcols, block_ids % n_bcols
    return (rows // side) * math.ceil(n_bcols / side) + cols // side
