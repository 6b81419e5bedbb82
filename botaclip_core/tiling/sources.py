"""Orthophoto sources: opening, inspection, precedence order and pixel validity."""

from __future__ import annotations

import datetime as _dt
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import RasterioIOError
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from botaclip_core.errors import CRSMismatchError, InputDataError
from botaclip_core.grid import RegionGrid, parse_crs

logger = logging.getLogger(__name__)

_MIN_TILE_SIDE = 256  # source tiles (or strips) are read in units of at least this many pixels


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


def aligned_offset(ds: Any, grid: RegionGrid) -> tuple[int, int] | None:
    """Grid (row, col) of the source's first pixel if the source lies on the grid lattice.

    Args:
        ds: an open rasterio dataset.
        grid: the region grid.

    Returns:
        The offset when the source has the grid's CRS and resolution, is north-up and its origin
        is an integer number of pixels from the grid's; None otherwise.

    """
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


def check_same_dtype(infos: Sequence[_Source]) -> None:
    """Raise unless every source has one data type (tiles and normalisation assume one).

    Raises:
        InputDataError: naming the files of each data type.
    """
    by_dtype: dict[str, list[str]] = {}
    for info in infos:
        by_dtype.setdefault(info.dtype, []).append(Path(info.path).name)
    if len(by_dtype) > 1:
        listed = "; ".join(
            f"{dtype}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
            for dtype, names in sorted(by_dtype.items(), key=lambda kv: len(kv[1]))
        )
        raise InputDataError(
            f"orthophotos: the sheets have different data types ({listed}); the model's "
            "normalisation assumes one. Convert them to one type (e.g. `gdal_translate -ot Byte "
            "-scale 0 65535 0 255 IN OUT`), or give each type its own region."
        )


def _check_readable(ds: Any, path: Path) -> None:
    """Read the last internal block of every band: a truncated file fails here, not mid-run."""
    bh, bw = ds.block_shapes[0]
    row, col = (ds.height - 1) // bh * bh, (ds.width - 1) // bw * bw
    window = Window(col, row, min(bw, ds.width - col), min(bh, ds.height - row))
    try:
        ds.read(window=window)
    except (RasterioIOError, OSError) as exc:
        raise InputDataError(
            f"{path}: the raster cannot be read to its end ({str(exc).strip()[:200]}); the file "
            "looks truncated or corrupt. Copy or download it again (check its size against the "
            "source), or remove it from regions.<region>.orthophotos.paths."
        ) from None


def check_orthophotos(
    sources: Sequence[Path], grid: RegionGrid, bands: list[str], nodata: float | None
) -> None:
    """Check a region's orthophotos before any stage runs: the errors tiling would hit later.

    Each file must open, be readable to its end, have a CRS and one band per catalog band;
    the files must share a data type, and at least one must intersect the grid.

    Raises:
        InputDataError: an unreadable or truncated file, a band-count mismatch, mixed data
            types, or no file intersecting the region.
        CRSMismatchError: a file without CRS.
    """
    infos = []
    for path in sources:
        infos.append(_inspect_source(Path(path), grid, bands, nodata))
        with _open_source(path) as ds:
            _check_readable(ds, Path(path))
    check_same_dtype(infos)
    left, bottom, right, top = grid.bounds
    if not any(
        f[0] < right and f[2] > left and f[1] < top and f[3] > bottom
        for f in (i.footprint for i in infos)
    ):
        raise InputDataError(
            f"orthophotos: none of the {len(infos)} orthophotos ({infos[0].path}, ...) "
            f"intersects the region grid ({grid.crs}, bounds {tuple(round(b, 1) for b in grid.bounds)}). "
            "Check regions.<region>.bounds and crs, and the files' CRS."
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
