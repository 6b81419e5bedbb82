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


def _first_rows(frame: pd.DataFrame, bad: np.ndarray, spec: DatasetSpec) -> str:
    """``first: site_id 'R0001' (data row 3)`` for the first flagged row."""
    first = int(np.flatnonzero(bad)[0])
    site = f"{spec.site_id} {frame[spec.site_id].iloc[first]!r}, " if spec.site_id in frame else ""
    return f"first: {site}data row {first + 1}"


def _check_geometries(frame: gpd.GeoDataFrame, spec: DatasetSpec, *, path: Path, name: str) -> None:
    """Raise for empty, missing or invalid geometries: a site needs a place."""
    geometry = frame.geometry
    missing = (geometry.isna() | geometry.is_empty).to_numpy()
    if missing.any():
        raise InputDataError(
            f"{path}: {int(missing.sum())} rows have empty or missing geometries "
            f"({_first_rows(frame, missing, spec)}), so those sites have no place "
            f"(datasets.{name}). Fix or drop those rows."
        )
    invalid = (~geometry.is_valid).to_numpy()
    if invalid.any():
        raise InputDataError(
            f"{path}: {int(invalid.sum())} rows have invalid geometries (for example "
            f"self-intersecting polygons; {_first_rows(frame, invalid, spec)}) in "
            f"datasets.{name}. Fix them (shapely.make_valid, or QGIS 'Fix geometries') or drop "
            "those rows."
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
    if len(frame) == 0:
        raise InputDataError(
            f"{path}: the table has no rows, so datasets.{name} has no record to use. Point "
            f"datasets.{name}.path{' (and layer)' if spec.layer else ''} to the file holding "
            "the records, or remove the dataset from the region."
        )

    if isinstance(frame, gpd.GeoDataFrame) and frame.geometry is not None and "geometry" in frame:
        _check_geometries(frame, spec, path=path, name=name)
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
    frame = _drop_blank_species(frame, spec, path=path, name=name)
    source = frame
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

    _check_one_place_per_site(long, spec, path=path, name=name)
    sites = long.groupby("site_id", sort=True)[["x", "y"]].first().reset_index()
    rows, cols = grid.rowcol(sites["x"].to_numpy(), sites["y"].to_numpy())
    inside = grid.contains(rows, cols)
    if not inside.any():
        raise InputDataError(
            f"{path}: none of its {len(sites)} sites falls inside the region grid "
            f"(bounds {tuple(round(b, 1) for b in grid.bounds)} in {grid.crs}), so "
            f"datasets.{name} has no usable record. " + _swap_hint(source, spec, grid, name=name)
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


def _drop_blank_species(
    frame: gpd.GeoDataFrame, spec: DatasetSpec, *, path: Path, name: str
) -> gpd.GeoDataFrame:
    """Rows without a species name: an error if every row is blank, else dropped with a warning."""
    column = frame[spec.species]
    blank = (column.isna() | (column.astype(str).str.strip() == "")).to_numpy()
    if blank.all():
        others = [c for c in frame.columns if c not in ("geometry", spec.species)]
        raise InputDataError(
            f"{path}: column {spec.species!r} (datasets.{name}.species) is blank in all "
            f"{len(frame)} rows. Set datasets.{name}.species to the column naming the species "
            f"(the file's other columns: {others}), or fill it in."
        )
    if blank.any():
        logger.warning(
            "%s: %d of %d rows have no species in column %r and are dropped (%s)",
            path,
            int(blank.sum()),
            len(frame),
            spec.species,
            _first_rows(frame, blank, spec),
        )
        frame = frame.loc[~blank]
    return frame


def _check_one_place_per_site(
    long: pd.DataFrame, spec: DatasetSpec, *, path: Path, name: str
) -> None:
    """Raise if one site id is recorded at two places (two sites sharing an id)."""
    spans = long.groupby("site_id", sort=True)[["x", "y"]].agg(["min", "max"])
    spread = np.maximum(
        (spans[("x", "max")] - spans[("x", "min")]).to_numpy(),
        (spans[("y", "max")] - spans[("y", "min")]).to_numpy(),
    )
    # a millimetre in metres, or its equivalent: the same place written twice, not two places
    conflict = spread > 1e-3
    if conflict.any():
        site = spans.index[np.flatnonzero(conflict)[0]]
        rows = long[long["site_id"] == site]
        places = sorted(
            {(round(x, 2), round(y, 2)) for x, y in zip(rows["x"], rows["y"], strict=True)}
        )
        more = int(conflict.sum()) - 1
        raise InputDataError(
            f"{path}: site id {site!r} (datasets.{name}.site_id = {spec.site_id!r}) is recorded "
            f"at {len(places)} different places {places[:3]}"
            + (f" (and {more} more site ids like it)" if more else "")
            + "; one id must name one site. Give each site its own id, or fix the coordinates "
            "of the duplicated rows."
        )


def _swap_hint(source: gpd.GeoDataFrame, spec: DatasetSpec, grid: RegionGrid, *, name: str) -> str:
    """The fix for a dataset with no site in the region: swapped axes if they would put it inside."""
    points = source.geometry
    swapped = gpd.GeoSeries(gpd.points_from_xy(points.y, points.x), crs=source.crs)
    try:
        moved = swapped.to_crs(grid.crs_obj.to_wkt())
        rows, cols = grid.rowcol(moved.x.to_numpy(), moved.y.to_numpy())
        n_inside = int(grid.contains(rows, cols).sum())
    except Exception:  # swapped values may be no valid coordinates at all (latitude > 90)
        n_inside = 0
    if n_inside:
        if spec.path.lower().endswith((".csv", ".parquet")) and {spec.x, spec.y} <= set(
            source.columns
        ):
            fix = (
                f"Swap them: set datasets.{name}.x to {spec.y!r} and datasets.{name}.y to "
                f"{spec.x!r}."
            )
        else:
            fix = "Rewrite the file with x (easting, longitude) first and y second."
        return (
            f"With x and y swapped, {n_inside} of its records would fall inside: the "
            f"coordinates look swapped (lat/lon given as lon/lat). {fix}"
        )
    return f"Check datasets.{name}.crs (now {spec.crs or 'from the file'}) and the coordinates."
