"""Prediction maps: species models applied to every cell of a feature store, as one COG."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling
from rasterio.windows import Window

from botaclip_core.embedding_store import EmbeddingStore
from botaclip_core.errors import InputDataError

logger = logging.getLogger(__name__)

__all__ = ["predict_map"]

#: Tile side of the COG (small maps still get tiles and an overview).
COG_BLOCK = 256


def predict_map(
    store: Path,
    predictors: Mapping[str, Callable[[np.ndarray], np.ndarray]],
    out: Path,
    *,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    block_cells: int = 256,
    extra: Callable[[int, int, int, int], np.ndarray] | None = None,
    tags: Mapping[str, str] | None = None,
) -> Path:
    """Write a COG of every species' prediction on the cell grid of a feature store.

    The store (an embedding map or a spectral store) is read dequantized, ``block_cells ×
    block_cells`` cells at a time. A cell is predicted when all its features are finite
    (including ``extra``'s): its row of features goes through ``transform``, then through each
    predictor. The COG has one float32 band per species, in ``predictors``' order, each
    described with its species name; NaN (the nodata value) where a cell is not predicted.
    It is written to a temporary file beside ``out`` and moved into place when complete.

    Args:
        store: the feature store.
        predictors: species name → function of ``(n, D')`` rows returning ``n`` scores
            (a probability or an abundance).
        out: the GeoTIFF to write.
        transform: applied to the ``(n, D)`` rows before the predictors (e.g. a fitted
            projector's ``transform``); None: the stored features as they are.
        block_cells: cells per block side.
        extra: more features for a block, ``(y0, x0, h, w)`` → ``(E, h, w)`` float, appended
            after the store's (e.g. covariate rasters resampled to the cell grid).
        tags: metadata written into the file (e.g. the model and feature source).

    Returns:
        ``out``.

    Raises:
        InputDataError: for no predictor, a block size below 1, or a predictor or ``extra``
            whose output has the wrong shape.
    """
    store, out = Path(store), Path(out)
    if not predictors:
        raise InputDataError(f"{out}: no species to map; give at least one predictor.")
    if block_cells < 1:
        raise InputDataError(f"block_cells: {block_cells} must be a positive number of cells.")
    src = EmbeddingStore(store)
    grid = src.grid
    names = list(predictors)
    profile = {
        "driver": "GTiff",
        "width": grid.width,
        "height": grid.height,
        "count": len(names),
        "dtype": "float32",
        "crs": grid.crs_obj,
        "transform": grid.transform,
        "nodata": float("nan"),
        "tiled": True,
        "blockxsize": COG_BLOCK,
        "blockysize": COG_BLOCK,
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(suffix=".tif", dir=out.parent, prefix=f".{out.name}.")
    os.close(fd)
    tmp = Path(tmp_name)
    fd, part_name = tempfile.mkstemp(suffix=".tif", dir=out.parent, prefix=f".{out.name}.cog.")
    os.close(fd)
    part = Path(part_name)
    n_cells = 0
    try:
        with rasterio.open(tmp, "w", **profile) as dst:
            for i, name in enumerate(names, start=1):
                dst.set_band_description(i, name)
            if tags:
                dst.update_tags(**tags)
            for y0 in range(0, grid.height, block_cells):
                for x0 in range(0, grid.width, block_cells):
                    h = min(block_cells, grid.height - y0)
                    w = min(block_cells, grid.width - x0)
                    block, n = _predict_block(src, y0, x0, h, w, predictors, transform, extra)
                    dst.write(block, window=Window(x0, y0, w, h))
                    n_cells += n
            _build_overviews(dst)
        _to_cog(tmp, part)
        os.replace(part, out)
    finally:
        tmp.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
    logger.info("mapped %d species over %d cells of %s to %s", len(names), n_cells, store, out)
    return out


def _predict_block(
    src: EmbeddingStore,
    y0: int,
    x0: int,
    h: int,
    w: int,
    predictors: Mapping[str, Callable[[np.ndarray], np.ndarray]],
    transform: Callable[[np.ndarray], np.ndarray] | None,
    extra: Callable[[int, int, int, int], np.ndarray] | None,
) -> tuple[np.ndarray, int]:
    """Scores ``(S, h, w)`` of a block of cells (NaN where not predicted), and how many cells."""
    result = np.full((len(predictors), h, w), np.nan, dtype=np.float32)
    ys, xs = slice(y0, y0 + h), slice(x0, x0 + w)
    if not src.covered(ys, xs).any():
        return result, 0
    feats = src.read(ys, xs)
    if extra is not None:
        more = np.asarray(extra(y0, x0, h, w), dtype=np.float32)
        if more.ndim != 3 or more.shape[1:] != (h, w):
            raise InputDataError(
                f"extra features of cells ({y0}, {x0}) + ({h}, {w}): shape {more.shape}, "
                f"expected (E, {h}, {w}); return one plane per extra feature."
            )
        feats = np.concatenate([feats, more], axis=0)
    flat = feats.reshape(feats.shape[0], -1).T
    ok = np.isfinite(flat).all(axis=1)
    n = int(ok.sum())
    if not n:
        return result, 0
    rows = flat[ok] if transform is None else np.asarray(transform(flat[ok]))
    for k, (name, predict) in enumerate(predictors.items()):
        scores = np.asarray(predict(rows), dtype=np.float32)
        if scores.shape not in ((n,), (n, 1)):
            raise InputDataError(
                f"predictor of {name!r}: returned shape {scores.shape} for {n} rows; it must "
                "return one score per row (e.g. predict_proba(x)[:, 1])."
            )
        plane = result[k].reshape(-1)
        plane[ok] = scores.reshape(-1)
    return result, n


def _overview_factors(width: int, height: int) -> list[int]:
    """Powers of two down to one COG tile (at least one level, so every map has overviews)."""
    factors = [2]
    while max(width, height) / factors[-1] > COG_BLOCK:
        factors.append(factors[-1] * 2)
    return factors


def _build_overviews(dst: rasterio.io.DatasetWriter) -> None:
    # averages of probabilities are what a zoomed-out map should show; nodata cells are skipped
    dst.build_overviews(_overview_factors(dst.width, dst.height), Resampling.average)
    dst.update_tags(ns="rio_overview", resampling="average")


def _to_cog(src: Path, out: Path) -> None:
    """Copy the tiled GeoTIFF ``src`` (with its overviews) to the COG ``out``."""
    options = {"COMPRESS": "DEFLATE", "PREDICTOR": "3", "BIGTIFF": "IF_SAFER"}
    if _has_driver("COG"):
        rasterio.shutil.copy(
            src,
            out,
            driver="COG",
            BLOCKSIZE=COG_BLOCK,
            OVERVIEWS="FORCE_USE_EXISTING",
            **options,
        )
        return
    rasterio.shutil.copy(
        src,
        out,
        driver="GTiff",
        TILED="YES",
        BLOCKXSIZE=COG_BLOCK,
        BLOCKYSIZE=COG_BLOCK,
        COPY_SRC_OVERVIEWS="YES",
        **options,
    )


def _has_driver(name: str) -> bool:
    with rasterio.Env() as env:
        return name in env.drivers()
