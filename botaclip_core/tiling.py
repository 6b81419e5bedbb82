"""Orthophotos → image Zarr on a region grid, block by block, sparse, parallel and resumable."""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import socket
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import google_crc32c
import numpy as np
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor used on opened stores)
import xarray as xr
from affine import Affine
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window

from botaclip_core.errors import CRSMismatchError, InputDataError
from botaclip_core.georef import georeferenced_dataset
from botaclip_core.grid import RegionGrid, parse_crs

if TYPE_CHECKING:
    import distributed

logger = logging.getLogger(__name__)

RESAMPLING_METHODS = ("nearest", "bilinear", "cubic", "average")
PRECEDENCE_POLICIES = ("catalog_order", "newest_first")
RECORDS_SUFFIX = ".blocks"
# bump when the bytes a run writes change, so stale partial stores are not resumed
_LAYOUT_VERSION = 2
# source pixels read around a block's footprint so that the resampling kernel has support
_KERNEL_PAD = {"nearest": 1, "bilinear": 2, "cubic": 3, "average": 2}
_GDAL_ENV = {
    # blocks are processed in parallel already: one GDAL thread per block avoids oversubscription
    "GDAL_NUM_THREADS": 1,
    # aligned sources are read whole tile by tile into _TILES, so GDAL's own cache (per handle,
    # hence per thread) only serves warped reads; small, so the two caches do not add up
    "GDAL_CACHEMAX": 64 * 2**20,  # bytes: rasterio passes small integers as bytes
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "VSI_CACHE": False,  # per-handle read cache: pointless for local files, 25 MB each
}
# a Dask task is one shard (written whole, by one task), or 8×8 blocks when unsharded: blocks of
# a task share decompressed source tiles and warps
_TASK_SIDE = 8
DEFAULT_SHARD_BLOCKS = 8
# zstd level 1 stores real 0.1–5 m orthophotos 8–25 % smaller than uncompressed at ~600 MB/s per
# core; negative levels are 4× faster but leave such imagery about as large as it is
DEFAULT_ZSTD_LEVEL = 1
_EMPTY = 2**64 - 1  # shard index entry of an inner chunk that is not stored
# tasks are ordered in vertical stripes about this many 8-block task columns wide, top to bottom:
# a source tile shared by two tasks is then reused from _TILES after a bounded delay, whatever
# the region width
_STRIPE_TASKS = 4
_BLOCKS_PER_WAVE = 16384  # graph size bound: one wave of tasks at a time
_MAX_OPEN_PER_THREAD = 8  # tasks are spatially compact: few sources are live at once
# decoded source tiles kept per process; holds a stripe's row of tasks with room to spare
_TILE_CACHE_BYTES = 192 * 2**20
_MIN_TILE_SIDE = 256  # source tiles (or strips) are read in units of at least this many pixels


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


@dataclass(frozen=True)
class _Source:
    """What workers need to know about one source (small and picklable)."""

    path: str
    crs_wkt: str
    transform: tuple[float, ...]
    width: int
    height: int
    count: int
    dtype: str
    nodata: float | None
    has_mask: bool
    tile: tuple[int, int]  # (rows, cols) read and cached at a time: whole internal blocks
    stamp: tuple[int, int]  # (size, mtime_ns): cached tiles of a rewritten file are not reused
    footprint: tuple[float, float, float, float]  # (left, bottom, right, top) in grid CRS
    offset: tuple[int, int] | None  # (row, col) of the source's (0, 0) pixel on the grid if aligned
    date: float  # acquisition time (POSIX seconds) for newest_first


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


def records_dir(zarr_path: Path) -> Path:
    """Directory of the per-block completion logs of a store: ``<out>/../<out name>.blocks``."""
    zarr_path = Path(zarr_path)
    return zarr_path.parent / (zarr_path.name + RECORDS_SUFFIX)


def region_grid_for_sources(
    sources: Sequence[Path],
    *,
    crs: str,
    resolution: float,
    bounds: tuple[float, float, float, float] | None = None,
) -> RegionGrid:
    """Region grid covering the union of the sources' footprints, snapped to the resolution.

    Args:
        sources: orthophoto files (any GDAL raster, any CRS).
        crs: CRS of the grid, e.g. ``"EPSG:2154"``.
        resolution: pixel size in CRS units.
        bounds: explicit (left, bottom, right, top) in ``crs``; when given, the sources are not
            opened and these bounds win.

    Returns:
        The smallest grid on the resolution lattice covering the footprints (or ``bounds``).

    Raises:
        InputDataError: if no source is given or a source cannot be opened.
        CRSMismatchError: if ``crs`` is invalid or a source has no CRS.

    """
    grid_crs = parse_crs(crs)
    if resolution <= 0 or not math.isfinite(resolution):
        raise InputDataError(f"resolution: {resolution!r} must be a positive number of CRS units.")
    if bounds is not None:
        return RegionGrid.from_bounds(crs, resolution, tuple(bounds))  # type: ignore[arg-type]
    if not sources:
        raise InputDataError("sources: no orthophoto given; list at least one file.")
    lefts, bottoms, rights, tops = [], [], [], []
    for path in sources:
        with _open_source(path) as ds:
            _require_crs(ds, path)
            left, bottom, right, top = transform_bounds(
                ds.crs, grid_crs, *ds.bounds, densify_pts=21
            )
        lefts.append(left)
        bottoms.append(bottom)
        rights.append(right)
        tops.append(top)
    return RegionGrid.from_bounds(
        crs, resolution, (min(lefts), min(bottoms), max(rights), max(tops))
    )


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
    _validate_settings(sources, bands, wavelengths_um, tile_size, resampling, precedence)
    if shard_blocks < 1:
        raise InputDataError(
            f"shard_blocks: {shard_blocks} must be a positive number of blocks (1: no sharding)."
        )
    if not -7 <= zstd_level <= 22:
        raise InputDataError(f"zstd_level: {zstd_level} is not a zstd level; use -7 to 22.")
    out = Path(out)
    infos = [_inspect_source(Path(p), grid, bands, nodata) for p in sources]
    infos = _order_sources(infos, precedence)
    dtype = np.result_type(*[np.dtype(s.dtype) for s in infos]).name

    n_brows = math.ceil(grid.height / tile_size)
    n_bcols = math.ceil(grid.width / tile_size)
    block_ids, src_lists = _candidate_blocks(infos, grid, tile_size, n_bcols)
    if block_ids.size == 0:
        raise InputDataError(
            f"sources: none of the {len(infos)} orthophotos ({infos[0].path}, ...) intersects the "
            f"region grid {grid.crs} bounds {grid.bounds}; "
            "check the region bounds and the files' CRS."
        )

    settings = {
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

    todo_mask = ~np.isin(block_ids, done)
    if shard_blocks > 1 and todo_mask.any():
        # a shard file is rewritten whole: redo every block of a shard that is not entirely done
        shard_ids = _shard_ids(block_ids, n_bcols, shard_blocks)
        todo_mask = np.isin(shard_ids, shard_ids[todo_mask])
    n_skipped = int(block_ids.size - todo_mask.sum())
    job = _Job(str(out), str(records), grid, tile_size, len(bands), dtype, resampling, shard_blocks)
    tasks = _group_tasks(
        block_ids[todo_mask],
        [src_lists[i] for i in np.flatnonzero(todo_mask)],
        infos,
        n_bcols,
        shard_blocks,
    )
    logger.info(
        "tiling %d sources onto %s: %d of %d blocks to do (%d done earlier)",
        len(infos),
        out,
        int(todo_mask.sum()),
        n_brows * n_bcols,
        n_skipped,
    )
    n_written = n_empty = 0
    for wave in _waves(tasks):
        for written, empty in _run_wave(job, wave, workers, dask_client):
            n_written += written
            n_empty += empty
        logger.debug("tiling %s: %d written, %d empty so far", out, n_written, n_empty)

    if dask_client is None:
        _TILES.clear()  # the next run may tile other sources; workers of a client keep theirs
    _consolidate(out)
    logger.info(
        "tiled %s: %d blocks written, %d empty, %d resumed", out, n_written, n_empty, n_skipped
    )
    return TilingResult(out, grid, n_brows * n_bcols, n_written, n_skipped, n_empty, dtype)


def covered_blocks(zarr_path: Path) -> list[tuple[int, int]]:
    """(block_row, block_col) of the blocks of an image Zarr that hold source pixels, sorted.

    Raises:
        InputDataError: if ``zarr_path`` has no ``valid`` array.

    """
    valid = Path(zarr_path) / "valid"
    if not (valid / "zarr.json").exists():
        raise InputDataError(
            f"{zarr_path}: no 'valid' array; this is not an image Zarr written by tile_orthophotos."
        )
    _, shard, index_at_end = _shard_layout(json.loads((valid / "zarr.json").read_text()))
    shard = shard or (1, 1)
    index_bytes = shard[0] * shard[1] * 16 + 4  # (offset, nbytes) uint64 pairs + crc32c
    blocks = []
    chunk_root = valid / "c"
    if chunk_root.is_dir():
        for row_dir in os.scandir(chunk_root):
            if row_dir.name.isdigit() and row_dir.is_dir():
                for col in os.scandir(row_dir.path):
                    if not col.name.isdigit():
                        continue
                    r, c = int(row_dir.name), int(col.name)
                    if shard == (1, 1):
                        blocks.append((r, c))
                        continue
                    with open(col.path, "rb") as f:
                        if index_at_end:
                            f.seek(-index_bytes, os.SEEK_END)
                        index = np.frombuffer(f.read(index_bytes - 4), dtype="<u8")
                    stored = index.reshape(shard[0], shard[1], 2)[..., 1] != _EMPTY
                    blocks.extend(
                        (r * shard[0] + int(i), c * shard[1] + int(j))
                        for i, j in zip(*np.nonzero(stored), strict=True)
                    )
    return sorted(blocks)


def open_image(zarr_path: Path) -> xr.Dataset:
    """Open an image Zarr lazily, with its CRS and transform available through ``.rio``.

    Raises:
        InputDataError: if the store does not exist.

    """
    zarr_path = Path(zarr_path)
    root = zarr_path / "zarr.json"
    if not root.exists():
        raise InputDataError(
            f"{zarr_path}: not a Zarr v3 store (no zarr.json); run the tile stage."
        )
    consolidated = json.loads(root.read_text()).get("consolidated_metadata") is not None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        return xr.open_zarr(zarr_path, consolidated=consolidated, zarr_format=3)


# --- validation and source inspection ---------------------------------------------------------


def _shard_layout(
    meta: dict[str, Any],
) -> tuple[tuple[int, ...], tuple[int, ...] | None, bool]:
    """(chunk shape, chunks per shard per dimension or None if unsharded, index at the end)."""
    chunk_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    codecs = meta["codecs"]
    if len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed":
        conf = codecs[0]["configuration"]
        inner = tuple(conf["chunk_shape"])
        per_shard = tuple(s // i for s, i in zip(chunk_shape, inner, strict=True))
        return inner, per_shard, conf.get("index_location", "end") == "end"
    return chunk_shape, None, True


def _validate_settings(
    sources: Sequence[Path],
    bands: list[str],
    wavelengths_um: list[float],
    tile_size: int,
    resampling: str,
    precedence: str,
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


def _open_source(path: Path | str) -> Any:
    try:
        return rasterio.open(path)
    except (RasterioIOError, OSError) as exc:
        raise InputDataError(
            f"{path}: GDAL cannot open this file as a raster ({exc}); check the path and format."
        ) from exc


def _require_crs(ds: Any, path: Path | str) -> None:
    if ds.crs is None:
        raise CRSMismatchError(
            f"{path}: the raster has no CRS, so it cannot be placed on the region grid; assign one "
            "(e.g. `gdal_edit.py -a_srs EPSG:2154 FILE`) or add a .prj/.aux.xml next to it."
        )


def _acquisition_time(ds: Any, path: Path) -> float:
    stamp = ds.tags().get("TIFFTAG_DATETIME")
    if stamp:
        for fmt in ("%Y:%m:%d %H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"):
            try:
                parsed = _dt.datetime.strptime(stamp.strip(), fmt)
                return parsed.replace(tzinfo=_dt.UTC).timestamp()
            except ValueError:
                continue
        logger.warning(
            "%s: unreadable TIFFTAG_DATETIME %r; using the file modification time", path, stamp
        )
    return path.stat().st_mtime


def aligned_offset(ds: Any, grid: RegionGrid) -> tuple[int, int] | None:
    """Grid (row, col) of the source's first pixel if the source lies on the grid lattice."""
    if ds.crs != grid.crs_obj:
        return None
    t = ds.transform
    res = grid.resolution
    if t.b != 0 or t.d != 0 or not math.isclose(t.a, res, rel_tol=1e-9):
        return None
    if not math.isclose(-t.e, res, rel_tol=1e-9):
        return None
    col = (t.c - grid.left) / res
    row = (grid.top - t.f) / res
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
        return None
    return round(row), round(col)


def _inspect_source(
    path: Path, grid: RegionGrid, bands: list[str], nodata: float | None
) -> _Source:
    with _open_source(path) as ds:
        _require_crs(ds, path)
        if ds.count != len(bands):
            raise InputDataError(
                f"{path}: has {ds.count} bands but the catalog lists {len(bands)} bands {bands}; "
                "list one name per band of the file, in the file's band order."
            )
        dtypes = set(ds.dtypes)
        if len(dtypes) != 1:
            raise InputDataError(
                f"{path}: bands of mixed dtypes {sorted(dtypes)}; convert it to one dtype."
            )
        flags = ds.mask_flag_enums[0]
        has_mask = any(f.name in ("per_dataset", "alpha") for f in flags) and ds.nodata is None
        footprint = transform_bounds(ds.crs, grid.crs_obj, *ds.bounds, densify_pts=21)
        return _Source(
            path=str(path),
            crs_wkt=ds.crs.to_wkt(),
            transform=tuple(ds.transform)[:6],
            width=ds.width,
            height=ds.height,
            count=ds.count,
            dtype=ds.dtypes[0],
            nodata=nodata if nodata is not None else ds.nodata,
            has_mask=has_mask and nodata is None,
            tile=_cache_tile_shape(ds),
            stamp=(path.stat().st_size, path.stat().st_mtime_ns),
            footprint=footprint,
            offset=aligned_offset(ds, grid),
            date=_acquisition_time(ds, path),
        )


def _cache_tile_shape(ds: Any) -> tuple[int, int]:
    """Whole internal blocks, at least _MIN_TILE_SIDE on a side, no larger than the raster."""
    bh, bw = ds.block_shapes[0]
    th = bh * math.ceil(_MIN_TILE_SIDE / bh)
    tw = bw * math.ceil(_MIN_TILE_SIDE / bw)
    return min(th, ds.height), min(tw, ds.width)


def _order_sources(infos: list[_Source], precedence: str) -> list[_Source]:
    if precedence == "newest_first":
        # stable sort: equal dates keep catalog order
        return sorted(infos, key=lambda s: -s.date)
    return infos


def _fingerprint(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


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


def _group_tasks(
    block_ids: np.ndarray,
    src_lists: list[np.ndarray],
    infos: list[_Source],
    n_bcols: int,
    shard_blocks: int,
) -> list[tuple[list[int], list[list[int]], list[_Source]]]:
    """Group blocks into spatially compact tasks that carry only their sources.

    A task is one shard (or 8×8 blocks when unsharded). Tasks come in stripe order (see
    _STRIPE_TASKS), row-major within a stripe; blocks are row-major within a task.
    """
    if block_ids.size == 0:
        return []
    side = shard_blocks if shard_blocks > 1 else _TASK_SIDE
    super_ids = _shard_ids(block_ids, n_bcols, side)
    stripes = (block_ids % n_bcols) // (side * max(1, _STRIPE_TASKS * _TASK_SIDE // side))
    order = np.lexsort((block_ids, super_ids, stripes))
    tasks = []
    current: int | None = None
    blocks: list[int] = []
    lists: list[np.ndarray] = []

    def flush() -> None:
        used = sorted({int(i) for lst in lists for i in lst})
        local = {g: k for k, g in enumerate(used)}
        tasks.append(
            (
                blocks.copy(),
                [[local[int(i)] for i in lst] for lst in lists],
                [infos[g] for g in used],
            )
        )

    for k in order:
        sid = int(super_ids[k])
        if blocks and sid != current:
            flush()
            blocks, lists = [], []
        current = sid
        blocks.append(int(block_ids[k]))
        lists.append(src_lists[k])
    if blocks:
        flush()
    return tasks


def _waves(tasks: list[Any]) -> Iterator[list[Any]]:
    wave: list[Any] = []
    n = 0
    for task in tasks:
        wave.append(task)
        n += len(task[0])
        if n >= _BLOCKS_PER_WAVE:
            yield wave
            wave, n = [], 0
    if wave:
        yield wave


# --- store creation, completion records, consolidation -----------------------------------------


def _settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _prepare_store(
    out: Path,
    records: Path,
    settings: dict[str, Any],
    grid: RegionGrid,
    bands: list[str],
    wavelengths_um: list[float],
    tile_size: int,
    dtype: str,
    sources: Sequence[Path],
    shard_blocks: int,
    zstd_level: int,
) -> np.ndarray:
    """Create the store's metadata, or reuse a partial store of the same settings.

    Returns:
        Block ids already recorded as done.

    """
    stamp = records / "_settings.json"
    digest = _settings_hash(settings)
    if stamp.exists() and (out / "zarr.json").exists():
        try:
            previous = json.loads(stamp.read_text()).get("hash")
        except json.JSONDecodeError:
            previous = None
        if previous == digest:
            done = _read_records(records, settings)
            logger.info("%s: resuming, %d blocks already done", out, done.size)
            return done
        logger.info("%s: settings changed since the last run; rewriting the store", out)
    if records.exists():
        shutil.rmtree(records)
    if out.exists():
        shutil.rmtree(out)
    _write_metadata(
        out, grid, bands, wavelengths_um, tile_size, dtype, sources, shard_blocks, zstd_level
    )
    records.mkdir(parents=True)
    tmp = records / "_settings.json.tmp"
    tmp.write_text(json.dumps({"hash": digest, "settings": settings}, sort_keys=True))
    os.replace(tmp, stamp)
    return np.empty(0, dtype=np.int64)


def _write_metadata(
    out: Path,
    grid: RegionGrid,
    bands: list[str],
    wavelengths_um: list[float],
    tile_size: int,
    dtype: str,
    sources: Sequence[Path],
    shard_blocks: int,
    zstd_level: int,
) -> None:
    import dask.array as da
    from zarr.codecs import ZstdCodec

    n = len(bands)
    # one Dask chunk per array: nothing is computed, and a graph of one task per Zarr chunk took
    # seconds to build on large regions
    image = da.zeros((n, grid.height, grid.width), dtype=dtype, chunks=-1)
    valid = da.zeros((grid.height, grid.width), dtype=np.uint8, chunks=-1)
    band_attrs = {"bands": list(bands), "wavelengths_um": [float(w) for w in wavelengths_um]}
    ds = georeferenced_dataset(
        grid,
        {
            "image": (("band", "y", "x"), image, {**band_attrs, "long_name": "orthophoto DN"}),
            "valid": (("y", "x"), valid, {"long_name": "1 where a source had a valid pixel"}),
        },
        {
            "tile_size": tile_size,
            **band_attrs,
            "sources": [str(p) for p in sources],
        },
    )
    ds = ds.assign_coords(band=("band", np.array(bands, dtype=object)))
    codec = ZstdCodec(level=zstd_level)
    encoding: dict[str, dict[str, Any]] = {
        "image": {"chunks": (n, tile_size, tile_size), "compressors": [codec], "fill_value": 0},
        "valid": {"chunks": (tile_size, tile_size), "compressors": [codec], "fill_value": 0},
    }
    if shard_blocks > 1:
        side = shard_blocks * tile_size
        encoding["image"]["shards"] = (n, side, side)
        encoding["valid"]["shards"] = (side, side)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        ds.to_zarr(
            out, mode="w", compute=False, zarr_format=3, consolidated=False, encoding=encoding
        )


def _read_records(records: Path, settings: dict[str, Any]) -> np.ndarray:
    n_bcols = math.ceil(settings["grid"]["width"] / settings["tile_size"])
    ids: list[int] = []
    for log in records.glob("*.log"):
        text = log.read_text()
        # a line cut by a kill has no newline: that block is not done
        for line in text.split("\n")[:-1]:
            parts = line.split()
            if len(parts) == 3 and parts[2] in ("w", "e"):
                ids.append(int(parts[0]) * n_bcols + int(parts[1]))
    return np.unique(np.asarray(ids, dtype=np.int64))


def _consolidate(out: Path) -> None:
    import zarr

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        zarr.consolidate_metadata(str(out))


# --- workers ----------------------------------------------------------------------------------

_local = threading.local()


def _thread_cache() -> dict[str, Any]:
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    return cache


def _dataset(path: str) -> Any:
    """Return the calling thread's open handle on a source (GDAL handles are not thread-safe)."""
    cache = _thread_cache()
    key = "src:" + path
    ds = cache.get(key)
    if ds is None or ds.closed:
        with rasterio.Env(**_GDAL_ENV):
            ds = _open_source(path)
        cache[key] = ds
        if len([k for k in cache if k.startswith("src:")]) > _MAX_OPEN_PER_THREAD:
            # keep the number of open files per thread bounded on large catalogs
            oldest = next(k for k in cache if k.startswith("src:"))
            cache.pop(oldest).close()
    return ds


def _transformer(grid_crs: str, src_wkt: str) -> Any:
    """Return the calling thread's grid → source CRS transformer (PROJ setup costs ms)."""
    from pyproj import Transformer

    cache = _thread_cache()
    key = "proj:" + grid_crs + "|" + src_wkt
    tr = cache.get(key)
    if tr is None:
        tr = cache[key] = Transformer.from_crs(grid_crs, src_wkt, always_xy=True)
    return tr


class _ArrayWriter:
    """Writes whole chunks of a Zarr v3 array straight to its directory store.

    Going through ``zarr.Array.__setitem__`` costs milliseconds per chunk in event-loop round
    trips; the layouts this module creates (default ``/`` chunk keys, bytes + zstd codecs, either
    directly or inside a ``sharding_indexed`` codec with a bytes + crc32c index) are simple
    enough to encode directly. Anything else falls back to the zarr API.

    Unsharded chunks are written by :meth:`add`; sharded ones are encoded by :meth:`add` and
    written, one file per shard, by :meth:`flush`.
    """

    def __init__(self, root: str, name: str) -> None:
        meta = json.loads((Path(root) / name / "zarr.json").read_text())
        self.path = os.path.join(root, name)
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        # shard: inner chunks per shard, per dimension (None: unsharded)
        self.chunk_shape, self.shard, self.index_at_end = _shard_layout(meta)
        self._pending: dict[tuple[int, ...], dict[tuple[int, ...], bytes]] = {}
        self._constants: dict[tuple[tuple[int, ...], int], bytes] = {}
        self._made: set[str] = set()
        self.array: Any = None
        self.codec: Any = None
        cke = meta["chunk_key_encoding"]
        codecs = meta["codecs"]
        direct = (
            cke["name"] == "default" and cke.get("configuration", {}).get("separator", "/") == "/"
        )
        if self.shard is not None:
            conf = codecs[0]["configuration"]
            index_codecs = conf.get("index_codecs", [])
            direct = direct and [c["name"] for c in index_codecs] == ["bytes", "crc32c"]
            direct = direct and all(
                c.get("configuration", {}).get("endian", "little") == "little" for c in index_codecs
            )
            codecs = conf["codecs"]
        direct = (
            direct
            and len(codecs) == 2
            and codecs[0]["name"] == "bytes"
            and codecs[0].get("configuration", {}).get("endian", "little") == "little"
            and codecs[1]["name"] == "zstd"
        )
        if direct:
            from numcodecs.zstd import Zstd

            conf = codecs[1].get("configuration", {})
            self.codec = Zstd(level=conf.get("level", 0), checksum=conf.get("checksum", False))
        else:
            import zarr

            self.array = zarr.open_array(root, path=name, mode="r+", zarr_format=3)
            self.shard = None  # zarr writes (and rewrites) the shards itself

    def add(self, chunk_index: tuple[int, ...], data: np.ndarray) -> None:
        """Write ``data`` (possibly a clipped edge chunk) as the chunk at ``chunk_index``."""
        if self.array is not None:
            sel = tuple(
                slice(i * c, i * c + n)
                for i, c, n in zip(chunk_index, self.chunk_shape, data.shape, strict=True)
            )
            self.array[sel] = data
            return
        if data.shape != self.chunk_shape:
            # Zarr stores edge chunks at full size, padded with the fill value (0 here)
            full = np.zeros(self.chunk_shape, dtype=self.dtype)
            full[tuple(slice(0, n) for n in data.shape)] = data
            data = full
        self._put(chunk_index, self.codec.encode(np.ascontiguousarray(data, dtype=self.dtype)))

    def _put(self, chunk_index: tuple[int, ...], payload: bytes) -> None:
        if self.shard is None:
            self._write(chunk_index, [payload])
            return
        shard_index = tuple(i // k for i, k in zip(chunk_index, self.shard, strict=True))
        inner = tuple(i % k for i, k in zip(chunk_index, self.shard, strict=True))
        self._pending.setdefault(shard_index, {})[inner] = payload

    def add_constant(
        self, chunk_index: tuple[int, ...], shape: tuple[int, ...], value: int
    ) -> None:
        """Write a chunk whose ``shape`` pixels all equal ``value`` (encoded once per shape)."""
        if self.array is not None:
            self.add(chunk_index, np.full(shape, value, dtype=self.dtype))
            return
        key = (tuple(shape), value)
        payload = self._constants.get(key)
        if payload is None:
            full = np.zeros(self.chunk_shape, dtype=self.dtype)
            full[tuple(slice(0, n) for n in shape)] = value
            payload = self._constants[key] = bytes(self.codec.encode(full))
        self._put(chunk_index, payload)

    def flush(self) -> None:
        """Write the shards of the chunks added so far, each whole, with its index."""
        assert self.shard is not None or not self._pending
        for shard_index, chunks in sorted(self._pending.items()):
            assert self.shard is not None
            index = np.full((*self.shard, 2), _EMPTY, dtype="<u8")
            index_bytes = index.nbytes + 4
            offset = 0 if self.index_at_end else index_bytes
            parts = []
            for inner in sorted(chunks):  # row-major: the same bytes whatever the add order
                payload = chunks[inner]
                index[inner] = (offset, len(payload))
                parts.append(payload)
                offset += len(payload)
            raw = index.tobytes()
            trailer = raw + google_crc32c.value(raw).to_bytes(4, "little")
            self._write(shard_index, parts + [trailer] if self.index_at_end else [trailer, *parts])
        self._pending.clear()

    def discard(self) -> None:
        """Forget chunks added but not flushed (a task that failed midway)."""
        self._pending.clear()

    def _write(self, key: tuple[int, ...], parts: list[Any]) -> None:
        directory = os.path.join(self.path, "c", *map(str, key[:-1]))
        if directory not in self._made:
            os.makedirs(directory, exist_ok=True)
            self._made.add(directory)
        fd = os.open(os.path.join(directory, str(key[-1])), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            for part in parts:
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view) :]
        finally:
            os.close(fd)


def _zarr_writers(out: str) -> tuple[_ArrayWriter, _ArrayWriter]:
    cache = _thread_cache()
    key = "zarr:" + out
    writers = cache.get(key)
    if writers is None:
        writers = cache[key] = (_ArrayWriter(out, "image"), _ArrayWriter(out, "valid"))
        for k in [k for k in cache if k.startswith("zarr:") and k != key]:
            del cache[k]
    return writers


_Piece = tuple[slice, slice, np.ndarray, np.ndarray | None]
"""(block rows, block cols, data (band, y, x), valid (y, x) or None where all valid)."""


def _valid_from_values(data: np.ndarray, nodata: float | None) -> np.ndarray | None:
    if nodata is None or (isinstance(nodata, float) and math.isnan(nodata)):
        return None
    if nodata == 0 and data.dtype.kind in "ui":
        # a pixel is nodata where all its bands are 0 (any() over bands is one fast pass)
        return np.asarray(data.any(axis=0))
    # band by band: no (band, y, x) boolean temporary
    valid = data[0] != nodata
    for band in data[1:]:
        valid |= band != nodata
    return valid


def _source_valid(ds: Any, src: _Source, data: np.ndarray, window: Window) -> np.ndarray:
    valid = _valid_from_values(data, src.nodata)
    if valid is None:
        if src.has_mask:
            valid = ds.dataset_mask(window=window) > 0
        else:
            valid = np.ones(data.shape[1:], dtype=bool)
    return valid


class _TileCache:
    """Decoded source tiles shared by the threads of a process, least recently used out first.

    Neighbouring blocks (and tasks, run by different threads) need the same source tiles: each
    tile is decoded once, by the first thread that needs it, while the others wait for it.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._tiles: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._bytes = 0

    def get(self, src: _Source, trow: int, tcol: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(data, valid or None where all valid) of tile (trow, tcol) of an aligned source."""
        key = (src.path, src.stamp, repr(src.nodata), src.has_mask, trow, tcol)
        while True:
            with self._lock:
                entry = self._tiles.get(key)
                if entry is None:
                    pending = self._tiles[key] = threading.Event()
                    break
                if not isinstance(entry, threading.Event):
                    self._tiles.move_to_end(key)
                    return entry  # type: ignore[no-any-return]
            entry.wait()  # another thread is decoding it; if that failed, try ourselves
        try:
            tile = self._decode(src, trow, tcol)
        except BaseException:
            with self._lock:
                del self._tiles[key]
            pending.set()
            raise
        data, valid = tile
        with self._lock:
            self._tiles[key] = tile
            self._bytes += data.nbytes + (0 if valid is None else valid.nbytes)
            self._evict()
        pending.set()
        return tile

    def clear(self) -> None:
        with self._lock:
            for key in [k for k, v in self._tiles.items() if not isinstance(v, threading.Event)]:
                del self._tiles[key]
            self._bytes = 0

    def _evict(self) -> None:
        if self._bytes <= self.max_bytes:
            return
        # oldest first; tiles being decoded (events) are few and stay
        for key, entry in list(itertools.islice(self._tiles.items(), 64)):
            if isinstance(entry, threading.Event):
                continue
            del self._tiles[key]
            data, valid = entry
            self._bytes -= data.nbytes + (0 if valid is None else valid.nbytes)
            if self._bytes <= self.max_bytes:
                return

    @staticmethod
    def _decode(src: _Source, trow: int, tcol: int) -> tuple[np.ndarray, np.ndarray | None]:
        th, tw = src.tile
        row, col = trow * th, tcol * tw
        window = Window(col, row, min(tw, src.width - col), min(th, src.height - row))
        ds = _dataset(src.path)
        data = ds.read(window=window)
        valid = _source_valid(ds, src, data, window)
        return data, (None if valid.all() else valid)


_TILES = _TileCache(_TILE_CACHE_BYTES)


def _read_aligned(src: _Source, job: _Job, r0: int, c0: int, h: int, w: int) -> list[_Piece]:
    """Exact copy of the part of an aligned source inside block (r0, c0, h, w), tile by tile."""
    assert src.offset is not None
    orow, ocol = src.offset
    # the block in source pixels, clipped to the source
    sr0, sr1 = max(r0 - orow, 0), min(r0 + h - orow, src.height)
    sc0, sc1 = max(c0 - ocol, 0), min(c0 + w - ocol, src.width)
    if sr0 >= sr1 or sc0 >= sc1:
        return []
    th, tw = src.tile
    pieces = []
    for trow in range(sr0 // th, (sr1 - 1) // th + 1):
        a0, a1 = max(sr0, trow * th), min(sr1, (trow + 1) * th)
        for tcol in range(sc0 // tw, (sc1 - 1) // tw + 1):
            b0, b1 = max(sc0, tcol * tw), min(sc1, (tcol + 1) * tw)
            data, valid = _TILES.get(src, trow, tcol)
            ty, tx = slice(a0 - trow * th, a1 - trow * th), slice(b0 - tcol * tw, b1 - tcol * tw)
            pieces.append(
                (
                    slice(a0 + orow - r0, a1 + orow - r0),
                    slice(b0 + ocol - c0, b1 + ocol - c0),
                    data[:, ty, tx],
                    None if valid is None else valid[ty, tx],
                )
            )
    return pieces


class _TaskWarps:
    """Warped sources of one task, each warped once onto the task's super-block.

    GDAL's warper costs milliseconds to set up, more than warping a block: a source is warped
    onto the whole super-block (the shard, or the 8×8 blocks of an unsharded task), cut to the
    source's footprint on block boundaries, and blocks are sliced from it. The region depends
    only on the super-block and the source, not on which of its blocks a (resumed) run still
    has to do, so resumed runs warp the same pixels as uninterrupted ones.
    """

    def __init__(self, job: _Job, block_id: int) -> None:
        side = job.shard_blocks if job.shard_blocks > 1 else _TASK_SIDE
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


def _warp_window(
    src: _Source, job: _Job, r0: int, c0: int, h: int, w: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Warp the part of a source around grid window (r0, c0, h, w) onto it: (data, valid)."""
    grid = job.grid
    dst_transform = grid.transform * Affine.translation(c0, r0)
    ds = _dataset(src.path)
    # the block outline, densified, in source pixel coordinates
    t = np.linspace(0.0, 1.0, 9)
    px = np.concatenate([t * w, np.full(9, float(w)), t * w, np.zeros(9)])
    py = np.concatenate([np.zeros(9), t * h, np.full(9, float(h)), t * h])
    mx = dst_transform.c + px * dst_transform.a
    my = dst_transform.f + py * dst_transform.e
    sx, sy = _transformer(grid.crs, src.crs_wkt).transform(mx, my)
    inv = ~ds.transform
    xs = inv.a * sx + inv.b * sy + inv.c
    ys = inv.d * sx + inv.e * sy + inv.f
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        return None
    pad = _KERNEL_PAD[job.resampling]
    if job.resampling == "average":
        # average spans the whole destination pixel: pad by the scale ratio
        pad += math.ceil(grid.resolution / min(abs(ds.transform.a), abs(ds.transform.e)))
    col0 = max(math.floor(xs.min()) - pad, 0)
    col1 = min(math.ceil(xs.max()) + pad, src.width)
    row0 = max(math.floor(ys.min()) - pad, 0)
    row1 = min(math.ceil(ys.max()) + pad, src.height)
    if col0 >= col1 or row0 >= row1:
        return None
    window = Window(col0, row0, col1 - col0, row1 - row0)
    data = ds.read(window=window)
    valid = _source_valid(ds, src, data, window)
    if not valid.any():
        return None
    n = data.shape[0]
    amax = np.iinfo(data.dtype).max if data.dtype.kind in "ui" else 1  # the mask's "valid"

    def warp(source: np.ndarray, dest: np.ndarray, row: int, col: int, alpha: int = 0) -> None:
        kwargs = {"SRC_ALPHA_MAX": amax, "DST_ALPHA_MAX": amax} if alpha else {}
        reproject(
            source=source,
            destination=dest,
            src_transform=ds.window_transform(window),
            src_crs=ds.crs,
            dst_transform=dst_transform * Affine.translation(col, row),
            dst_crs=grid.crs_obj,
            src_alpha=alpha,
            dst_alpha=dest.shape[0],  # marks the destination pixels the source covers
            resampling=Resampling[job.resampling],
            num_threads=1,
            init_dest_nodata=False,
            **kwargs,
        )

    if valid.all():
        # no source mask: GDAL's fast kernels
        dest = np.zeros((n + 1, h, w), dtype=data.dtype)
        warp(data, dest, 0, 0)
        return dest[:n], dest[n] > 0
    stack = np.empty((n + 1, *data.shape[1:]), dtype=data.dtype)
    stack[:n] = data
    stack[n] = np.where(valid, amax, 0)
    if data.dtype.kind not in "ui":
        dest = np.zeros((n + 1, h, w), dtype=data.dtype)
        warp(stack, dest, 0, 0, alpha=n + 1)
        return dest[:n], dest[n] > 0
    # GDAL honours a source mask only in its general kernels, 3× slower: warp the validity as
    # a plain band with the fast kernels first. Where it comes out at its maximum, every source
    # pixel under the kernel was valid and the fast values are exact; only pixels whose kernel
    # straddles the edge of the valid area are warped again, on their bounding box, with the mask
    dest = np.zeros((n + 2, h, w), dtype=data.dtype)
    warp(stack, dest, 0, 0)
    covered = dest[n + 1] > 0
    out_valid = covered & (dest[n] == amax)
    edge = covered & (dest[n] > 0) & (dest[n] < amax)
    if edge.any():
        rows, cols = np.flatnonzero(edge.any(axis=1)), np.flatnonzero(edge.any(axis=0))
        ys, xs = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
        sub = np.zeros((n + 1, ys.stop - ys.start, xs.stop - xs.start), dtype=data.dtype)
        warp(stack, sub, ys.start, xs.start, alpha=n + 1)
        fix = edge[ys, xs]
        np.copyto(dest[:n, ys, xs], sub[:n], where=fix)
        out_valid[ys, xs] |= fix & (sub[n] > 0)
    return dest[:n], out_valid


def _compose_block(
    job: _Job, block_id: int, srcs: list[_Source], warps: _TaskWarps
) -> tuple[int, int, np.ndarray | None, np.ndarray | None]:
    """Pixels of one block from its sources in precedence order.

    Returns:
        (block row, block col, image, valid), image None where no source had a valid pixel, and
        valid None where every pixel of the block is valid.

    """
    n_bcols = math.ceil(job.grid.width / job.tile_size)
    brow, bcol = divmod(block_id, n_bcols)
    r0, c0 = brow * job.tile_size, bcol * job.tile_size
    h = min(job.tile_size, job.grid.height - r0)
    w = min(job.tile_size, job.grid.width - c0)
    image: np.ndarray | None = None
    filled = np.zeros((h, w), dtype=bool)
    n_filled = 0  # pixels filled, counted while every piece so far was wholly valid
    masked = False  # a piece had a validity mask: n_filled no longer counts
    first = True  # the pieces of the first contributing source do not overlap each other
    for src in srcs:
        if src.offset is not None:
            pieces = _read_aligned(src, job, r0, c0, h, w)
        else:
            pieces = warps.pieces(src, r0, c0, h, w)
        contributed = False
        for ys, xs, data, valid in pieces:
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


def _process_task(
    job: _Job, block_ids: list[int], src_lists: list[list[int]], srcs: list[_Source]
) -> tuple[int, int]:
    """Compose, write and record each block of a task; returns (written, empty) counts."""
    image_writer, valid_writer = _zarr_writers(job.out)
    log_name = f"{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}.log"
    fd = os.open(os.path.join(job.records, log_name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    written = empty = 0
    lines: list[str] = []
    warps = _TaskWarps(job, block_ids[0])  # a task's blocks share one super-block
    try:
        with rasterio.Env(**_GDAL_ENV):
            for block_id, local in zip(block_ids, src_lists, strict=True):
                brow, bcol, image, valid = _compose_block(
                    job, block_id, [srcs[i] for i in local], warps
                )
                if image is None:
                    status = "e"
                    empty += 1
                else:
                    image_writer.add((0, brow, bcol), image)
                    if valid is None:
                        valid_writer.add_constant((brow, bcol), image.shape[1:], 1)
                    else:
                        valid_writer.add((brow, bcol), valid.view(np.uint8))
                    status = "w"
                    written += 1
                lines.append(f"{brow} {bcol} {status}\n")
                if job.shard_blocks == 1:
                    # the record follows the chunk writes: a kill in between redoes this block
                    os.write(fd, lines.pop().encode())
        if job.shard_blocks > 1:
            # the records follow the shard writes: a kill in between redoes this shard
            image_writer.flush()
            valid_writer.flush()
            os.write(fd, "".join(lines).encode())
    finally:
        image_writer.discard()
        valid_writer.discard()
        os.close(fd)
    return written, empty


class _Task:
    """One Dask task's work: blocks of one shard and their sources, in precedence order.

    A plain class, not a tuple or dataclass: Dask passes it through as one value instead of
    walking the thousands of block ids and sources it holds (that took a second per wave).
    """

    __slots__ = ("block_ids", "job", "src_lists", "srcs")

    def __init__(
        self, job: _Job, block_ids: list[int], src_lists: list[list[int]], srcs: list[_Source]
    ) -> None:
        self.job, self.block_ids, self.src_lists, self.srcs = job, block_ids, src_lists, srcs


def _run_task(task: _Task) -> tuple[int, int]:
    return _process_task(task.job, task.block_ids, task.src_lists, task.srcs)


def _run_wave(
    job: _Job, wave: list[Any], workers: int | None, client: distributed.Client | None
) -> list[tuple[int, int]]:
    tasks = [_Task(job, *t) for t in wave]
    if client is not None:
        return list(client.gather(client.map(_run_task, tasks, pure=False)))
    import dask

    # named in reverse so that the threaded scheduler, which breaks ties between independent
    # tasks by key, runs them in _group_tasks order (random names would scatter them)
    delayed = [
        dask.delayed(_run_task, pure=False)(task, dask_key_name=f"tile-{len(tasks) - k:08d}")
        for k, task in enumerate(tasks)
    ]
    return list(
        dask.compute(*delayed, scheduler="threads", num_workers=workers or os.cpu_count() or 1)
    )
