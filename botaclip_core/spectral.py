"""The ``spectral`` baseline: per-cell band means, standard deviations and NDVI as a feature store.

The store has the layout of an embedding map (same cell grid, chunks and ``stride_px`` /
``tile_size_px`` attributes as the map it is built beside), so :func:`sample_embeddings`,
:class:`EmbeddingStore` and the species models read it like any other feature source. A cell's
features summarise the valid image pixels of its own ``cell_px × cell_px`` block (clipped at
the grid's edge), not the wider window an embedding of a strided map sees: per band the mean
and the population standard deviation, then, when the image has both a NIR and a red band, the
mean NDVI ``(nir - red) / (nir + red)`` (0 for a pixel where ``nir + red`` is 0). A cell
without any valid pixel is NaN in every feature, which is how embedding maps say "not covered".
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr

from botaclip_core.embed import embedding_grid, stored_valid_chunks
from botaclip_core.embedding_store import EmbeddingStore, create_embedding_store
from botaclip_core.errors import InputDataError
from botaclip_core.grid import RegionGrid

logger = logging.getLogger(__name__)

__all__ = ["spectral_features", "spectral_store"]

#: float64 bytes of image pixels summarised at once (a strip of a chunk of cells).
_WORK_BYTES = 64 * 2**20


def spectral_features(bands: Sequence[str], *, ndvi: bool) -> list[str]:
    """Feature names of a spectral store: ``<band>_mean``, ``<band>_sd`` per band, then ``ndvi``."""
    names = [f"{b}_{stat}" for b in bands for stat in ("mean", "sd")]
    return [*names, "ndvi"] if ndvi else names


def spectral_store(
    image_zarr: Path,
    embedding_zarr: Path,
    out: Path,
    *,
    bands: Sequence[str],
    nir: str | None = "nir",
    red: str | None = "red",
) -> Path:
    """Write the spectral features of every cell of ``embedding_zarr``'s grid to ``out``.

    The store is written into a temporary folder beside ``out`` and renamed into place once
    complete, so a killed run leaves no store at ``out`` that looks finished; an existing
    ``out`` is replaced.

    Args:
        image_zarr: the image store written by tiling (``image``, ``valid``, ``bands`` attrs).
        embedding_zarr: an embedding map of that image whose grid, chunking and cell size the
            spectral store copies.
        out: the store's folder.
        bands: image bands to summarise, by name, in feature order.
        nir: name of the near-infrared band (None: no NDVI).
        red: name of the red band (None: no NDVI). NDVI is computed when both name bands of
            the image, whether or not they are among ``bands``.

    Returns:
        ``out``.

    Raises:
        InputDataError: if a band is not in the image, no band is given, or the embedding map
            is not on the image's grid.
    """
    image_zarr, out = Path(image_zarr), Path(out)
    group = zarr.open_group(str(image_zarr), mode="r")
    image: Any = cast(Any, group["image"])
    valid: Any = cast(Any, group["valid"])
    image_attrs: dict[str, Any] = dict(group.attrs)
    image_bands = [str(b) for b in image_attrs.get("bands", [])]
    band_index = _band_positions(image_zarr, image_bands, bands)
    ndvi_bands = None
    if nir is not None and red is not None and nir in image_bands and red in image_bands:
        ndvi_bands = (image_bands.index(nir), image_bands.index(red))
    template = EmbeddingStore(embedding_zarr)
    cell = template.cell_px
    _check_grid(image_zarr, image_attrs, template, cell)
    features = spectral_features(bands, ndvi=ndvi_bands is not None)
    keep = {k: v for k, v in template.attrs.items() if k in ("tile_size_px", "stride_px")}
    attrs = {
        **keep,
        "source": "spectral",
        "features": features,
        "bands": list(bands),
        "ndvi": None if ndvi_bands is None else {"nir": nir, "red": red},
        "image_zarr": str(image_zarr),
        "cell_px": cell,
    }
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        create_embedding_store(
            tmp,
            template.grid,
            len(features),
            chunk=template.chunk,
            attrs=attrs,
            dtype="float32",
            like=embedding_zarr,
        )
        store = EmbeddingStore(tmp, mode="r+")
        stored = set(stored_valid_chunks(image_zarr))
        tile = int(valid.chunks[0])
        n_written = 0
        for ys, xs in store.chunks():
            if not _touches(stored, ys, xs, cell, tile):
                continue  # the fill value (NaN) already says "not covered"
            store.write(
                ys.start,
                xs.start,
                _chunk_features(image, valid, ys, xs, cell, band_index, ndvi_bands),
            )
            n_written += 1
        with warnings.catch_warnings():  # zarr says consolidated metadata is not in the v3 spec
            warnings.filterwarnings("ignore", category=UserWarning)
            zarr.consolidate_metadata(str(tmp))
        _replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    logger.info(
        "spectral: %d features, %d chunks of cells written to %s", len(features), n_written, out
    )
    return out


def _band_positions(image_zarr: Path, image_bands: list[str], bands: Sequence[str]) -> list[int]:
    if not bands:
        raise InputDataError(
            f"spectral bands: none given; name bands of {image_zarr} ({', '.join(image_bands)})."
        )
    missing = [b for b in bands if b not in image_bands]
    if missing:
        raise InputDataError(
            f"spectral bands: {missing} not in {image_zarr}, whose bands are "
            f"{image_bands}; use those names (the catalog's region bands)."
        )
    return [image_bands.index(b) for b in bands]


def _check_grid(
    image_zarr: Path, image_attrs: dict[str, Any], template: EmbeddingStore, cell: int
) -> None:
    try:
        image_grid = RegionGrid.from_dict(image_attrs["botaclip:grid"])
    except KeyError as exc:
        raise InputDataError(
            f"{image_zarr}: no 'botaclip:grid' attribute; this Zarr was not written by botaclip. "
            "Regenerate it with `botaclip run`."
        ) from exc
    expected = embedding_grid(image_grid, cell)
    if template.grid != expected:
        raise InputDataError(
            f"{template.path}: its grid {template.grid} is not the {cell}-px cell grid of "
            f"{image_zarr} ({expected}); give the embedding map computed from that image."
        )


def _touches(stored: set[tuple[int, int]], ys: slice, xs: slice, cell: int, tile: int) -> bool:
    """Whether the pixels of a window of cells overlap a stored chunk of the image."""
    r0, r1 = ys.start * cell // tile, (ys.stop * cell - 1) // tile
    c0, c1 = xs.start * cell // tile, (xs.stop * cell - 1) // tile
    return any((r, c) in stored for r in range(r0, r1 + 1) for c in range(c0, c1 + 1))


def _chunk_features(
    image: Any,
    valid: Any,
    ys: slice,
    xs: slice,
    cell: int,
    band_index: list[int],
    ndvi_bands: tuple[int, int] | None,
) -> np.ndarray:
    """Features ``(D, h, w)`` of a window of cells, read in strips of cell rows."""
    n_read = len(set(band_index) | set(ndvi_bands or ()))
    row_bytes = max(1, 8 * (n_read + 2) * cell * cell * (xs.stop - xs.start))
    step = max(1, _WORK_BYTES // row_bytes)
    parts = [
        _strip_features(
            image, valid, range(y, min(y + step, ys.stop)), xs, cell, band_index, ndvi_bands
        )
        for y in range(ys.start, ys.stop, step)
    ]
    return np.concatenate(parts, axis=1)


def _strip_features(
    image: Any,
    valid: Any,
    rows: range,
    xs: slice,
    cell: int,
    band_index: list[int],
    ndvi_bands: tuple[int, int] | None,
) -> np.ndarray:
    h, w = len(rows), xs.stop - xs.start
    p0, q0 = rows.start * cell, xs.start * cell
    p1, q1 = min(rows.stop * cell, valid.shape[0]), min(xs.stop * cell, valid.shape[1])
    # the window padded to whole cells; pixels past the grid's edge are invalid
    mask = np.zeros((h * cell, w * cell), dtype=bool)
    mask[: p1 - p0, : q1 - q0] = np.asarray(valid[p0:p1, q0:q1]) > 0
    wanted = sorted(set(band_index) | set(ndvi_bands or ()))
    pixels = np.zeros((len(wanted), h * cell, w * cell), dtype=np.float64)
    pixels[:, : p1 - p0, : q1 - q0] = np.asarray(image[:, p0:p1, q0:q1])[
        wanted
    ]  # chunks hold every band
    at = {b: i for i, b in enumerate(wanted)}
    m = mask.reshape(h, cell, w, cell)
    count = m.sum(axis=(1, 3))
    covered = count > 0
    denom = np.where(covered, count, 1)

    def mean(x: np.ndarray) -> np.ndarray:
        return np.where(m, x, 0.0).sum(axis=(1, 3)) / denom

    out = np.full((len(band_index) * 2 + (ndvi_bands is not None), h, w), np.nan, np.float64)
    for k, b in enumerate(band_index):
        x = pixels[at[b]].reshape(h, cell, w, cell)
        mu = mean(x)
        # two passes: sums of squares lose the variance of bright, uniform cells to rounding
        dev = x - mu[:, None, :, None]
        out[2 * k] = mu
        out[2 * k + 1] = np.sqrt(mean(dev * dev))
    if ndvi_bands is not None:
        n = pixels[at[ndvi_bands[0]]]
        r = pixels[at[ndvi_bands[1]]]
        total = n + r
        with np.errstate(invalid="ignore", divide="ignore"):
            ndvi = np.where(total != 0, (n - r) / np.where(total != 0, total, 1.0), 0.0)
        out[-1] = mean(ndvi.reshape(h, cell, w, cell))
    out[:, ~covered] = np.nan
    return out.astype(np.float32)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished store ``tmp`` to ``out``, replacing an older store there."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
