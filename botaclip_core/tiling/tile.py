"""Orthophotos → image Zarr on a region grid, block by block, sparse, parallel and resumable."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from botaclip_core import progress
from botaclip_core.errors import InputDataError
from botaclip_core.grid import RegionGrid
from botaclip_core.tiling.blocks import _candidate_blocks, _Job, _shard_ids
from botaclip_core.tiling.image_store import _consolidate, _prepare_store
from botaclip_core.tiling.records import records_dir
from botaclip_core.tiling.sources import (
    _fingerprint,
    _inspect_source,
    _order_sources,
    _Source,
    check_same_dtype,
)
from botaclip_core.tiling.tasks import _group_tasks, _run_wave, _waves
from botaclip_core.tiling.tile_cache import _TILES

if TYPE_CHECKING:
    import distributed

logger = logging.getLogger(__name__)

RESAMPLING_METHODS = ("nearest", "bilinear", "cubic", "average")
PRECEDENCE_POLICIES = ("catalog_order", "newest_first")
DEFAULT_SHARD_BLOCKS = 8
# zstd level 1 stores real 0.1–5 m orthophotos 8–25 % smaller than uncompressed at ~600 MB/s per
# core; negative levels are 4× faster but leave such imagery about as large as it is
DEFAULT_ZSTD_LEVEL = 1
# bump when the bytes a run writes change, so stale partial stores are not resumed
_LAYOUT_VERSION = 2


@dataclass(frozen=True)
class TilingResult:
    """Summary of a tiling run.

    Attributes:
        path: the image Zarr store.
        grid: the region grid the store is written on.
        n_blocks: blocks (tile_size × tile_size) in the whole region grid.
        n_written: blocks written by this run.
        n_skipped_resumed: blocks skipped because an earlier run recorded them as done.
        n_empty: blocks examined by this run whose intersecting sources were all nodata.
        dtype: dtype of the ``image`` variable.

    """

    path: Path
    grid: RegionGrid
    n_blocks: int
    n_written: int
    n_skipped_resumed: int
    n_empty: int
    dtype: str


def tile_orthophotos(
    sources: Sequence[Path],
    out: Path,
    *,
    grid: RegionGrid,
    bands: list[str],
    wavelengths_um: list[float],
    tile_size: int = 224,
    resampling: str = "bilinear",
    nodata: float | None = None,
    precedence: str = "catalog_order",
    shard_blocks: int = DEFAULT_SHARD_BLOCKS,
    zstd_level: int = DEFAULT_ZSTD_LEVEL,
    workers: int | None = None,
    dask_client: distributed.Client | None = None,
) -> TilingResult:
    """Write orthophotos onto ``grid`` as an image Zarr, one tile_size × tile_size block at a time.

    Each block of the grid gets the pixels of the sources whose footprint intersects it. A source
    already on the grid (same CRS and resolution, origin an integer number of pixels away) is
    copied exactly with a windowed read; any other is warped onto the block with
    ``rasterio.warp.reproject`` and ``resampling``, its validity mask warped alongside as an alpha
    band. A source pixel is valid unless all its bands equal the nodata value (``nodata``
    overrides the file's), or the file's mask says so; sources without nodata or mask are valid
    over their whole footprint.

    Where sources overlap, each pixel comes from the first source, in precedence order, that is
    valid there: ``catalog_order`` is the order of ``sources``; ``newest_first`` sorts by
    acquisition date (the TIFFTAG_DATETIME tag if present, else the file modification time),
    newest first, ties kept in catalog order.

    Each block is one Zarr chunk. By default chunks are grouped ``shard_blocks`` × ``shard_blocks``
    into Zarr v3 shards (``sharding_indexed``: one file per shard and array instead of one per
    block, which is what file systems and object stores need at millions of blocks); readers see
    tile-sized chunks either way. ``shard_blocks=1`` writes one file per chunk, for readers
    without sharding support (GDAL < 3.13).

    The store is sparse: blocks that no source footprint touches are never read nor written, and
    blocks whose sources are all nodata there are not written either; the fill value (0, valid 0)
    stands for them (shards without any written block are no files). Dask processes one task per
    shard (8 × 8 blocks when unsharded), in waves (threads, or the workers of ``dask_client``,
    which open the files themselves). Each finished block is recorded in ``<out name>.blocks/``
    next to the store after its chunk (or shard) is written, so a killed run resumes where it
    stopped, redoing at most the shards that were being written, and ends with the same store as
    an uninterrupted one. Metadata is consolidated once, at the end.

    Args:
        sources: orthophoto files (any GDAL raster, any CRS), in catalog order.
        out: the Zarr store directory to write (e.g. ``<stage>/image.zarr``).
        grid: the region grid.
        bands: band names, in the files' band order.
        wavelengths_um: centre wavelength of each band in µm.
        tile_size: block side in pixels (= Zarr chunk side).
        resampling: one of ``nearest``, ``bilinear``, ``cubic``, ``average``.
        nodata: overrides the nodata value of every source.
        precedence: ``catalog_order`` or ``newest_first``.
        shard_blocks: blocks per shard side (1: no sharding).
        zstd_level: zstd compression level of the chunks (-7 to 22; higher is smaller and
            slower).
        workers: threads for the local Dask scheduler (default: CPU count).
        dask_client: a ``distributed.Client`` to run the blocks on instead.

    Returns:
        A :class:`TilingResult`.

    Raises:
        InputDataError: unreadable source, band-count mismatch, bad settings, or no source
            intersecting the grid.
        CRSMismatchError: a source without CRS.

    """
    _validate_settings(
        sources, bands, wavelengths_um, tile_size, resampling, precedence, shard_blocks, zstd_level
    )
    out = Path(out)
    infos = [_inspect_source(Path(p), grid, bands, nodata) for p in sources]
    check_same_dtype(infos)
    infos = _order_sources(infos, precedence)
    dtype = np.result_type(*[np.dtype(s.dtype) for s in infos]).name
    n_bcols = math.ceil(grid.width / tile_size)
    n_blocks = math.ceil(grid.height / tile_size) * n_bcols
    block_ids, src_lists = _intersecting_blocks(infos, grid, tile_size, n_bcols)

    settings = _run_settings(
        grid=grid,
        bands=bands,
        wavelengths_um=wavelengths_um,
        tile_size=tile_size,
        resampling=resampling,
        nodata=nodata,
        precedence=precedence,
        shard_blocks=shard_blocks,
        zstd_level=zstd_level,
        dtype=dtype,
        infos=infos,
        sources=sources,
    )
    records = records_dir(out)
    done = _prepare_store(
        out,
        records,
        settings,
        grid,
        bands,
        wavelengths_um,
        tile_size,
        dtype,
        sources,
        shard_blocks,
        zstd_level,
    )
    todo = _blocks_to_do(block_ids, done, n_bcols, shard_blocks)
    n_skipped = int(block_ids.size - todo.sum())
    job = _Job(str(out), str(records), grid, tile_size, len(bands), dtype, resampling, shard_blocks)
    todo_srcs = [src_lists[i] for i in np.flatnonzero(todo)]
    tasks = _group_tasks(block_ids[todo], todo_srcs, infos, n_bcols, shard_blocks)
    logger.info(
        "tiling %d sources onto %s: %d of %d blocks to do (%d done earlier)",
        len(infos),
        out,
        int(todo.sum()),
        n_blocks,
        n_skipped,
    )
    n_written, n_empty = _run_tasks(job, tasks, workers, dask_client)

    if dask_client is None:
        _TILES.clear()  # the next run may tile other sources; workers of a client keep theirs
    _consolidate(out)
    logger.info(
        "tiled %s: %d blocks written, %d empty, %d resumed", out, n_written, n_empty, n_skipped
    )
    return TilingResult(out, grid, n_blocks, n_written, n_skipped, n_empty, dtype)


def _validate_settings(
    sources: Sequence[Path],
    bands: list[str],
    wavelengths_um: list[float],
    tile_size: int,
    resampling: str,
    precedence: str,
    shard_blocks: int,
    zstd_level: int,
) -> None:
    if not sources:
        raise InputDataError("sources: no orthophoto given; list at least one file.")
    if not bands:
        raise InputDataError("bands: empty; list the band names in the files' band order.")
    if len(wavelengths_um) != len(bands):
        raise InputDataError(
            f"wavelengths_um: {len(wavelengths_um)} values for {len(bands)} bands {bands}; "
            "give one wavelength per band."
        )
    if tile_size < 1:
        raise InputDataError(f"tile_size: {tile_size} must be a positive number of pixels.")
    if resampling not in RESAMPLING_METHODS:
        raise InputDataError(
            f"resampling: {resampling!r} is not one of {list(RESAMPLING_METHODS)}."
        )
    if precedence not in PRECEDENCE_POLICIES:
        raise InputDataError(
            f"precedence: {precedence!r} is not one of {list(PRECEDENCE_POLICIES)}."
        )
    if shard_blocks < 1:
        raise InputDataError(
            f"shard_blocks: {shard_blocks} must be a positive number of blocks (1: no sharding)."
        )
    if not -7 <= zstd_level <= 22:
        raise InputDataError(f"zstd_level: {zstd_level} is not a zstd level; use -7 to 22.")


def _intersecting_blocks(
    infos: list[_Source], grid: RegionGrid, tile_size: int, n_bcols: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Blocks touched by a source footprint, with their sources; raises if there are none."""
    block_ids, src_lists = _candidate_blocks(infos, grid, tile_size, n_bcols)
    if block_ids.size == 0:
        raise InputDataError(
            f"sources: none of the {len(infos)} orthophotos ({infos[0].path}, ...) intersects the "
            f"region grid {grid.crs} bounds {grid.bounds}; "
            "check the region bounds and the files' CRS."
        )
    return block_ids, src_lists


def _run_settings(
    *,
    grid: RegionGrid,
    bands: list[str],
    wavelengths_um: list[float],
    tile_size: int,
    resampling: str,
    nodata: float | None,
    precedence: str,
    shard_blocks: int,
    zstd_level: int,
    dtype: str,
    infos: list[_Source],
    sources: Sequence[Path],
) -> dict[str, Any]:
    """Everything the bytes of the store depend on: a partial store is resumed only if equal."""
    return {
        "layout": _LAYOUT_VERSION,
        "grid": grid.to_dict(),
        "bands": list(bands),
        "wavelengths_um": [float(w) for w in wavelengths_um],
        "tile_size": tile_size,
        "resampling": resampling,
        "nodata": nodata,
        "precedence": precedence,
        "shard_blocks": shard_blocks,
        "zstd_level": zstd_level,
        "dtype": dtype,
        "sources": [_fingerprint(Path(s.path)) for s in infos],
        "source_order": [str(p) for p in sources],
    }


def _blocks_to_do(
    block_ids: np.ndarray, done: np.ndarray, n_bcols: int, shard_blocks: int
) -> np.ndarray:
    """Mask of the blocks this run writes: those not done, and the rest of their shards."""
    todo = ~np.isin(block_ids, done)
    if shard_blocks > 1 and todo.any():
        # a shard file is rewritten whole: redo every block of a shard that is not entirely done
        shard_ids = _shard_ids(block_ids, n_bcols, shard_blocks)
        todo = np.isin(shard_ids, shard_ids[todo])
    return todo


def _run_tasks(
    job: _Job, tasks: list[Any], workers: int | None, client: distributed.Client | None
) -> tuple[int, int]:
    """Run the tasks wave by wave; returns (blocks written, blocks empty)."""
    n_written = n_empty = 0
    total = sum(len(t[0]) for t in tasks)
    with progress.track(f"tiling {Path(job.out).name}", total=total, unit="tiles") as bar:

        def done(result: tuple[int, int]) -> None:
            bar.advance(result[0] + result[1])

        for wave in _waves(tasks):
            for written, empty in _run_wave(job, wave, workers, client, done):
                n_written += written
                n_empty += empty
            logger.debug("tiling %s: %d written, %d empty so far", job.out, n_written, n_empty)
    return n_written, n_empty
