"""Wall-to-wall embeddings: DOFA over every covered window with Dask, then the trained adapters.

A map's cell (i, j) covers ``stride × stride`` image pixels and holds the embedding of the
``tile_size`` window centred on it; with the default stride (the tile size) the windows are the
image tiles themselves. Cells are computed in blocks of ``block_tiles × block_tiles``, each
recorded once written, so a killed run redoes only the missing blocks.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from botaclip_core import progress
from botaclip_core.embedding_store import (
    EMBEDDING,
    EmbeddingStore,
    check_dtype,
    create_embedding_store,
)
from botaclip_core.errors import InputDataError
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


@dataclass(frozen=True)
class BackboneSpec:
    """Everything a Dask worker needs to rebuild the frozen backbone and its input scaling.

    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) is resolved where the blocks run;
    ``precision`` (``fp32``, ``bf16``) was resolved when the stage was planned (it is part of
    the map); ``batch_size`` None is the device's default (8 on the CPU, 256 for DOFA-Base on
    CUDA).
    """

    size: str
    weights: str | None
    seed: int
    wavelengths_um: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    batch_size: int | None = 8
    torch_threads: int | None = None
    device: str = "cpu"
    precision: str = "fp32"
    loader_threads: int | None = None
    writer_threads: int | None = None

    @property
    def wants_gpu(self) -> bool:
        """Whether the blocks need a CUDA device (and Dask tasks ask for ``{"GPU": 1}``)."""
        return self.device.startswith("cuda") or (
            self.device == "auto" and self.precision == "bf16"
        )


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
    stored: Callable[[Path], list[tuple[int, int]]] = stored_valid_chunks
    try:
        from botaclip_core.tiling import covered_blocks as stored
    except ImportError:  # a machine without GDAL (a GPU box): tiling needs rasterio, this not
        pass

    chunks = np.array(sorted(stored(image_zarr)), dtype=np.int64).reshape(-1, 2)
    if not len(chunks):
        return []
    t = windows.tile_size  # the image store's chunk side
    found: set[tuple[int, int]] = set()
    height, width = zarr.open_array(str(Path(image_zarr) / "valid"), mode="r").shape
    r0, r1 = windows.cells_over(chunks[:, 0] * t, (chunks[:, 0] + 1) * t)
    c0, c1 = windows.cells_over(chunks[:, 1] * t, (chunks[:, 1] + 1) * t)
    # a window that overlaps the image's last pixels can belong to a cell past the map's edge
    r1 = np.minimum(r1, -(-height // windows.stride) - 1)
    c1 = np.minimum(c1, -(-width // windows.stride) - 1)
    b = windows.block
    for a0, a1, e0, e1 in zip(r0 // b, r1 // b, c0 // b, c1 // b, strict=True):
        found.update((by, bx) for by in range(a0, a1 + 1) for bx in range(e0, e1 + 1))
    return sorted(found)


def stored_valid_chunks(image_zarr: Path) -> list[tuple[int, int]]:
    """(row, col) of the stored chunks of an image store's ``valid`` array, with numpy alone.

    The same answer as :func:`botaclip_core.tiling.covered_blocks` (chunk files, and the shard
    indexes of sharded stores), for machines where the tiling package (rasterio) is missing.
    """
    import json

    valid = Path(image_zarr) / "valid"
    meta = json.loads((valid / "zarr.json").read_text())
    codecs = meta["codecs"]
    shard: tuple[int, int] | None = None
    at_end = True
    if len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed":
        conf = codecs[0]["configuration"]
        outer = meta["chunk_grid"]["configuration"]["chunk_shape"]
        shard = (outer[0] // conf["chunk_shape"][0], outer[1] // conf["chunk_shape"][1])
        at_end = conf.get("index_location", "end") == "end"
    found: list[tuple[int, int]] = []
    root = valid / "c"
    if not root.is_dir():
        return found
    for row in os.scandir(root):
        for col in os.scandir(row.path) if row.name.isdigit() and row.is_dir() else ():
            if not col.name.isdigit():
                continue
            r, c = int(row.name), int(col.name)
            if shard is None:
                found.append((r, c))
                continue
            size = shard[0] * shard[1] * 16 + 4  # (offset, nbytes) uint64 pairs + crc32c
            with open(col.path, "rb") as f:
                f.seek(-size if at_end else 0, os.SEEK_END if at_end else os.SEEK_SET)
                index = np.frombuffer(f.read(size - 4), dtype="<u8").reshape(*shard, 2)
            stored = np.argwhere(index[..., 1] != np.iinfo(np.uint64).max)
            found.extend((r * shard[0] + int(i), c * shard[1] + int(j)) for i, j in stored)
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
    """Embed one block of cells and write it; returns the number of windows embedded."""
    return embed_blocks(image_zarr, out, [(by, bx)], windows, spec)


@dataclass
class _Block:
    """A block's place on the map, which of its cells hold data, and their features so far."""

    by: int
    bx: int
    y0: int
    x0: int
    h: int
    w: int
    covered: np.ndarray
    feats: np.ndarray
    remaining: int


def _worker_device(requested: str) -> Any:
    """The torch device of this process: a Dask worker named ``i`` on a multi-GPU box takes GPU i.

    Workers of dask-cuda's ``LocalCUDACluster`` see one GPU each (``CUDA_VISIBLE_DEVICES``), so
    ``cuda`` is theirs; workers of a plain LocalCluster on a box of n GPUs share the box, and take
    ``cuda:(name mod n)``.
    """
    import torch

    from botaclip_core.training.runtime import resolve_device

    device = resolve_device(requested, field="embed.device")
    if device.type != "cuda" or device.index is not None or torch.cuda.device_count() < 2:
        return device
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return device
    if isinstance(name, int):
        return torch.device("cuda", name % torch.cuda.device_count())
    return device


def embed_blocks(
    image_zarr: str,
    out: str,
    blocks: Sequence[tuple[int, int]],
    windows: Windows,
    spec: BackboneSpec,
    on_block: Callable[[int], None] | None = None,
) -> int:
    """Embed blocks of cells and write them, the device kept busy; returns windows embedded.

    Loader threads read, decode and cut the windows of the blocks ahead (a bounded queue); a
    batcher packs their windows into full batches in reusable (pinned, on CUDA) buffers; this
    thread copies each batch to the device without blocking, normalises it there and runs the
    forward (bf16 autocast for ``bf16``), fetching the batch before's features meanwhile; writer
    threads store each finished block and then its completion record. Runs on Dask workers too:
    it opens the stores itself and reuses the process's backbone on its device.
    """
    import torch

    device = _worker_device(spec.device)
    cuda = device.type == "cuda"
    threads = torch.get_num_threads()
    if spec.torch_threads and not cuda:  # Dask sets OMP_NUM_THREADS=1 in workers
        torch.set_num_threads(spec.torch_threads)
    try:
        return _embed_blocks(image_zarr, out, blocks, windows, spec, device, on_block)
    finally:  # the process's own setting back (later stages' float results depend on it)
        torch.set_num_threads(threads)


def _embed_blocks(
    image_zarr: str,
    out: str,
    blocks: Sequence[tuple[int, int]],
    windows: Windows,
    spec: BackboneSpec,
    device: Any,
    on_block: Callable[[int], None] | None,
) -> int:
    import torch

    from botaclip_core.features import default_batch_size, load_backbone, precision_context
    from botaclip_core.feeding import Batch, Batcher, Writer, prefetch

    cuda = device.type == "cuda"
    autocast = precision_context(device, spec.precision)
    batch_size = spec.batch_size or default_batch_size(device, spec.size)
    image = zarr.open_array(os.path.join(image_zarr, "image"), mode="r")
    valid = zarr.open_array(os.path.join(image_zarr, "valid"), mode="r")
    store = EmbeddingStore(out, mode="r+")
    check_precision(store, spec.precision)
    model = load_backbone(spec.size, spec.weights, spec.seed, device)
    waves = torch.tensor(spec.wavelengths_um, dtype=torch.float32, device=device)
    bands, t = int(image.shape[0]), windows.tile_size
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, bands, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, bands, 1, 1)
    rows_dtype = np.dtype(image.dtype)
    if rows_dtype not in (np.uint8, np.int16, np.int32, np.float32):
        rows_dtype = np.dtype(np.int32 if rows_dtype.kind in "ui" else np.float32)

    def load(block: tuple[int, int]) -> tuple[_Block, torch.Tensor]:
        by, bx = block
        cy0, cx0 = by * windows.block, bx * windows.block
        cy1, cx1 = min(cy0 + windows.block, store.height), min(cx0 + windows.block, store.width)
        pixels, mask = _read_window(
            image, valid, windows.pixel_rows(cy0, cy1), windows.pixel_rows(cx0, cx1)
        )
        tiles, covered = block_windows(pixels, mask, windows, (cy1 - cy0, cx1 - cx0))
        rows = np.ascontiguousarray(tiles[covered], dtype=rows_dtype)
        n = int(covered.sum())
        feats = np.empty((n, store.dim), dtype=np.float32)
        info = _Block(by, bx, cy0, cx0, cy1 - cy0, cx1 - cx0, covered, feats, n)
        return info, torch.from_numpy(rows)

    def write(block: _Block) -> None:
        values = np.full((store.dim, block.h * block.w), np.nan, dtype=np.float32)
        values[:, block.covered] = block.feats.T
        store.write(block.y0, block.x0, values.reshape(-1, block.h, block.w))
        _done(Path(out), block.by, block.bx).write_text(spec.precision)

    loaders = spec.loader_threads or (min(8, max(2, (os.cpu_count() or 2) // 2)) if cuda else 1)
    writers = spec.writer_threads or (4 if cuda else 1)
    depth = max(2 * loaders, 4)

    def loaded() -> Iterator[tuple[_Block, torch.Tensor]]:
        blocks_ahead = prefetch(blocks, load, workers=loaders, depth=depth)
        try:
            for _, pair in blocks_ahead:
                yield pair
        finally:
            blocks_ahead.close()

    batcher: Batcher[_Block] = Batcher(
        loaded(),
        batch_size=batch_size,
        row_shape=(bands, t, t),
        dtype=torch.from_numpy(np.zeros(0, rows_dtype)).dtype,
        pin=cuda,
    )
    n_tiles = 0

    def finish(
        batch: Batch[_Block], feats: torch.Tensor, event: Any, writer: Writer[_Block]
    ) -> None:
        if event is not None:
            event.synchronize()  # the copy to the host is done, so is the batch's copy in
        batcher.release(batch)
        host = feats.numpy()
        at = 0
        for block, first, rows in batch.parts:
            block.feats[first : first + rows] = host[at : at + rows]
            at += rows
            block.remaining -= rows
            if block.remaining == 0:
                writer.put(block)
                if on_block is not None:
                    on_block(block.h * block.w)

    with torch.inference_mode(), Writer(write, workers=writers, depth=4 * writers) as writer:
        previous = None
        for batch in batcher:
            n = len(batch.data)
            n_tiles += n
            if n:
                x = batch.data.to(device, non_blocking=True).float()
                with autocast():
                    out_dev = model.forward_features((x - mean) / std, waves)
                out_dev = out_dev.float()
                if cuda:
                    host = torch.empty(out_dev.shape, dtype=torch.float32, pin_memory=True)
                    host.copy_(out_dev, non_blocking=True)
                    event: Any = torch.cuda.Event()
                    event.record()
                else:
                    host, event = out_dev, None
            else:
                host, event = torch.zeros((0, store.dim)), None
            if previous is not None:
                finish(*previous, writer)
            previous = (batch, host, event)
        if previous is not None:
            finish(*previous, writer)
    return n_tiles


def check_precision(store: EmbeddingStore, precision: str) -> None:
    """Raise unless the store's blocks were computed at ``precision`` (a resumed run).

    Raises:
        InputDataError: naming both precisions and the fix.
    """
    recorded = str(store.attrs.get("precision", "fp32"))
    if recorded != precision:
        raise InputDataError(
            f"{store.path}: its blocks were computed in {recorded} but this run computes in "
            f"{precision}; a map must not mix precisions. Set embed.precision to {recorded} to "
            "resume it, or delete the store (and its .blocks folder) to recompute it"
        )


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
    image_attrs = dict(zarr.open_group(str(image_zarr), mode="r").attrs)
    grid = embedding_grid(_read_grid_attrs(image_attrs, str(image_zarr)), windows.stride)
    if not (out / "zarr.json").is_file():
        create_embedding_store(
            out,
            grid,
            dim,
            chunk=block_tiles,
            dtype=dtype,
            attrs={
                **(attrs or {}),
                "tile_size_px": tile_size,
                "stride_px": windows.stride,
                "precision": spec.precision,
            },
            like=image_zarr,
        )
    check_precision(EmbeddingStore(out), spec.precision)
    _records(out).mkdir(parents=True, exist_ok=True)
    blocks = covered_embedding_blocks(image_zarr, windows)
    done = {entry.name for entry in os.scandir(_records(out))}
    todo = [b for b in blocks if f"{b[0]}_{b[1]}" not in done]
    logger.info("embed: %d covered blocks, %d to do", len(blocks), len(todo))
    n_tiles = _run_blocks(
        str(image_zarr), str(out), todo, windows, spec, client, (grid.height, grid.width)
    )
    _consolidate(out)
    return {
        "zarr": str(out),
        "blocks": len(blocks),
        "blocks_run": len(todo),
        "tiles_embedded": n_tiles,
        "precision": spec.precision,
    }


def _consolidate(out: Path) -> None:
    with warnings.catch_warnings():  # zarr says consolidated metadata is not in the v3 spec
        warnings.filterwarnings("ignore", category=UserWarning)
        zarr.consolidate_metadata(str(out))


def _read_grid_attrs(attrs: dict[str, Any], source: str) -> RegionGrid:
    try:
        return RegionGrid.from_dict(attrs["botaclip:grid"])
    except KeyError as exc:
        raise InputDataError(
            f"{source}: no 'botaclip:grid' attribute; this Zarr was not written by botaclip. "
            "Regenerate it with `botaclip run`."
        ) from exc


def _tasks(todo: list[tuple[int, int]], per_task: int) -> list[list[tuple[int, int]]]:
    return [todo[i : i + per_task] for i in range(0, len(todo), per_task)]


def _run_blocks(
    image_zarr: str,
    out: str,
    todo: list[tuple[int, int]],
    windows: Windows,
    spec: BackboneSpec,
    client: Any | None,
    shape: tuple[int, int],
) -> int:
    """Embed the blocks in this process, or on Dask workers in bounded waves of block groups.

    On Dask, a task embeds a group of neighbouring blocks (enough windows for the feeding
    pipeline to reach its pace), and at most two tasks per worker are queued at once, so the
    scheduler never holds a region's worth of tasks. Tasks ask for ``{"GPU": 1}`` only when
    the blocks run on CUDA, so CPU clusters without resources keep working.
    """
    b, (height, width) = windows.block, shape

    def cells(block: tuple[int, int]) -> int:
        by, bx = block
        return (min(by * b + b, height) - by * b) * (min(bx * b + b, width) - bx * b)

    total = sum(cells(block) for block in todo)
    with progress.track(f"embedding {Path(out).name}", total=total, unit="tiles") as bar:
        if client is None:
            return embed_blocks(image_zarr, out, todo, windows, spec, on_block=bar.advance)
        from distributed import as_completed

        workers = client.scheduler_info().get("workers", {})
        resources = None
        if spec.wants_gpu:
            resources = {"GPU": 1}
            if workers and not any(w.get("resources", {}).get("GPU") for w in workers.values()):
                raise InputDataError(
                    "embed.device is CUDA but no Dask worker offers a GPU resource, so the "
                    "blocks would wait forever; start workers with `dask worker ADDRESS "
                    "--resources GPU=1` (one per GPU), or use dask-cuda's LocalCUDACluster "
                    "with resources={'GPU': 1}"
                )
        n_workers = max(1, len(workers))
        cells_per_block = b * b
        batch = spec.batch_size or (256 if spec.wants_gpu else 8)
        # about 16 batches a task, but at least two tasks a worker while the region allows
        per_task = max(1, min(-(-16 * batch // cells_per_block), -(-len(todo) // (2 * n_workers))))
        groups = _tasks(todo, per_task)
        in_flight = 2 * n_workers
        n_tiles = 0
        pending = iter(groups)

        def submit(group: list[tuple[int, int]]) -> Any:
            return client.submit(
                embed_blocks,
                image_zarr,
                out,
                group,
                windows,
                spec,
                pure=False,
                resources=resources,
            )

        group_of = {}
        futures = []
        for group in pending:
            futures.append(f := submit(group))
            group_of[f.key] = group
            if len(futures) >= in_flight:
                break
        queue = as_completed(futures)
        for future in queue:
            n_tiles += future.result()
            bar.advance(sum(cells(blk) for blk in group_of.pop(future.key)))
            nxt = next(pending, None)
            if nxt is not None:
                queue.add(f := submit(nxt))
                group_of[f.key] = nxt
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
        out,
        src.grid,
        out_dim,
        chunk=src.chunk,
        attrs={**keep, **attrs},
        dtype=dtype,
        offset=offset,
        like=source,
    )
    target = EmbeddingStore(out, mode="r+")
    for ys, xs in covered:  # the new store's fill values already say "nothing embedded" elsewhere
        target.write(ys.start, xs.start, mapped(ys, xs))
    _consolidate(out)
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
