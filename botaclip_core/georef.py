"""Georeferencing of Zarr outputs: CF ``spatial_ref`` for rioxarray and GeoZarr attributes."""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from botaclip_core.errors import InputDataError
from botaclip_core.grid import RegionGrid


def grid_coords(grid: RegionGrid) -> dict[str, Any]:
    """Pixel-centre ``x``/``y`` coordinates and the ``spatial_ref`` variable for a grid."""
    xs, _ = grid.xy(np.zeros(grid.width), np.arange(grid.width))
    _, ys = grid.xy(np.arange(grid.height), np.zeros(grid.height))
    crs = grid.crs_obj
    spatial_ref = xr.DataArray(
        np.int32(0),
        attrs={
            "crs_wkt": crs.to_wkt(),
            "spatial_ref": crs.to_wkt(),
            "GeoTransform": " ".join(str(v) for v in grid.transform.to_gdal()),
        },
    )
    return {
        "x": ("x", xs, {"standard_name": "projection_x_coordinate", "units": "m", "axis": "X"}),
        "y": ("y", ys, {"standard_name": "projection_y_coordinate", "units": "m", "axis": "Y"}),
        "spatial_ref": spatial_ref,
    }


def geozarr_attrs(grid: RegionGrid) -> dict[str, Any]:
    """GeoZarr convention attributes (``proj:`` and ``spatial:``) describing the grid."""
    crs = grid.crs_obj
    epsg = crs.to_epsg()
    attrs: dict[str, Any] = {
        "proj:code": f"EPSG:{epsg}" if epsg else None,
        "proj:wkt2": crs.to_wkt(),
        "spatial:dimensions": ["y", "x"],
        "spatial:transform": list(grid.transform)[:6],
        "spatial:shape": [grid.height, grid.width],
        "spatial:bbox": list(grid.bounds),
        "spatial:registration": "pixel",
        "botaclip:grid": grid.to_dict(),
    }
    return {k: v for k, v in attrs.items() if v is not None}


def georeferenced_dataset(
    grid: RegionGrid, data_vars: dict[str, Any], attrs: dict[str, Any]
) -> xr.Dataset:
    """An ``xarray.Dataset`` on ``grid`` whose variables carry ``grid_mapping``."""
    ds = xr.Dataset(
        data_vars=data_vars, coords=grid_coords(grid), attrs={**attrs, **geozarr_attrs(grid)}
    )
    for name in ds.data_vars:
        if {"y", "x"} <= set(ds[name].dims):
            ds[name].attrs["grid_mapping"] = "spatial_ref"
    return ds


def read_grid(ds: xr.Dataset, *, source: str) -> RegionGrid:
    """Recover the grid a botaclip Zarr was written on.

    Raises:
        InputDataError: if the dataset carries no botaclip grid attributes.
    """
    try:
        return RegionGrid.from_dict(ds.attrs["botaclip:grid"])
    except KeyError as exc:
        raise InputDataError(
            f"{source}: no 'botaclip:grid' attribute; this Zarr was not written by botaclip. "
            "Regenerate it with `botaclip run`."
        ) from exc
