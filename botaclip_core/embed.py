"""Wall-to-wall embeddings: DOFA over every covered tile with Dask, then the trained adapter."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from botaclip_core.georef import georeferenced_dataset, read_grid
from botaclip_core.grid import RegionGrid

logger = logging.getLogger(__name__)

EMBEDDING = "embedding"


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


def embedding_grid(image_grid: RegionGrid, tile_size: int) -> RegionGrid:
    """One embedding cell per model tile."""
    return image_grid.coarsen(tile_size)


def create_embedding_store(
    out: Path, grid: RegionGrid, dim: int, *, chunk: int, attrs: dict[str, Any]
) -> None:
    """Write the metadata of an empty ``(feature, y, x)`` float32 embedding Zarr (NaN = no data)."""
    data = da.full(
        (dim, grid.height, grid.width), np.nan, dtype=np.float32, chunks=(dim, chunk, chunk)
    )
    ds = georeferenced_dataset(
        grid,
        {
            EMBEDDING: (
                ("feature", "y", "x"),
                data,
                {"long_name": "embedding", "_FillValue": np.nan},
            )
        },
        attrs,
    )
    ds = ds.assign_coords(feature=np.arange(dim, dtype=np.int32))
    encoding: dict[str, dict[str, Any]] = {
        EMBEDDING: {"chunks": (dim, chunk, chunk), "compressors": [zarr.codecs.ZstdCodec(level=3)]}
    }
    ds[EMBEDDING].attrs.pop("_FillValue")
    encoding[EMBEDDING]["_FillValue"] = np.nan
    ds.to_zarr(out, mode="w", compute=False, zarr_format=3, encoding=encoding, consolidated=False)


def _records(out: Path) -> Path:
    return out.with_name(out.name + ".blocks")


def _done(out: Path, by: int, bx: int) -> Path:
    return _records(out) / f"{by}_{bx}"


def covered_embedding_blocks(image_zarr: Path, block_tiles: int) -> list[tuple[int, int]]:
    """Embedding blocks (of ``block_tiles`` tiles per side) that hold source pixels."""
    from botaclip_core.tiling import covered_blocks

    return sorted({(r // block_tiles, c // block_tiles) for r, c in covered_blocks(image_zarr)})


def embed_block(
    image_zarr: str,
    out: str,
    by: int,
    bx: int,
    tile_size: int,
    block_tiles: int,
    spec: BackboneSpec,
) -> int:
    """Embed one block of tiles and write its chunk; returns the number of tiles embedded.

    Runs on Dask workers: opens the stores itself and reuses the worker's cached backbone.
    """
    import torch

    from botaclip_core.features import encode_tiles, load_backbone

    if spec.torch_threads:  # Dask sets OMP_NUM_THREADS=1 in workers; the model wants the cores
        torch.set_num_threads(spec.torch_threads)
    image = zarr.open_array(os.path.join(image_zarr, "image"), mode="r")
    valid = zarr.open_array(os.path.join(image_zarr, "valid"), mode="r")
    emb = zarr.open_array(os.path.join(out, EMBEDDING), mode="r+")
    _, n_ty, n_tx = emb.shape
    ty0, tx0 = by * block_tiles, bx * block_tiles
    ty1, tx1 = min(ty0 + block_tiles, n_ty), min(tx0 + block_tiles, n_tx)
    r0, c0 = ty0 * tile_size, tx0 * tile_size
    r1, c1 = min(ty1 * tile_size, image.shape[1]), min(tx1 * tile_size, image.shape[2])
    pixels = np.zeros(
        (image.shape[0], (ty1 - ty0) * tile_size, (tx1 - tx0) * tile_size), dtype=image.dtype
    )
    mask = np.zeros(pixels.shape[1:], dtype=bool)
    pixels[:, : r1 - r0, : c1 - c0] = np.asarray(image[:, r0:r1, c0:c1])
    mask[: r1 - r0, : c1 - c0] = np.asarray(valid[r0:r1, c0:c1]) > 0
    nty, ntx = ty1 - ty0, tx1 - tx0
    tiles = pixels.reshape(pixels.shape[0], nty, tile_size, ntx, tile_size).transpose(1, 3, 0, 2, 4)
    tiles = tiles.reshape(nty * ntx, pixels.shape[0], tile_size, tile_size)
    covered = mask.reshape(nty, tile_size, ntx, tile_size).any(axis=(1, 3)).reshape(-1)
    block = np.full((emb.shape[0], nty * ntx), np.nan, dtype=np.float32)
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
    emb[:, ty0:ty1, tx0:tx1] = block.reshape(-1, nty, ntx)
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
    client: Any | None = None,
    attrs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """DOFA features for every covered tile of the image Zarr → ``out`` (feature, ty, tx).

    Blocks already recorded as done (a previous, interrupted run) are skipped; without a Dask
    client, blocks run one after another in this process.
    """
    image = xr.open_zarr(image_zarr)
    grid = embedding_grid(read_grid(image, source=str(image_zarr)), tile_size)
    if not (out / "zarr.json").is_file():
        create_embedding_store(
            out, grid, dim, chunk=block_tiles, attrs={**(attrs or {}), "tile_size_px": tile_size}
        )
    _records(out).mkdir(parents=True, exist_ok=True)
    blocks = covered_embedding_blocks(image_zarr, block_tiles)
    todo = [b for b in blocks if not _done(out, *b).exists()]
    logger.info("embed: %d covered blocks, %d to do", len(blocks), len(todo))
    args = (str(image_zarr), str(out))
    n_tiles = 0
    if client is None:
        for by, bx in todo:
            n_tiles += embed_block(*args, by, bx, tile_size, block_tiles, spec)
    else:
        for start in range(0, len(todo), 2000):  # waves keep the scheduler's graph small
            wave = todo[start : start + 2000]
            futures = client.map(
                embed_block,
                [args[0]] * len(wave),
                [args[1]] * len(wave),
                [b[0] for b in wave],
                [b[1] for b in wave],
                tile_size=tile_size,
                block_tiles=block_tiles,
                spec=spec,
                pure=False,
            )
            n_tiles += sum(client.gather(futures))
    zarr.consolidate_metadata(str(out))
    return {
        "zarr": str(out),
        "blocks": len(blocks),
        "blocks_run": len(todo),
        "tiles_embedded": n_tiles,
    }


def transform_embeddings(
    source: Path,
    out: Path,
    fn: Callable[[np.ndarray], np.ndarray],
    *,
    out_dim: int,
    attrs: dict[str, Any],
) -> dict[str, Any]:
    """Apply ``fn`` ((n, D) → (n, out_dim)) to every embedding of ``source`` → a new Zarr."""
    src = xr.open_zarr(source)
    grid = read_grid(src, source=str(source))
    emb = src[EMBEDDING].data
    chunk = emb.chunksize[1]

    def _apply(block: np.ndarray) -> np.ndarray:
        d, h, w = block.shape
        flat = block.reshape(d, -1).T
        ok = ~np.isnan(flat).any(axis=1)
        res = np.full((flat.shape[0], out_dim), np.nan, dtype=np.float32)
        if ok.any():
            res[ok] = fn(flat[ok])
        return res.T.reshape(out_dim, h, w)

    mapped = emb.map_blocks(_apply, chunks=((out_dim,), *emb.chunks[1:]), dtype=np.float32)
    create_embedding_store(out, grid, out_dim, chunk=chunk, attrs=attrs)
    target: Any = zarr.open_array(str(out / EMBEDDING), mode="r+")
    da.store(mapped, target, lock=False)
    zarr.consolidate_metadata(str(out))
    return {"zarr": str(out)}


def sample_embeddings(
    zarr_path: Path,
    rows: Sequence[int] | np.ndarray,
    cols: Sequence[int] | np.ndarray,
    tile_size: int,
) -> np.ndarray:
    """Embeddings ``(n, D)`` at image-pixel positions (NaN rows where nothing was embedded)."""
    arr = zarr.open_array(str(Path(zarr_path) / EMBEDDING), mode="r")
    dim, h, w = arr.shape
    chunk = arr.chunks[1]
    ty = np.clip(np.asarray(rows) // tile_size, 0, h - 1)
    tx = np.clip(np.asarray(cols) // tile_size, 0, w - 1)
    out = np.empty((len(ty), dim), dtype=np.float32)
    # read only the chunks that hold sites: the full map of a département does not fit in memory
    for cy, cx in set(zip((ty // chunk).tolist(), (tx // chunk).tolist(), strict=True)):
        sel = (ty // chunk == cy) & (tx // chunk == cx)
        block = np.asarray(arr[:, cy * chunk : (cy + 1) * chunk, cx * chunk : (cx + 1) * chunk])
        out[sel] = block[:, ty[sel] - cy * chunk, tx[sel] - cx * chunk].T
    return out
