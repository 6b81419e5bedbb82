"""Reading an embedding map: at points and over boxes given in any CRS.

Only the chunks that hold the requested cells are read, so sampling 100,000 survey points of a
département-sized map costs the chunks they touch. Values come back dequantized (float32).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, cast

import geopandas as gpd
import numpy as np
import pandas as pd
import xarray as xr
from pyproj import Transformer

from botaclip_core.embed import read_cells
from botaclip_core.embedding_store import EmbeddingStore, open_embeddings
from botaclip_core.errors import InputDataError
from botaclip_core.grid import RegionGrid, parse_crs

Method = Literal["nearest", "bilinear"]
OK, NODATA, OUTSIDE = "ok", "nodata", "outside"


def _to_store_crs(
    store: EmbeddingStore, xs: np.ndarray, ys: np.ndarray, crs: str | None
) -> tuple[np.ndarray, np.ndarray]:
    if crs is None:
        return xs, ys
    src, dst = parse_crs(crs, field="--crs"), store.grid.crs_obj
    if src == dst:
        return xs, ys
    transformer = Transformer.from_crs(src, dst, always_xy=True)
    tx, ty = transformer.transform(xs, ys)
    return np.asarray(tx, dtype=np.float64), np.asarray(ty, dtype=np.float64)


def sample_points(
    store_path: str | Path,
    xs: Sequence[float] | np.ndarray,
    ys: Sequence[float] | np.ndarray,
    *,
    crs: str | None = None,
    method: Method = "nearest",
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings at points.

    Args:
        store_path: an embedding store (float32, float16 or int8).
        xs: point x (easting or longitude).
        ys: point y (northing or latitude).
        crs: the points' CRS (default: the map's).
        method: ``nearest`` (the cell that holds the point) or ``bilinear`` (between the four
            nearest cell centres, over those that hold an embedding).

    Returns:
        ``(n, D)`` float32 embeddings (NaN unless the status is ``ok``) and ``(n,)`` statuses:
        ``ok``, ``nodata`` (inside the map, nothing embedded there) or ``outside``.

    Raises:
        InputDataError: for an unknown method, a bad CRS or a path that is not a map.
    """
    if method not in ("nearest", "bilinear"):
        raise InputDataError(f"--method: {method!r} is not nearest or bilinear")
    store = EmbeddingStore(store_path)
    grid = store.grid
    px, py = _to_store_crs(store, np.asarray(xs, float), np.asarray(ys, float), crs)
    u = (px - grid.left) / grid.resolution  # continuous column
    v = (grid.top - py) / grid.resolution  # continuous row
    inside = (u >= 0) & (u < grid.width) & (v >= 0) & (v < grid.height)
    if method == "nearest":
        values = _nearest(store, u, v, inside)
    else:
        values = _bilinear(store, u, v, inside)
    status = np.where(~inside, OUTSIDE, np.where(np.isnan(values).any(axis=1), NODATA, OK))
    values[status != OK] = np.nan
    return values, status


def _nearest(store: EmbeddingStore, u: np.ndarray, v: np.ndarray, inside: np.ndarray) -> np.ndarray:
    out = np.full((len(u), store.dim), np.nan, dtype=np.float32)
    if inside.any():
        rows = np.floor(v[inside]).astype(np.int64)
        cols = np.floor(u[inside]).astype(np.int64)
        out[inside] = read_cells(store, rows, cols)
    return out


def _bilinear(
    store: EmbeddingStore, u: np.ndarray, v: np.ndarray, inside: np.ndarray
) -> np.ndarray:
    """Bilinear weights between cell centres, renormalised over neighbours that hold data."""
    out = np.full((len(u), store.dim), np.nan, dtype=np.float32)
    idx = np.flatnonzero(inside)
    if not len(idx):
        return out
    cu, cv = u[idx] - 0.5, v[idx] - 0.5
    j0, i0 = np.floor(cu).astype(np.int64), np.floor(cv).astype(np.int64)
    fu, fv = cu - j0, cv - i0
    corners = ((0, 0, (1 - fv) * (1 - fu)), (0, 1, (1 - fv) * fu),
               (1, 0, fv * (1 - fu)), (1, 1, fv * fu))  # fmt: skip
    rows = np.concatenate([i0 + di for di, _, _ in corners])
    cols = np.concatenate([j0 + dj for _, dj, _ in corners])
    weights = np.concatenate([w for _, _, w in corners])
    ok = (rows >= 0) & (rows < store.height) & (cols >= 0) & (cols < store.width) & (weights > 0)
    vals = np.full((len(rows), store.dim), np.nan, dtype=np.float32)
    vals[ok] = read_cells(store, rows[ok], cols[ok])  # one read of each chunk for all corners
    good = ok & ~np.isnan(vals).any(axis=1)
    w = np.where(good, weights, 0.0).reshape(4, -1)
    total = (w[..., None] * np.nan_to_num(vals).reshape(4, len(idx), store.dim)).sum(axis=0)
    weight = w.sum(axis=0)
    has = weight > 0
    out[idx[has]] = (total[has] / weight[has, None]).astype(np.float32)
    return out


def read_point_table(
    path: str | Path, *, crs: str | None = None, x: str = "x", y: str = "y"
) -> gpd.GeoDataFrame:
    """Points from CSV (columns ``x``/``y`` in ``crs``), GeoPackage/GeoJSON or (Geo)Parquet.

    Raises:
        InputDataError: a missing file, missing columns, a CSV without ``crs``, non-points.
    """
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"{path}: no such points file; give a CSV, GeoPackage or Parquet.")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            frame: pd.DataFrame = gpd.read_parquet(path)
        except ValueError:  # plain Parquet: coordinate columns like a CSV
            frame = pd.read_parquet(path)
    elif suffix == ".csv":
        frame = pd.read_csv(path)
    else:
        frame = gpd.read_file(path)
    if isinstance(frame, gpd.GeoDataFrame) and frame.geometry is not None and len(frame):
        if not frame.geom_type.eq("Point").all():
            kinds = sorted(set(frame.geom_type.dropna()))
            raise InputDataError(f"{path}: geometries are {kinds}; sample needs points.")
        if frame.crs is None and crs is None:
            raise InputDataError(f"{path}: the file has no CRS; pass it with --crs.")
        return frame if frame.crs is not None else frame.set_crs(crs)
    missing = [c for c in (x, y) if c not in frame.columns]
    if missing:
        raise InputDataError(
            f"{path}: coordinate columns {missing} not found (columns: {list(frame.columns)}); "
            "name them with --x and --y."
        )
    if crs is None:
        raise InputDataError(
            f"{path}: a table of coordinates needs their CRS; pass --crs (e.g. EPSG:4326)."
        )
    geometry = gpd.points_from_xy(frame[x], frame[y])
    return gpd.GeoDataFrame(frame, geometry=geometry, crs=parse_crs(crs, field="--crs"))


def sample_table(
    store_path: str | Path, points: gpd.GeoDataFrame, *, method: Method = "nearest"
) -> gpd.GeoDataFrame:
    """The points' table plus ``emb_0`` … ``emb_{D-1}`` and ``status`` columns."""
    xs, ys = points.geometry.x.to_numpy(), points.geometry.y.to_numpy()
    values, status = sample_points(
        store_path, xs, ys, crs=points.crs.to_wkt() if points.crs else None, method=method
    )
    features = pd.DataFrame(
        values, columns=[f"emb_{i}" for i in range(values.shape[1])], index=points.index
    )
    out = pd.concat([points, features], axis=1)
    out["status"] = status
    return gpd.GeoDataFrame(out, geometry=points.geometry.name, crs=points.crs)


def write_table(frame: gpd.GeoDataFrame, out: str | Path, *, keep_geometry: bool) -> Path:
    """``.parquet`` (GeoParquet with a geometry) or ``.csv`` (geometry as WKT).

    Raises:
        InputDataError: for another extension.
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise InputDataError(f"{out}: the output's extension must be .parquet or .csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    table: pd.DataFrame = frame if keep_geometry else pd.DataFrame(frame.drop(columns="geometry"))
    if suffix == ".parquet":
        table.to_parquet(out, index=False)
    else:
        if keep_geometry:
            table = pd.DataFrame(frame).assign(geometry=frame.geometry.to_wkt())
        table.to_csv(out, index=False)
    return out


def sample_file(
    store_path: str | Path,
    points: str | Path,
    out: str | Path,
    *,
    crs: str | None = None,
    x: str = "x",
    y: str = "y",
    method: str = "nearest",
) -> gpd.GeoDataFrame:
    """Read a points file, sample the map at its points and write the table to ``out``.

    The output keeps the input's geometry when the input had one (GeoPackage, GeoJSON,
    GeoParquet), and its coordinate columns otherwise (CSV, plain Parquet).

    Raises:
        InputDataError: as :func:`read_point_table`, :func:`sample_points`, :func:`write_table`.
    """
    table = read_point_table(points, crs=crs, x=x, y=y)
    result = sample_table(store_path, table, method=cast(Method, method))
    write_table(result, out, keep_geometry=not _coordinate_table(points))
    return result


def _coordinate_table(path: str | Path) -> bool:
    """Whether a points file holds coordinates in columns (CSV, Parquet without GeoParquet)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return True
    if path.suffix.lower() != ".parquet":
        return False
    import pyarrow.parquet as pq

    return b"geo" not in (pq.read_schema(path).metadata or {})


def box_window(
    grid: RegionGrid, bbox: tuple[float, float, float, float], crs: str | None
) -> tuple[slice, slice]:
    """Rows and columns of the cells that a box (in ``crs``, default the grid's) intersects.

    Raises:
        InputDataError: if the box is inverted or misses the map.
    """
    from rasterio.warp import transform_bounds

    minx, miny, maxx, maxy = bbox
    if not (minx < maxx and miny < maxy):
        raise InputDataError(f"--bbox: {bbox} is not MINX,MINY,MAXX,MAXY with MIN < MAX")
    if crs is not None and parse_crs(crs, field="--crs") != grid.crs_obj:
        bbox = transform_bounds(parse_crs(crs, field="--crs"), grid.crs_obj, *bbox, densify_pts=21)
    left, bottom, right, top = bbox
    res = grid.resolution
    c0 = max(0, int(np.floor((left - grid.left) / res)))
    c1 = min(grid.width, int(np.ceil((right - grid.left) / res)))
    r0 = max(0, int(np.floor((grid.top - top) / res)))
    r1 = min(grid.height, int(np.ceil((grid.top - bottom) / res)))
    if c1 <= c0 or r1 <= r0:
        raise InputDataError(
            f"--bbox: {tuple(round(v, 3) for v in bbox)} (in the map's CRS {grid.crs}) does not "
            f"intersect the map, whose bounds are {tuple(round(v, 3) for v in grid.bounds)}"
        )
    return slice(r0, r1), slice(c0, c1)


def read_box(
    store_path: str | Path,
    bbox: tuple[float, float, float, float],
    *,
    crs: str | None = None,
) -> xr.DataArray:
    """Float32 ``(feature, y, x)`` embeddings of the cells a box intersects, georeferenced.

    Args:
        store_path: an embedding store.
        bbox: ``(minx, miny, maxx, maxy)``.
        crs: the box's CRS (default: the map's); the result stays on the map's grid.

    Raises:
        InputDataError: if the box misses the map.
    """
    store = EmbeddingStore(store_path)
    ys, xs = box_window(store.grid, bbox, crs)
    return open_embeddings(store_path).isel(y=ys, x=xs)
