"""The image Zarr: its creation or reuse for resuming, consolidation, opening and covered blocks."""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor used on opened stores)
import xarray as xr

from botaclip_core.errors import InputDataError
from botaclip_core.georef import georeferenced_dataset
from botaclip_core.grid import RegionGrid
from botaclip_core.tiling.records import (
    _has_settings_stamp,
    _read_records,
    _recorded_hash,
    _settings_hash,
    _write_settings_stamp,
)
from botaclip_core.tiling.shards import _shard_layout, _stored_chunks

logger = logging.getLogger(__name__)


def covered_blocks(zarr_path: Path) -> list[tuple[int, int]]:
    """(block_row, block_col) of the blocks of an image Zarr that hold source pixels, sorted.

    Args:
        zarr_path: an image Zarr written by ``tile_orthophotos``.

    Returns:
        The blocks whose ``valid`` chunk is stored (read from the chunk files and shard indexes,
        not from the chunks' contents).

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
                    blocks.extend(
                        (r * shard[0] + i, c * shard[1] + j)
                        for i, j in _stored_chunks(col.path, shard, index_at_end)
                    )
    return sorted(blocks)


def open_image(zarr_path: Path) -> xr.Dataset:
    """Open an image Zarr lazily, with its CRS and transform available through ``.rio``.

    Args:
        zarr_path: an image Zarr written by ``tile_orthophotos``.

    Returns:
        The dataset, with ``image`` (band, y, x) and ``valid`` (y, x) variables.

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
    digest = _settings_hash(settings)
    if _has_settings_stamp(records) and (out / "zarr.json").exists():
        if _recorded_hash(records) == digest:
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
    _write_settings_stamp(records, digest, settings)
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


def _consolidate(out: Path) -> None:
    import zarr

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        zarr.consolidate_metadata(str(out))
