"""Per-thread GDAL dataset handles and PROJ transformers, and the GDAL settings blocks run under."""

from __future__ import annotations

import threading
from typing import Any

import rasterio

from botaclip_core.tiling.sources import _open_source

_GDAL_ENV = {
    # blocks are processed in parallel already: one GDAL thread per block avoids oversubscription
    "GDAL_NUM_THREADS": 1,
    # aligned sources are read whole tile by tile into _TILES, so GDAL's own cache (per handle,
    # hence per thread) only serves warped reads; small, so the two caches do not add up
    "GDAL_CACHEMAX": 64 * 2**20,  # bytes: rasterio passes small integers as bytes
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "VSI_CACHE": False,  # per-handle read cache: pointless for local files, 25 MB each
}
_MAX_OPEN_PER_THREAD = 8  # tasks are spatially compact: few sources are live at once

_local = threading.local()


def _thread_cache() -> dict[str, Any]:
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    return cache


def _dataset(path: str, stamp: tuple[int, int]) -> Any:
    """Return the calling thread's open handle on a source (GDAL handles are not thread-safe).

    ``stamp`` (size, mtime_ns) is part of the key: a file rewritten since (a new orthophoto
    version under the same name) is opened again, not read through a handle on the old one.
    """
    cache = _thread_cache()
    key = f"src:{path}|{stamp[0]}|{stamp[1]}"
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
