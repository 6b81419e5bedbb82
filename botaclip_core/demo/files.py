"""Writing the demo's files: orthophoto sheets, truth rasters, vector tables and the README."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import rasterio
from affine import Affine
from rasterio.crs import CRS

from botaclip_core.demo.landscape import Landscape
from botaclip_core.demo.region import (
    BANDS,
    COARSE_PX,
    CRS_CODE,
    ELEV_MIN_M,
    ELEV_RANGE_M,
    GENERATOR_VERSION,
    HABITATS,
    ORIGIN,
    RESOLUTION,
    DemoSize,
    stream_rng,
)
from botaclip_core.demo.sheets import COLLAR_PX, OVERLAP_PX, sheet_span
from botaclip_core.store import atomic_write_text

ACQUISITION = "2021:07:15 10:30:00"  # TIFFTAG_DATETIME of every sheet
_GPKG_DATE = "2021-07-15T10:30:00Z"  # gpkg_contents.last_change

_README = """\
# BotaCLIP demo region (synthetic)

A made-up {extent_m:g} m × {extent_m:g} m Alpine hillside in Lambert-93 (EPSG:2154), written by
`botaclip demo` (`botaclip_core.demo`, generator version {version}, size `{size}`, seed {seed}).
Nothing here is real data; every file is reproducible from the size and the seed.

## Landscape
Elevation rises from about {elev_lo:.0f} m in the west to {elev_hi:.0f} m in the east, with
smooth relief; moisture is a smooth field, higher low down. Five habitats follow them in
patches tens to hundreds of metres wide: deciduous forest (beech, low), coniferous forest
(spruce, mid-slope), grassland (meadows turning to alpine turf), scree (top) and wetland
(fens with alder shrubs and pools, where moisture is high).

## Files
- `ortho/ortho_r*_c*.tif`: {sheets}×{sheets} orthophoto sheets, uint8 R, G, B, NIR, 0.5 m,
  DEFLATE, 256-px tiles, nodata 0. Neighbours overlap by {overlap} px with identical pixels;
  the outer edges carry a nodata collar of {collar_lo}–{collar_hi} px. Tree crowns (bright,
  with shadows to the north), fine grass texture, blocky scree, dark low-NIR water.
- `releves.gpkg` (layer `releves`): {n_releves} plots, one row per plot × species:
  `plot_id`, `species`, `cover` (Braun-Blanquet class midpoint, %), `habitat`, point geometry.
  Species are drawn from the habitats within 10 m of the plot and its elevation.
- `plant_surveys.parquet` (GeoParquet): {n_plant_sites} sites × the 20 species of most
  balanced prevalence, `site_id`, `species`, `present` (0/1). Relevés and surveys lie in
  alternate east–west strips; no survey site is within 50 m of a relevé.
- `butterflies.csv`: {n_butterfly_records} presence-only records of 15 species, `record_id`,
  `species`, `lon`, `lat` (WGS84), drawn in proportion to each species' habitat suitability.
- `soil_fauna.csv`: {n_soil_sites} soil samples × 5 trophic groups (bacterivores, fungivores,
  predators, omnivores, herbivores), `sample_id`, `x`, `y` (EPSG:2154), `trophic_group`,
  `abundance` (negative-binomial counts per 100 g of soil).
- `butterfly_transects.csv`: {n_transect_sites} transects (8 m cells at random) × the 15
  butterflies, `site_id`, `species`, `present` (0/1), `x`, `y` (EPSG:2154): the independent
  presence/absence test set of the presence-only records.
- `covariates/elevation.tif`: a DEM at 8 m (float32, nodata -9999), EPSG:2154.
- `covariates/geology.tif`: four bedrock classes ({geology}; uint8 1–4, nodata 0) in WGS84
  at about 20 m. No species follows the geology: a covariate that does not help.
- `truth/habitat.tif`: the habitat map at 0.5 m (codes 0–4: {habitats}).
- `truth/environment.tif`: elevation (m) and moisture (0–1) at 4 m.
"""


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a hidden temporary path next to ``path`` and rename it onto ``path`` on success.

    For files that a library writes by path (GeoTIFF, GeoPackage, Parquet); text files go
    through :func:`botaclip_core.store.atomic_write_text`.

    Args:
        path: the file to write.

    Yields:
        The temporary path to write to.

    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _transform(row0: int = 0, col0: int = 0, *, pixel: int = 1) -> Affine:
    """Geotransform with the corner at region pixel (row0, col0) and cells of ``pixel`` px."""
    left, top = ORIGIN
    res = RESOLUTION * pixel
    return Affine(res, 0.0, left + col0 * RESOLUTION, 0.0, -res, top - row0 * RESOLUTION)


def write_sheets(data_dir: Path, mosaic: np.ndarray, edges: np.ndarray) -> list[str]:
    """Cut the mosaic into overlapping sheets and write them under ``data_dir/ortho``.

    Sheets of an earlier, larger preset are deleted.

    Args:
        data_dir: the demo data folder.
        mosaic: (4, n, n) uint8 mosaic, nodata already 0.
        edges: sheet edges along each axis, as returned by
            :func:`botaclip_core.demo.sheets.collar`.

    Returns:
        The sheet paths relative to ``data_dir``, row by row.

    """
    ortho_dir = data_dir / "ortho"
    ortho_dir.mkdir(parents=True, exist_ok=True)
    sheets = len(edges) - 1
    files: list[str] = []
    sheet_names = set()
    for i in range(sheets):
        for j in range(sheets):
            r0, r1 = sheet_span(i, edges)
            c0, c1 = sheet_span(j, edges)
            name = f"ortho_r{i}_c{j}.tif"
            sheet_names.add(name)
            _write_sheet(ortho_dir / name, mosaic[:, r0:r1, c0:c1], _transform(r0, c0))
            files.append(f"ortho/{name}")
    for stale in ortho_dir.glob("*.tif"):
        if stale.name not in sheet_names:
            stale.unlink()
    return files


def _write_sheet(path: Path, data: np.ndarray, transform: Affine) -> None:
    """One orthophoto sheet: 4-band uint8, DEFLATE, 256-px internal tiles, nodata 0."""
    profile = {
        "driver": "GTiff",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": "uint8",
        "crs": CRS.from_string(CRS_CODE),
        "transform": transform,
        "nodata": 0,
        "compress": "deflate",
        "predictor": 2,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "interleave": "pixel",
    }
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(data)
            dst.update_tags(TIFFTAG_DATETIME=ACQUISITION, SOURCE="botaclip synthetic demo")
            for b, name in enumerate(BANDS, start=1):
                dst.set_band_description(b, name)


def write_truth(data_dir: Path, land: Landscape) -> list[str]:
    """Write the habitat map (0.5 m) and the environmental fields (4 m) behind every dataset.

    Args:
        data_dir: the demo data folder; the rasters go to its ``truth`` folder.
        land: the landscape.

    Returns:
        The raster paths relative to ``data_dir``.

    """
    folder = data_dir / "truth"
    common = {"driver": "GTiff", "crs": CRS.from_string(CRS_CODE), "compress": "deflate"}
    n = land.habitat.shape[0]
    tiled = {"tiled": True, "blockxsize": 256, "blockysize": 256}
    with atomic_path(folder / "habitat.tif") as tmp:
        with rasterio.open(
            tmp, "w", width=n, height=n, count=1, dtype="uint8", transform=_transform(),
            **common, **tiled,
        ) as dst:  # fmt: skip
            dst.write(land.habitat, 1)
            dst.update_tags(**{f"class_{k}": h for k, h in enumerate(HABITATS)})
            dst.set_band_description(1, "habitat")
    nc = land.elevation_m.shape[0]
    with atomic_path(folder / "environment.tif") as tmp:
        with rasterio.open(
            tmp, "w", width=nc, height=nc, count=2, dtype="float32",
            transform=_transform(pixel=COARSE_PX), **common,
        ) as dst:  # fmt: skip
            dst.write(np.stack([land.elevation_m, land.moisture]).astype(np.float32))
            dst.set_band_description(1, "elevation_m")
            dst.set_band_description(2, "moisture")
    return ["truth/habitat.tif", "truth/environment.tif"]


#: The categorical covariate's classes (bedrock of the demo's geological map).
GEOLOGY = ("limestone", "schist", "granite", "moraine")


def write_covariates(data_dir: Path, land: Landscape, seed: int) -> list[str]:
    """Covariate rasters a user would have: a DEM and a geological map in another CRS.

    ``elevation.tif`` is the terrain at 8 m in the region's CRS (float32, nodata -9999);
    ``geology.tif`` is a map of four bedrock classes (uint8 1–4, nodata 0) that no species
    follows, in WGS84 at about 20 m, as national geological maps come.

    Args:
        data_dir: the demo data folder; the rasters go to its ``covariates`` folder.
        land: the landscape.
        seed: seed of the demo region (the geology's own stream).

    Returns:
        The raster paths relative to ``data_dir``.

    """
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    from botaclip_core.demo.landscape import smooth_noise

    folder = data_dir / "covariates"
    region_crs = CRS.from_string(CRS_CODE)
    nc = land.elevation_m.shape[0]
    elevation = land.elevation_m.reshape(nc // 2, 2, nc // 2, 2).mean(axis=(1, 3))
    with atomic_path(folder / "elevation.tif") as tmp:
        with rasterio.open(
            tmp, "w", driver="GTiff", width=nc // 2, height=nc // 2, count=1, dtype="float32",
            crs=region_crs, transform=_transform(pixel=2 * COARSE_PX), nodata=-9999.0,
            compress="deflate",
        ) as dst:  # fmt: skip
            dst.write(elevation.astype(np.float32), 1)
            dst.set_band_description(1, "elevation_m")
    rng = stream_rng(seed, "geology")
    fields = np.stack([smooth_noise(rng, (nc, nc), 12.0) for _ in GEOLOGY])
    classes = (fields.argmax(axis=0) + 1).astype(np.uint8)
    src_transform = _transform(pixel=COARSE_PX)
    left, top = ORIGIN
    extent = nc * COARSE_PX * RESOLUTION
    wgs84 = CRS.from_epsg(4326)
    transform, width, height = calculate_default_transform(
        region_crs, wgs84, nc, nc, left, top - extent, left + extent, top, resolution=0.0002
    )
    geology = np.zeros((height, width), dtype=np.uint8)
    reproject(
        classes, geology, src_transform=src_transform, src_crs=region_crs,
        dst_transform=transform, dst_crs=wgs84, resampling=Resampling.nearest,
        src_nodata=0, dst_nodata=0,
    )  # fmt: skip
    with atomic_path(folder / "geology.tif") as tmp:
        with rasterio.open(
            tmp, "w", driver="GTiff", width=width, height=height, count=1, dtype="uint8",
            crs=wgs84, transform=transform, nodata=0, compress="deflate",
        ) as dst:  # fmt: skip
            dst.write(geology, 1)
            dst.set_band_description(1, "geology")
            dst.update_tags(**{f"class_{k + 1}": name for k, name in enumerate(GEOLOGY)})
    return ["covariates/elevation.tif", "covariates/geology.tif"]


def write_gpkg(path: Path, frame: gpd.GeoDataFrame, *, layer: str) -> None:
    """GeoPackage with a fixed timestamp, so that the file is byte-identical on every run.

    Args:
        path: the file to write.
        frame: the rows to write.
        layer: name of the layer.

    """
    previous = pyogrio.get_gdal_config_option("OGR_CURRENT_DATE")
    pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": _GPKG_DATE})
    try:
        with atomic_path(path) as tmp:
            frame.to_file(tmp, layer=layer, driver="GPKG", engine="pyogrio")
    finally:
        pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": previous})


def write_geoparquet(path: Path, frame: gpd.GeoDataFrame) -> None:
    """GeoParquet without the frame's index.

    Args:
        path: the file to write.
        frame: the rows to write.

    """
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    """CSV without the frame's index.

    Args:
        path: the file to write.
        frame: the rows to write.

    """
    atomic_write_text(path, frame.to_csv(index=False))


def write_readme(data_dir: Path, *, size: str, seed: int, preset: DemoSize) -> str:
    """Describe the demo data in ``data_dir/README.md``.

    Args:
        data_dir: the demo data folder.
        size: name of the size preset.
        seed: seed of the demo region.
        preset: the size preset.

    Returns:
        The README path relative to ``data_dir``.

    """
    lo, hi = COLLAR_PX
    readme = _README.format(
        extent_m=preset.extent_m,
        version=GENERATOR_VERSION,
        size=size,
        seed=seed,
        elev_lo=ELEV_MIN_M,
        elev_hi=ELEV_MIN_M + ELEV_RANGE_M,
        sheets=preset.sheets,
        overlap=OVERLAP_PX,
        collar_lo=lo,
        collar_hi=hi,
        habitats=", ".join(f"{k} {h}" for k, h in enumerate(HABITATS)),
        geology=", ".join(f"{k + 1} {g}" for k, g in enumerate(GEOLOGY)),
        **{k: v for k, v in asdict(preset).items() if k.startswith("n_")},
    )
    atomic_write_text(data_dir / "README.md", readme)
    return "README.md"
