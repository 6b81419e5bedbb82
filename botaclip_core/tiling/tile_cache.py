"""Exact reads of grid-aligned sources, through a per-process cache of decoded source tiles."""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
from rasterio.windows import Window

from botaclip_core.tiling.blocks import _Job, _Piece
from botaclip_core.tiling.handles import _dataset
from botaclip_core.tiling.sources import _Source, _source_valid

# decoded source tiles kept per process; holds a stripe's row of tasks with room to spare
_TILE_CACHE_BYTES = 192 * 2**20


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
        """Drop every decoded tile; tiles still being decoded stay."""
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
        ds = _dataset(src.path, src.stamp)
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
