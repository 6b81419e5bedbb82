"""Relevés and other site datasets: read any vector format, place sites on the region grid."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd

from botaclip_core.catalog import DatasetSpec
from botaclip_core.errors import CRSMismatchError, InputDataError
from botaclip_core.grid import RegionGrid, parse_crs

logger = logging.getLogger(__name__)

VECTOR_SUFFIXES = {".gpkg", ".geojson", ".json", ".shp", ".fgb"}


@dataclass
class SiteTable:
    """Sites of one dataset on the grid, with a site × species value matrix.

    Attributes:
        sites: one row per site: ``site_id``, ``x``, ``y`` (grid CRS), ``row``, ``col`` (pixel).
        species: the vocabulary, sorted.
        values: ``(n_sites, n_species)`` float32: cover, count, 0/1 presence.
    """

    sites: pd.DataFrame
    species: list[str]
    values: np.ndarray

    def save(self, folder: Path, name: str) -> dict[str, str]:
        """Write ``<name>_sites.parquet``, ``<name>_values.npy`` and ``<name>_species.json``."""
        paths = {
            "sites": folder / f"{name}_sites.parquet",
            "values": folder / f"{name}_values.npy",
            "species": folder / f"{name}_species.json",
        }
        self.sites.to_parquet(paths["sites"], index=False)
        np.save(paths["values"], self.values)
        paths["species"].write_text(json.dumps(self.species, indent=1))
        return {k: str(v) for k, v in paths.items()}

    @classmethod
    def load(cls, folder: Path, name: str) -> SiteTable:
        """Inverse of :meth:`save`."""
        sites = pd.read_parquet(folder / f"{name}_sites.parquet")
        values = np.load(folder / f"{name}_values.npy")
        species = json.loads((folder / f"{name}_species.json").read_text())
        return cls(sites, species, values)


def _require_columns(
    frame: pd.DataFrame, columns: dict[str, str], *, source: str, name: str
) -> None:
    for field_name, column in columns.items():
        if column not in frame.columns:
            available = [c for c in frame.columns if c != "geometry"]
            raise InputDataError(
                f"{source}: column {column!r} (datasets.{name}.{field_name}) not found; "
                f"the file has columns {available}. Set datasets.{name}.{field_name} to one of them."
            )


def read_points(spec: DatasetSpec, path: Path, *, name: str) -> gpd.GeoDataFrame:
    """Read a site dataset as points with a CRS, whatever its format.

    Raises:
        InputDataError: unreadable file, missing columns, non-point geometries.
        CRSMismatchError: no CRS in the file and none in the catalog.
    """
    if not path.is_file():
        raise InputDataError(
            f"datasets.{name}.path: {path} does not exist. Fix the path in the catalog."
        )
    suffix = path.suffix.lower()
    try:
        if suffix in VECTOR_SUFFIXES:
            frame: pd.DataFrame = (
                gpd.read_file(path, layer=spec.layer) if spec.layer else gpd.read_file(path)
            )
        elif suffix == ".parquet":
            try:
                frame = gpd.read_parquet(path)
            except (ValueError, KeyError):  # a plain Parquet table without geo metadata
                frame = pd.read_parquet(path)
        elif suffix == ".csv":
            frame = pd.read_csv(path)
        else:
            raise InputDataError(
                f"datasets.{name}.path: {path} has suffix {suffix!r}; supported: "
                f"{sorted(VECTOR_SUFFIXES | {'.parquet', '.csv'})}"
            )
    except InputDataError:
        raise
    except Exception as exc:
        raise InputDataError(f"{path}: cannot be read as a {suffix} table ({exc})") from exc

    if isinstance(frame, gpd.GeoDataFrame) and frame.geometry is not None and "geometry" in frame:
        if frame.crs is None and spec.crs is None:
            raise CRSMismatchError(
                f'{path}: the file has no CRS. Set datasets.{name}.crs (e.g. "EPSG:2154").'
            )
        if frame.crs is None:
            frame = frame.set_crs(parse_crs(spec.crs or "", field=f"datasets.{name}.crs").to_wkt())
        kinds = set(frame.geometry.geom_type.dropna())
        if kinds - {"Point"}:
            frame = frame.copy()
            frame["geometry"] = frame.geometry.representative_point()
            logger.info("%s: %s geometries reduced to representative points", path, sorted(kinds))
        return frame
    _require_columns(frame, {"x": spec.x, "y": spec.y}, source=str(path), name=name)
    if spec.crs is None:
        raise CRSMismatchError(
            f'{path}: a table of coordinates needs datasets.{name}.crs (e.g. "EPSG:4326" for lon/lat).'
        )
    crs = parse_crs(spec.crs, field=f"datasets.{name}.crs")
    xs = pd.to_numeric(frame[spec.x], errors="coerce")
    ys = pd.to_numeric(frame[spec.y], errors="coerce")
    bad = xs.isna() | ys.isna()
    if bad.any():
        first = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputDataError(
            f"{path}: {int(bad.sum())} rows have missing or non-numeric coordinates in columns "
            f"{spec.x!r}/{spec.y!r} (first at data row {first + 1}). Fix or drop those rows."
        )
    return gpd.GeoDataFrame(frame, geometry=gpd.points_from_xy(xs, ys), crs=crs.to_wkt())


def sites_on_grid(spec: DatasetSpec, path: Path, grid: RegionGrid, *, name: str) -> SiteTable:
    """Read a long-format site dataset and place its sites on ``grid``.

    Rows are site × species; ``value`` (cover, count, 0/1) fills the matrix, or 1 when the catalog
    gives no value column. Sites outside the grid are dropped with a warning.

    Raises:
        InputDataError: if columns are missing or no site falls inside the region.
    """
    frame = read_points(spec, path, name=name)
    columns = {"site_id": spec.site_id, "species": spec.species}
    if spec.value:
        columns["value"] = spec.value
    _require_columns(frame, columns, source=str(path), name=name)
    frame = frame.to_crs(grid.crs_obj.to_wkt())

    long = pd.DataFrame(
        {
            "site_id": frame[spec.site_id].astype(str).to_numpy(),
            "species": frame[spec.species].astype(str).to_numpy(),
            "x": frame.geometry.x.to_numpy(),
            "y": frame.geometry.y.to_numpy(),
        }
    )
    if spec.value:
        values = pd.to_numeric(frame[spec.value], errors="coerce")
        if values.isna().any() or (values < 0).any():
            raise InputDataError(
                f"{path}: column {spec.value!r} (datasets.{name}.value) must hold numbers ≥ 0; "
                f"found {frame[spec.value][values.isna() | (values < 0)].iloc[0]!r}."
            )
        long["value"] = values.to_numpy(dtype=float)
    else:
        long["value"] = 1.0

    sites = long.groupby("site_id", sort=True)[["x", "y"]].first().reset_index()
    rows, cols = grid.rowcol(sites["x"].to_numpy(), sites["y"].to_numpy())
    inside = grid.contains(rows, cols)
    if not inside.any():
        raise InputDataError(
            f"{path}: none of its {len(sites)} sites falls inside the region grid "
            f"(bounds {tuple(round(b, 1) for b in grid.bounds)} in {grid.crs}). "
            f"Check datasets.{name}.crs and the coordinate columns."
        )
    if not inside.all():
        logger.warning(
            "%s: %d of %d sites lie outside the region and are dropped",
            path,
            (~inside).sum(),
            len(sites),
        )
    sites = sites.loc[inside].reset_index(drop=True)
    sites["row"], sites["col"] = rows[inside], cols[inside]

    species = sorted(long["species"].unique())
    wide = long.pivot_table(
        index="site_id", columns="species", values="value", aggfunc="max", fill_value=0.0
    )
    wide = wide.reindex(index=sites["site_id"], columns=species, fill_value=0.0)
    return SiteTable(sites, species, wide.to_numpy(dtype=np.float32))
