"""Whole Zarr v3 chunks and shards written straight to a directory store, and shard indexes read."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from botaclip_core.tiling.handles import _thread_cache

_EMPTY = 2**64 - 1  # shard index entry of an inner chunk that is not stored


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


def _direct_codec(meta: dict[str, Any], sharded: bool) -> Any | None:
    """The zstd codec of an array layout simple enough to encode directly, or None."""
    cke = meta["chunk_key_encoding"]
    codecs = meta["codecs"]
    direct = cke["name"] == "default" and cke.get("configuration", {}).get("separator", "/") == "/"
    if sharded:
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
    if not direct:
        return None
    from numcodecs.zstd import Zstd

    conf = codecs[1].get("configuration", {})
    return Zstd(level=conf.get("level", 0), checksum=conf.get("checksum", False))


class _ArrayWriter:
    """Writes whole chunks of a Zarr v3 array straight to its directory store.

    Going through ``zarr.Array.__setitem__`` costs milliseconds per chunk in event-loop round
    trips; the layouts this package creates (default ``/`` chunk keys, bytes + zstd codecs, either
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
        self.codec: Any = _direct_codec(meta, sharded=self.shard is not None)
        if self.codec is None:
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
    """Return the calling thread's (image, valid) writers of the store ``out``."""
    cache = _thread_cache()
    # a store rewritten at the same path (new settings) has new metadata: writers of the old
    # one would skip creating its chunk folders and encode with its old codec
    meta = os.stat(os.path.join(out, "image", "zarr.json"))
    key = f"zarr:{out}:{meta.st_ino}:{meta.st_mtime_ns}"
    writers = cache.get(key)
    if writers is None:
        writers = cache[key] = (_ArrayWriter(out, "image"), _ArrayWriter(out, "valid"))
        for k in [k for k in cache if k.startswith("zarr:") and k != key]:
            del cache[k]
    return writers


def _stored_chunks(
    shard_path: str, shard: tuple[int, ...], index_at_end: bool
) -> list[tuple[int, int]]:
    """(row, col) within the shard of the inner chunks a 2-D shard file stores, row-major."""
    index_bytes = shard[0] * shard[1] * 16 + 4  # (offset, nbytes) uint64 pairs + crc32c
    with open(shard_path, "rb") as f:
        if index_at_end:
            f.seek(-index_bytes, os.SEEK_END)
        index = np.frombuffer(f.read(index_bytes - 4), dtype="<u8")
    stored = index.reshape(shard[0], shard[1], 2)[..., 1] != _EMPTY
    return [(int(i), int(j)) for i, j in zip(*np.nonzero(stored), strict=True)]
