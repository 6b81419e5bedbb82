"""Wall-to-wall embeddings: DOFA over every covered window with Dask, then the trained adapters.

A map's cell (i, j) covers ``stride × stride`` image pixels and holds the embedding of the
``tile_size`` window centred on it; with the default stride (the tile size) the windows are the
image tiles themselves. Cells are computed in blocks of ``block_tiles × block_tiles``, each
recorded once written, so a killed run redoes only the missing blocks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from botaclip_core import progress
from botaclip_core.embedding_store import (
    EMBEDDING,
    EmbeddingStore,
    check_dtype,
    create_embedding_store,
)
from botaclip_core.errors import InputDataError
from botaclip_core.georef import read_grid
from botaclip_core.grid import RegionGrid

logger = logging.getLogger(__name__)

__all__ = [
    "EMBEDDING",
    "BackboneSpec",
    "embed_region",
    "embedding_grid",
    "sample_embeddings",
    "transform_embeddings",
]

WAVE = 2000  # blocks per Dask wave: keeps the scheduler's graph small


@dataclass(frozen=True)
class BackboneSpec:
    """Everything a Dask worker needs to rebuild the frozen backbone and its input scaling."""

    size: str
    weights: str | None
    seed: int
    wavelengths_um: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    batch_size: int = 8
    torch_threads: int | None = None


@dataclass(frozen=True)
class Windows:
    """Where a map's windows lie on the image: ``tile_size`` windows every ``stride`` pixels."""

    tile_size: int
    stride: int
    block: int  # cells per block side

    @property
    def offset(self) -> int:
        """Pixels from a cell's first pixel back to its window's first pixel."""
        return (self.tile_size - self.stride) // 2

    def check(self) -> None:
        """Raise unless windows can be centred on cells.

        Raises:
            InputDataError: for a stride that is not positive or not of the tile size's parity.
        """
        if self.stride < 1 or (self.tile_size - self.stride) % 2:
            raise InputDataError(
                f"embed.stride: {self.stride} px with tiling.tile_size {self.tile_size}: the "
                "stride must be positive and differ from the tile size by an even number of "
                f"pixels, so that windows are centred on cells (e.g. {self.tile_size // 2})"
            )

    def pixel_rows(self, c0: int, c1: int) -> tuple[int, int]:
        """Image rows (or columns) read by the windows of cells ``c0 .. c1 - 1``."""
        return c0 * self.stride - self.offset, (c1 - 1) * self.stride - self.offset + self.tile_size

    def cells_over(self, p0: np.ndarray, p1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """First and last cells whose windows overlap pixels ``[p0, p1)`` (inclusive range)."""
        s, h, t = self.stride, self.offset, self.tile_size
        first = np.floor_divide(p0 + h - t, s) + 1
        last = -np.floor_divide(-(p1 + h), s) - 1
        return np.maximum(first, 0), last


def embedding_grid(image_grid: RegionGrid, stride: int) -> RegionGrid:
    """One embedding cell per ``stride × stride`` image pixels (the tile size by default)."""
    return image_grid.coarsen(stride)


def covered_embedding_blocks(image_zarr: Path, windows: Windows) -> list[tuple[int, int]]:
    """Blocks of cells whose windows overlap image chunks that hold source pixels."""
    from botaclip_core.tiling import covered_blocks

    chunks = np.array(sorted(covered_blocks(image_zarr)), dtype=np.int64).reshape(-1, 2)
    if not len(chunks):
        return []
    t = windows.tile_size  # the image store's chunk side
    found: set[tuple[int, int]] = set()
    r0, r1 = windows.cells_over(chunks[:, 0] * t, (chunks[:, 0] + 1) * t)
    c0, c1 = windows.cells_over(chunks[:, 1] * t, (chunks[:, 1] + 1) * t)
    b = windows.block
    for a0, a1, e0, e1 in zip(r0 // b, r1 // b, c0 // b, c1 // b, strict=True):
        found.update((by, bx) for by in range(a0, a1 + 1) for bx in range(e0, e1 + 1))
    return sorted(found)


def _records(out: Path) -> Path:
    return out.with_name(out.name + ".blocks")


def _done(out: Path, by: int, bx: int) -> Path:
    return _records(out) / f"{by}_{bx}"


def _read_window(
    image: Any, valid: Any, rows: tuple[int, int], cols: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels and validity of an image window; outside the image: zeros, invalid."""
    (r0, r1), (c0, c1) = rows, cols
    pixels = np.zeros((image.shape[0], r1 - r0, c1 - c0), dtype=image.dtype)
    mask = np.zeros((r1 - r0, c1 - c0), dtype=bool)
    rr0, rr1 = max(r0, 0), min(r1, image.shape[1])
    cc0, cc1 = max(c0, 0), min(c1, image.shape[2])
    if rr1 > rr0 and cc1 > cc0:
        inner = (slice(rr0 - r0, rr1 - r0), slice(cc0 - c0, cc1 - c0))
        pixels[(slice(None), *inner)] = np.asarray(image[:, rr0:rr1, cc0:cc1])
        mask[inner] = np.asarray(valid[rr0:rr1, cc0:cc1]) > 0
    return pixels, mask


def block_windows(
    pixels: np.ndarray, mask: np.ndarray, windows: Windows, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The ``(cells, C, T, T)`` windows of a block's pixels and which of them hold data."""
    t, s = windows.tile_size, windows.stride
    view = np.lib.stride_tricks.sliding_window_view(pixels, (t, t), axis=(1, 2))[:, ::s, ::s]
    view = view[:, : shape[0], : shape[1]]
    tiles = view.transpose(1, 2, 0, 3, 4).reshape(-1, pixels.shape[0], t, t)
    mview = np.lib.stride_tricks.sliding_window_view(mask, (t, t))[::s, ::s]
    covered = mview[: shape[0], : shape[1]].any(axis=(2, 3)).reshape(-1)
    return tiles, covered


def embed_block(
    image_zarr: str,
    out: str,
    by: int,
    bx: int,
    windows: Windows,
    spec: BackboneSpec,
) -> int:
    """Embed one block of cells and write it; returns the number of windows embedded.

    Runs on Dask workers: opens the stores itself and reuses the worker's cached backbone.
    """
    import torch

    from botaclip_core.features import encode_tiles, load_backbone

    if spec.torch_threads:  # Dask sets OMP_NUM_THREADS=1 in workers; the model wants the cores
        torch.set_num_threads(spec.torch_threads)
    image = zarr.open_array(os.path.join(image_zarr, "image"), mode="r")
    valid = zarr.open_array(os.path.join(image_zarr, "valid"), mode="r")
    store = EmbeddingStore(out, mode="r+")
    cy0, cx0 = by * windows.block, bx * windows.block
    cy1, cx1 = min(cy0 + windows.block, store.height), min(cx0 + windows.block, store.width)
    pixels, mask = _read_window(
        image, valid, windows.pixel_rows(cy0, cy1), windows.pixel_rows(cx0, cx1)
    )
    tiles, covered = block_windows(pixels, mask, windows, (cy1 - cy0, cx1 - cx0))
    block = np.full((store.dim, len(covered)), np.nan, dtype=np.float32)
    if covered.any():
        model = load_backbone(spec.size, spec.weights, spec.seed)
        feats = encode_tiles(
            model,
            tiles[covered],
            spec.wavelengths_um,
            np.asarray(spec.mean, dtype=np.float32),
            np.asarray(spec.std, dtype=np.float32),
            batch_size=spec.batch_size,
        )
        block[:, covered] = feats.T
    store.write(cy0, cx0, block.reshape(-1, cy1 - cy0, cx1 - cx0))
    _done(Path(out), by, bx).touch()
    return int(covered.sum())


def embed_region(
    image_zarr: Path,
    out: Path,
    *,
    spec: BackboneSpec,
    dim: int,
    tile_size: int,
    block_tiles: int,
    stride: int | None = None,
    dtype: str = "float32",
    client: Any | None = None,
    attrs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Backbone features of every covered window of the image Zarr → ``out`` (feature, y, x).

    Blocks already recorded as done (a previous, interrupted run) are skipped; without a Dask
    client, blocks run one after another in this process.

    Args:
        image_zarr: the image store written by tiling.
        out: the embedding store to write.
        spec: the backbone.
        dim: its feature width.
        tile_size: model window side in pixels.
        block_tiles: cells per block side (one Dask task, one completion record).
        stride: pixels per cell side (default ``tile_size``).
        dtype: storage type of the map (see :mod:`botaclip_core.embedding_store`).
        client: a Dask client, or None to run in this process.
        attrs: provenance attributes of the store.

    Returns:
        The store path and block and window counts.

    Raises:
        InputDataError: for a bad stride or dtype.
    """
    windows = Windows(tile_size, stride or tile_size, block_tiles)
    windows.check()
    check_dtype(dtype)
    image = xr.open_zarr(image_zarr)
    grid = embedding_grid(read_grid(image, source=str(image_zarr)), windows.stride)
    if not (out / "zarr.json").is_file():
        create_embedding_store(
            out,
            grid,
            dim,
            chunk=block_tiles,
            dtype=dtype,
            attrs={**(attrs or {}), "tile_size_px": tile_size, "stride_px": windows.stride},
        )
    _records(out).mkdir(parents=True, exist_ok=True)
    blocks = covered_embedding_blocks(image_zarr, windows)
    todo = [b for b in blocks if not _done(out, *b).exists()]
    logger.info("embed: %d covered blocks, %d to do", len(blocks), len(todo))
    n_tiles = _run_blocks(
        str(image_zarr), str(out), todo, windows, spec, client, (grid.height, grid.width)
    )
    zarr.consolidate_metadata(str(out))
    return {
        "zarr": str(out),
        "blocks": len(blocks),
        "blocks_run": len(todo),
        "tiles_embedded": n_tiles,
    }


def _run_blocks(
    image_zarr: str,
    out: str,
    todo: list[tuple[int, int]],
    windows: Windows,
    spec: BackboneSpec,
    client: Any | None,
    shape: tuple[int, int],
) -> int:
    """Embed the blocks in this process or on Dask in waves; progress in cells (tiles)."""
    b, (height, width) = windows.block, shape

    def cells(block: tuple[int, int]) -> int:
        by, bx = block
        return (min(by * b + b, height) - by * b) * (min(bx * b + b, width) - bx * b)

    n_tiles = 0
    total = sum(cells(block) for block in todo)
    with progress.track(f"embedding {Path(out).name}", total=total, unit="tiles") as bar:
        if client is None:
            for by, bx in todo:
                n_tiles += embed_block(image_zarr, out, by, bx, windows, spec)
                bar.advance(cells((by, bx)))
            return n_tiles
        from distributed import as_completed

        for start in range(0, len(todo), WAVE):
            wave = todo[start : start + WAVE]
            futures = client.map(
                embed_block,
                [image_zarr] * len(wave),
                [out] * len(wave),
                [blk[0] for blk in wave],
                [blk[1] for blk in wave],
                windows=windows,
                spec=spec,
                pure=False,
            )
            block_of = {f.key: blk for f, blk in zip(futures, wave, strict=True)}
            for future in as_completed(futures):
                n_tiles += future.result()
                bar.advance(cells(block_of[future.key]))
    return n_tiles


def transform_embeddings(
    source: Path,
    out: Path,
    fn: Callable[[np.ndarray], np.ndarray],
    *,
    out_dim: int,
    attrs: dict[str, Any],
    dtype: str | None = None,
) -> dict[str, Any]:
    """Apply ``fn`` ((n, D) → (n, out_dim)) to every embedding of ``source`` → a new store.

    ``source`` is read dequantized; the new store has ``dtype`` (default: the source's). An int8
    store is centred on the mean of ``fn``'s output, found in a first pass over the map.
    """
    src = EmbeddingStore(source)
    dtype = dtype or src.dtype
    check_dtype(dtype)
    keep = {k: v for k, v in src.attrs.items() if k in ("tile_size_px", "stride_px")}

    def mapped(ys: slice, xs: slice) -> np.ndarray:
        block = src.read(ys, xs)
        d, h, w = block.shape
        flat = block.reshape(d, -1).T
        ok = ~np.isnan(flat).any(axis=1)
        res = np.full((flat.shape[0], out_dim), np.nan, dtype=np.float32)
        res[ok] = fn(flat[ok])
        return res.T.reshape(out_dim, h, w)

    covered = [(ys, xs) for ys, xs in src.chunks() if src.covered(ys, xs).any()]
    offset = None
    if dtype == "int8":
        total, count = np.zeros(out_dim, np.float64), 0
        for ys, xs in covered:
            flat = mapped(ys, xs).reshape(out_dim, -1)
            good = ~np.isnan(flat).any(axis=0)
            total += flat[:, good].sum(axis=1, dtype=np.float64)
            count += int(good.sum())
        offset = (total / max(count, 1)).astype(np.float32)
    create_embedding_store(
        out, src.grid, out_dim, chunk=src.chunk, attrs={**keep, **attrs}, dtype=dtype, offset=offset
    )
    target = EmbeddingStore(out, mode="r+")
    for ys, xs in covered:  # the new store's fill values already say "nothing embedded" elsewhere
        target.write(ys.start, xs.start, mapped(ys, xs))
    zarr.consolidate_metadata(str(out))
    return {"zarr": str(out)}


def sample_embeddings(
    zarr_path: Path,
    rows: Sequence[int] | np.ndarray,
    cols: Sequence[int] | np.ndarray,
    cell_px: int | None = None,
) -> np.ndarray:
    """Embeddings ``(n, D)`` at image-pixel positions (NaN rows where nothing was embedded).

    Args:
        zarr_path: an embedding store.
        rows: image rows of the points.
        cols: image columns of the points.
        cell_px: image pixels per cell side; default: the store's stride.
    """
    store = EmbeddingStore(zarr_path)
    cell = cell_px or store.cell_px
    ty = np.clip(np.asarray(rows) // cell, 0, store.height - 1)
    tx = np.clip(np.asarray(cols) // cell, 0, store.width - 1)
    return read_cells(store, ty, tx)


def read_cells(store: EmbeddingStore, ty: np.ndarray, tx: np.ndarray) -> np.ndarray:
    """Float32 embeddings ``(n, D)`` of cells, reading only the chunks that hold them."""
    out = np.empty((len(ty), store.dim), dtype=np.float32)
    c = store.chunk
    # read only the chunks that hold points: the full map of a département does not fit in memory
    for cy, cx in set(zip((ty // c).tolist(), (tx // c).tolist(), strict=True)):
        sel = (ty // c == cy) & (tx // c == cx)
        block = store.read(slice(cy * c, (cy + 1) * c), slice(cx * c, (cx + 1) * c))
        out[sel] = block[:, ty[sel] - cy * c, tx[sel] - cx * c].T
    return out
