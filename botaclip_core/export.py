"""Export a georeferenced layer of a botaclip Zarr to a Cloud-Optimized GeoTIFF."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
import xarray as xr
from rasterio.windows import Window

from botaclip_core.errors import InputDataError
from botaclip_core.georef import read_grid
from botaclip_core.grid import RegionGrid

logger = logging.getLogger(__name__)

_STRIP_BYTES = 128 * 2**20  # rows read from the Zarr at a time, to bound memory


def _open_store(zarr_path: Path) -> xr.Dataset:
    root = zarr_path / "zarr.json"
    if root.exists():
        consolidated = json.loads(root.read_text()).get("consolidated_metadata") is not None
    elif (zarr_path / ".zgroup").exists():
        consolidated = (zarr_path / ".zmetadata").exists()
    else:
        raise InputDataError(
            f"{zarr_path}: not a Zarr store (no zarr.json nor .zgroup); check the path."
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        return xr.open_zarr(zarr_path, consolidated=consolidated)


def _nodata_for(variable: str, da: xr.DataArray) -> float | None:
    if "nodata" in da.attrs:
        return da.attrs["nodata"]
    if variable == "valid":
        return None
    if np.issubdtype(da.dtype, np.floating):
        return float("nan")
    if variable == "image":
        return 0
    return None


def export_cog(
    zarr_path: Path,
    variable: str,
    out: Path,
    *,
    bands: list[int] | None = None,
    bbox: tuple[float, float, float, float] | None = None,
    crs: str | None = None,
) -> Path:
    """Write one variable of a botaclip Zarr as a COG on the Zarr's grid (or a window of it).

    The variable must be 2-D ``(y, x)`` or 3-D ``(band/feature, y, x)`` on the grid recorded in the
    store (``botaclip:grid``). ``image`` gets nodata 0 (the fill value of uncovered blocks),
    floating-point layers NaN, ``valid`` none; a ``nodata`` attribute on the variable wins.
    The ``embedding`` of an int8 map is written dequantized (float32).

    Args:
        zarr_path: A Zarr written by botaclip (image, embeddings, predictions).
        variable: Name of the data variable, e.g. ``image``, ``valid``, ``embedding``.
        out: Path of the GeoTIFF to write.
        bands: 0-based positions along the first dimension of a 3-D variable to export
            (default: all).
        bbox: ``(minx, miny, maxx, maxy)``: write only the cells this box intersects.
        crs: The box's CRS (default: the store's); the COG stays on the store's grid.

    Returns:
        ``out``.

    Raises:
        InputDataError: If the variable is unknown, has the wrong dimensions or is not on the
            store's grid, if a band position is out of range, or if the box misses the grid.

    """
    zarr_path, out = Path(zarr_path), Path(out)
    ds = _open_store(zarr_path)
    if variable not in ds.data_vars:
        raise InputDataError(
            f"{zarr_path}: no variable {variable!r}; available: {sorted(map(str, ds.data_vars))}."
        )
    grid = read_grid(ds, source=str(zarr_path))
    layer = _layer(ds, variable, zarr_path)
    da = _on_grid(layer, variable, grid, zarr_path, bands=bands)
    if bands is not None:
        da = _pick_bands(da, variable, bands)
    if bbox is not None:
        da, grid = _window(da, grid, bbox, crs)
    if da.dtype == np.bool_:
        da = da.astype(np.uint8)
    profile = _profile(grid, da, _nodata_for(variable, layer))
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_cog(da, grid, profile, out)
    logger.info(
        "exported %s:%s to %s (%d bands, %s)", zarr_path, variable, out, da.shape[0], grid.crs
    )
    return out


def _layer(ds: xr.Dataset, variable: str, zarr_path: Path) -> xr.DataArray:
    """The variable, dequantized when it is an int8 map's embedding."""
    from botaclip_core.embedding_store import EMBEDDING, QUANTIZATION, open_embeddings

    if variable == EMBEDDING and QUANTIZATION in ds.attrs:
        return open_embeddings(zarr_path)
    return ds[variable]


def _window(
    da: xr.DataArray, grid: RegionGrid, bbox: tuple[float, float, float, float], crs: str | None
) -> tuple[xr.DataArray, RegionGrid]:
    """The cells of ``da`` that a box intersects, and the grid of that window."""
    from botaclip_core.query import box_window

    ys, xs = box_window(grid, bbox, crs)
    window = RegionGrid(
        grid.crs,
        grid.resolution,
        grid.left + xs.start * grid.resolution,
        grid.top - ys.start * grid.resolution,
        xs.stop - xs.start,
        ys.stop - ys.start,
    )
    return da[:, ys, xs], window


def _on_grid(
    da: xr.DataArray,
    variable: str,
    grid: RegionGrid,
    zarr_path: Path,
    *,
    bands: list[int] | None,
) -> xr.DataArray:
    """The variable as ``(band, y, x)``, checked to lie on the store's grid."""
    if da.ndim == 2:
        da = da.expand_dims("band")
        if bands is not None and list(bands) != [0]:
            raise InputDataError(
                f"bands: {bands} given for the 2-D variable {variable!r}; omit it."
            )
    elif da.ndim != 3:
        raise InputDataError(
            f"{zarr_path}: variable {variable!r} has dims {da.dims}; "
            "expected (y, x) or (band, y, x)."
        )
    if tuple(da.dims[1:]) != ("y", "x") or da.shape[1:] != grid.shape:
        raise InputDataError(
            f"{zarr_path}: variable {variable!r} has dims {da.dims} shape {da.shape}, not on the "
            f"store's grid (y, x) = {grid.shape}; export a variable of that grid."
        )
    return da


def _pick_bands(da: xr.DataArray, variable: str, bands: list[int]) -> xr.DataArray:
    n_first = da.shape[0]
    bad = [b for b in bands if not 0 <= b < n_first]
    if bad or not bands:
        raise InputDataError(
            f"bands: {bands} for {variable!r} with {n_first} entries along {da.dims[0]!r}; "
            f"give 0-based positions in 0..{n_first - 1}."
        )
    return da.isel({da.dims[0]: list(bands)})


def _profile(grid: RegionGrid, da: xr.DataArray, nodata: float | None) -> dict[str, Any]:
    """Profile of the tiled GeoTIFF written before the COG conversion."""
    return {
        "driver": "GTiff",
        "width": grid.width,
        "height": grid.height,
        "count": da.shape[0],
        "dtype": np.dtype(da.dtype).name,
        "crs": grid.crs_obj,
        "transform": grid.transform,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }


def _strip_rows(grid: RegionGrid, da: xr.DataArray) -> int:
    """Rows per read that fit :data:`_STRIP_BYTES`, whole 512-px blocks where possible."""
    row_bytes = max(1, da.shape[0] * grid.width * np.dtype(da.dtype).itemsize)
    strip = max(1, min(grid.height, _STRIP_BYTES // row_bytes))
    if strip >= 512:
        strip -= strip % 512
    return strip


def _write_cog(da: xr.DataArray, grid: RegionGrid, profile: dict[str, Any], out: Path) -> None:
    """Write ``da`` strip by strip to a temporary GeoTIFF beside ``out``, then convert it."""
    dtype = np.dtype(da.dtype)
    strip = _strip_rows(grid, da)
    descriptions = [str(v) for v in da[da.dims[0]].values] if da.dims[0] in da.coords else []
    fd, tmp_name = tempfile.mkstemp(suffix=".tif", dir=out.parent, prefix=f".{out.name}.")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with rasterio.open(tmp, "w", **profile) as dst:
            for y0 in range(0, grid.height, strip):
                y1 = min(grid.height, y0 + strip)
                block = np.asarray(da[:, y0:y1, :].values, dtype=dtype)
                dst.write(block, window=Window(0, y0, grid.width, y1 - y0))
            for i, name in enumerate(descriptions, start=1):
                dst.set_band_description(i, name)
        _to_cog(tmp, out, dtype)
    finally:
        tmp.unlink(missing_ok=True)


def _to_cog(src: Path, out: Path, dtype: np.dtype) -> None:
    predictor = "3" if np.issubdtype(dtype, np.floating) else "2"
    if _has_driver("COG"):
        rasterio.shutil.copy(
            src,
            out,
            driver="COG",
            COMPRESS="DEFLATE",
            PREDICTOR=predictor,
            BLOCKSIZE=512,
            BIGTIFF="IF_SAFER",
            OVERVIEWS="AUTO",
            RESAMPLING="NEAREST",
        )
        return
    with rasterio.open(src, "r+") as ds:
        factors = [
            2**k for k in range(1, max(1, int(math.log2(max(ds.width, ds.height) / 512)) + 1))
        ]
        if factors:
            ds.build_overviews(factors, rasterio.enums.Resampling.nearest)
    rasterio.shutil.copy(
        src,
        out,
        driver="GTiff",
        tiled=True,
        blockxsize=512,
        blockysize=512,
        compress="deflate",
        predictor=predictor,
        copy_src_overviews=True,
        BIGTIFF="IF_SAFER",
    )


def _has_driver(name: str) -> bool:
    with rasterio.Env() as env:
        return name in env.drivers()
