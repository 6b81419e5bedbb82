"""The embedding store: a georeferenced ``(feature, y, x)`` Zarr in float32, float16 or int8.

float32 and float16 stores hold one variable, ``embedding``, NaN where nothing was embedded.
int8 stores follow GeoTessera's per-cell scheme on features centred by the map's mean: with
``m`` the per-feature mean over the map (``offset``, float32, one value per feature), per cell
``s = max|x - m| / 127`` and ``q = round((x - m) / s)``; ``embedding`` holds ``q`` (int8) and
``scale`` (y, x) holds ``s`` (float32, NaN where nothing was embedded), so ``x ≈ q * s + m``
within ``s / 2``. Centring matters for DOFA features: each feature carries a large offset that
is the same everywhere, and a step of ``max|x| / 127`` would be a sizeable part of what varies
between cells. The ``botaclip:quantization`` attribute records the scheme for other tools;
:func:`dequantize` is the one place that undoes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, cast

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from zarr.codecs import ZstdCodec

from botaclip_core.errors import InputDataError
from botaclip_core.georef import georeferenced_dataset, read_grid
from botaclip_core.grid import RegionGrid

EMBEDDING = "embedding"
SCALE = "scale"
OFFSET = "offset"
QUANTIZATION = "botaclip:quantization"
StoreDtype = Literal["float32", "float16", "int8"]
STORE_DTYPES: tuple[str, ...] = ("float32", "float16", "int8")
INT8_MAX = 127

INT8_SCHEME = {
    "scheme": "int8-maxabs-per-cell-centred",
    "values": EMBEDDING,
    "scale": SCALE,
    "offset": OFFSET,
    "decode": "x = float32(embedding) * scale[y, x] + offset[feature]; NaN where scale is NaN",
    "encode": "scale = max(abs(x - offset)) / 127 over a cell's features; "
    "embedding = round((x - offset) / scale)",
}


def create_embedding_store(
    out: Path,
    grid: RegionGrid,
    dim: int,
    *,
    chunk: int,
    attrs: dict[str, Any],
    dtype: str = "float32",
    offset: np.ndarray | None = None,
    like: str | Path | None = None,
) -> None:
    """Write the metadata of an empty embedding store on ``grid`` (nothing embedded yet).

    Args:
        out: the store's folder.
        grid: the embedding grid (one cell per embedding).
        dim: number of features.
        chunk: cells per chunk side.
        attrs: attributes of the store (provenance: source, model, keys).
        dtype: ``float32``, ``float16`` or ``int8`` (with a float32 ``scale`` plane).
        offset: int8 only: the per-feature centre ``m`` (default zeros: plain GeoTessera).
        like: a botaclip Zarr on the same CRS (the image store, a source map) whose CRS
            description is copied rather than derived again, so that no CRS library (rasterio,
            PROJ) is needed: what a GPU machine without GDAL relies on.

    Raises:
        InputDataError: for another dtype.
    """
    check_dtype(dtype)
    chunks3 = (dim, chunk, chunk)
    data_vars: dict[str, Any] = {}
    encoding: dict[str, dict[str, Any]] = {}
    zstd = [ZstdCodec(level=3)]
    if dtype == "int8":
        values = da.zeros((dim, grid.height, grid.width), dtype=np.int8, chunks=chunks3)
        scale = da.full((grid.height, grid.width), np.nan, dtype=np.float32, chunks=(chunk, chunk))
        data_vars[EMBEDDING] = (("feature", "y", "x"), values, {"long_name": "embedding (int8)"})
        data_vars[SCALE] = (("y", "x"), scale, {"long_name": "int8 dequantization scale"})
        centre = np.zeros(dim, np.float32) if offset is None else np.asarray(offset, np.float32)
        data_vars[OFFSET] = (("feature",), centre, {"long_name": "int8 dequantization offset"})
        encoding[EMBEDDING] = {"chunks": chunks3, "compressors": zstd, "_FillValue": 0}
        encoding[SCALE] = {"chunks": (chunk, chunk), "compressors": zstd, "_FillValue": np.nan}
        attrs = {**attrs, QUANTIZATION: INT8_SCHEME}
    else:
        values = da.full((dim, grid.height, grid.width), np.nan, dtype=dtype, chunks=chunks3)
        data_vars[EMBEDDING] = (("feature", "y", "x"), values, {"long_name": "embedding"})
        encoding[EMBEDDING] = {"chunks": chunks3, "compressors": zstd, "_FillValue": np.nan}
    store_attrs = {**attrs, "embedding_dtype": dtype}
    ds = _georeferenced_like(Path(like), grid, data_vars, store_attrs) if like else None
    if ds is None:
        ds = georeferenced_dataset(grid, data_vars, store_attrs)
    ds = ds.assign_coords(feature=np.arange(dim, dtype=np.int32))
    ds.to_zarr(out, mode="w", compute=False, zarr_format=3, encoding=encoding, consolidated=False)


def _georeferenced_like(
    like: Path, grid: RegionGrid, data_vars: dict[str, Any], attrs: dict[str, Any]
) -> xr.Dataset | None:
    """:func:`georeferenced_dataset` with the CRS description of ``like`` (None: not usable).

    The coordinates, GeoTransform and ``spatial:`` attributes are computed for ``grid``; the
    CRS WKT and code are copied from ``like``, which must be on the same CRS.
    """
    try:
        group = zarr.open_group(str(like), mode="r")
        source: dict[str, Any] = dict(group.attrs)
        ref = dict(cast(Any, group["spatial_ref"]).attrs)
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
        return None
    if source.get("botaclip:grid", {}).get("crs") != grid.crs or "crs_wkt" not in ref:
        return None
    res, left, top = grid.resolution, grid.left, grid.top
    xs = left + (np.arange(grid.width) + 0.5) * res
    ys = top - (np.arange(grid.height) + 0.5) * res
    spatial_ref = xr.DataArray(
        np.int32(0),
        attrs={
            "crs_wkt": ref["crs_wkt"],
            "spatial_ref": ref.get("spatial_ref", ref["crs_wkt"]),
            "GeoTransform": " ".join(str(v) for v in (left, res, 0.0, top, 0.0, -res)),
        },
    )
    coords = {
        "x": ("x", xs, {"standard_name": "projection_x_coordinate", "units": "m", "axis": "X"}),
        "y": ("y", ys, {"standard_name": "projection_y_coordinate", "units": "m", "axis": "Y"}),
        "spatial_ref": spatial_ref,
    }
    geo: dict[str, Any] = {
        "proj:code": source.get("proj:code"),
        "proj:wkt2": source.get("proj:wkt2", ref["crs_wkt"]),
        "spatial:dimensions": ["y", "x"],
        "spatial:transform": [res, 0.0, left, 0.0, -res, top],
        "spatial:shape": [grid.height, grid.width],
        "spatial:bbox": list(grid.bounds),
        "spatial:registration": "pixel",
        "botaclip:grid": grid.to_dict(),
    }
    geo = {k: v for k, v in geo.items() if v is not None}
    ds = xr.Dataset(data_vars=data_vars, coords=coords, attrs={**attrs, **geo})
    for name in ds.data_vars:
        if {"y", "x"} <= set(ds[name].dims):
            ds[name].attrs["grid_mapping"] = "spatial_ref"
    return ds


def check_dtype(dtype: str) -> None:
    """Raise unless ``dtype`` is a storage type of embedding stores.

    Raises:
        InputDataError: naming the allowed types.
    """
    if dtype not in STORE_DTYPES:
        raise InputDataError(
            f"embed.dtype: {dtype!r} is not a storage type of embedding maps; "
            f"use one of {', '.join(STORE_DTYPES)}"
        )


def quantize_int8(
    values: np.ndarray, offset: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(D, ...)`` float → int8 values and the per-cell scale (NaN cells: 0 and NaN)."""
    values = np.asarray(values, dtype=np.float32)
    if offset is not None:
        centre = np.asarray(offset, np.float32)
        values = values - centre.reshape(-1, *([1] * (values.ndim - 1)))
    with np.errstate(invalid="ignore"):
        peak = np.max(np.abs(values), axis=0)
    scale = (peak / INT8_MAX).astype(np.float32)
    safe = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    q = np.rint(np.nan_to_num(values, nan=0.0) / safe)
    return np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8), scale


def dequantize(
    values: np.ndarray, scale: np.ndarray | None, offset: np.ndarray | None = None
) -> np.ndarray:
    """Stored ``(D, h, w)`` values → float32: ``values * scale + offset`` for int8, else a cast."""
    if scale is None:
        return np.asarray(values, dtype=np.float32)
    out = np.asarray(values, dtype=np.float32) * np.asarray(scale, dtype=np.float32)[None]
    if offset is not None:
        out += np.asarray(offset, dtype=np.float32)[:, None, None]
    return out


class EmbeddingStore:
    """Read and write blocks of cells of an embedding store, whatever its dtype.

    Args:
        path: the store's folder.
        mode: ``r`` to read, ``r+`` to write blocks.

    Raises:
        InputDataError: if ``path`` is not an embedding store.
    """

    def __init__(self, path: str | Path, mode: Literal["r", "r+"] = "r") -> None:
        self.path = Path(path)
        try:
            group = zarr.open_group(str(self.path), mode=mode)
            self.values: Any = cast(Any, group[EMBEDDING])
        except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError) as exc:
            raise InputDataError(
                f"{self.path}: not a botaclip embedding store (no '{EMBEDDING}' array); "
                "give a dofa.zarr, botaclip.zarr or botasp.zarr written by `botaclip run`."
            ) from exc
        self.attrs: dict[str, Any] = dict(group.attrs)
        quantized = bool(self.attrs.get(QUANTIZATION))
        self.scale: Any = cast(Any, group[SCALE]) if quantized else None
        self.offset: np.ndarray | None = None
        if quantized and OFFSET in group:
            self.offset = np.asarray(cast(Any, group[OFFSET])[:], dtype=np.float32)
        self.dtype: str = str(self.attrs.get("embedding_dtype", self.values.dtype))
        self.dim: int
        self.height: int
        self.width: int
        self.dim, self.height, self.width = (int(n) for n in self.values.shape)
        self.chunk = int(self.values.chunks[1])

    @property
    def grid(self) -> RegionGrid:
        """The embedding grid."""
        return RegionGrid.from_dict(self.attrs["botaclip:grid"])

    @property
    def cell_px(self) -> int:
        """Image pixels per cell side (the stride, or the tile size for unstrided maps)."""
        return int(self.attrs.get("stride_px") or self.attrs["tile_size_px"])

    def read(self, ys: slice, xs: slice) -> np.ndarray:
        """Float32 embeddings ``(D, h, w)`` of a window of cells (NaN: nothing embedded)."""
        values = np.asarray(self.values[:, ys, xs])
        scale = None if self.scale is None else np.asarray(self.scale[ys, xs])
        return dequantize(values, scale, self.offset)

    def covered(self, ys: slice, xs: slice) -> np.ndarray:
        """Boolean ``(h, w)``: cells of the window that hold an embedding."""
        if self.scale is not None:
            return ~np.isnan(np.asarray(self.scale[ys, xs]))
        return ~np.isnan(np.asarray(self.values[0, ys, xs]))

    def write(self, y0: int, x0: int, block: np.ndarray) -> None:
        """Store float32 embeddings ``(D, h, w)`` at cell (y0, x0), encoded to the store's dtype."""
        ys, xs = slice(y0, y0 + block.shape[1]), slice(x0, x0 + block.shape[2])
        if self.scale is None:
            self.values[:, ys, xs] = block.astype(self.values.dtype)
            return
        q, scale = quantize_int8(block, self.offset)
        self.values[:, ys, xs] = q
        self.scale[ys, xs] = scale

    def chunks(self) -> list[tuple[slice, slice]]:
        """Every chunk window of the grid, row by row."""
        c = self.chunk
        return [
            (slice(y, min(y + c, self.height)), slice(x, min(x + c, self.width)))
            for y in range(0, self.height, c)
            for x in range(0, self.width, c)
        ]


def open_embeddings(path: str | Path) -> xr.DataArray:
    """An embedding store as a lazy float32 ``(feature, y, x)`` DataArray (dequantized).

    The result carries the store's coordinates and CRS (``.rio.crs``, ``.rio.transform()``).

    Raises:
        InputDataError: if ``path`` is not an embedding store.
    """
    path = Path(path)
    EmbeddingStore(path)  # a clear error for anything else
    ds = xr.open_zarr(path, consolidated=False, mask_and_scale=False)
    read_grid(ds, source=str(path))
    values = ds[EMBEDDING]
    if QUANTIZATION in ds.attrs:
        out = values.astype(np.float32) * ds[SCALE].astype(np.float32)
        if OFFSET in ds:
            out = out + ds[OFFSET].astype(np.float32)
        out = out.transpose("feature", "y", "x")
    else:
        out = values.astype(np.float32)
    out.attrs = {"grid_mapping": "spatial_ref", "long_name": "embedding"}
    out.name = EMBEDDING
    return out.assign_coords(spatial_ref=ds["spatial_ref"])
