"""A synthetic Alpine demo region (orthophotos, relevés, downstream data) for ``botaclip demo``."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import rasterio
import yaml
from affine import Affine
from pyproj import Transformer
from rasterio.crs import CRS
from scipy import ndimage
from shapely import points

from botaclip_core.catalog import parse_catalog
from botaclip_core.errors import CatalogError, StageError

logger = logging.getLogger(__name__)

#: Bumped whenever the generated data change; part of ``_SUCCESS.json``.
GENERATOR_VERSION = "1"


@dataclass(frozen=True)
class DemoSize:
    """Size preset of the demo region.

    Attributes:
        tiles: the region is ``tiles`` × ``tiles`` model tiles of 224 px at 0.5 m.
        sheets: orthophoto sheets per side (``sheets`` × ``sheets`` GeoTIFFs, overlapping a little).
        n_releves: relevé plots (training data of the contrastive model).
        n_plant_sites: plant presence/absence survey sites.
        n_butterfly_records: butterfly presence-only records.
        n_soil_sites: soil samples, each with the abundance of five trophic groups.

    """

    tiles: int
    sheets: int
    n_releves: int
    n_plant_sites: int
    n_butterfly_records: int
    n_soil_sites: int


DEMO_SIZES: dict[str, DemoSize] = {
    "default": DemoSize(12, 3, 240, 200, 300, 80),
    "tiny": DemoSize(2, 2, 60, 60, 80, 30),
}

CRS_CODE = "EPSG:2154"
RESOLUTION = 0.5
TILE_PX = 224
# upper-left corner in Lambert-93 (Belledonne, Isère), on the 112 m lattice of 224-px tiles
ORIGIN = (915040.0, 6458032.0)
BANDS = ("red", "green", "blue", "nir")
WAVELENGTHS_UM = (0.665, 0.56, 0.49, 0.842)
ACQUISITION = "2021:07:15 10:30:00"  # TIFFTAG_DATETIME of every sheet
_GPKG_DATE = "2021-07-15T10:30:00Z"  # gpkg_contents.last_change

HABITATS = ("coniferous forest", "deciduous forest", "grassland", "scree", "wetland")
CONIF, DECID, GRASS, SCREE, WET = range(5)
ELEV_MIN_M, ELEV_RANGE_M = 1200.0, 1100.0

_COARSE = 8  # px per cell of the smooth environmental fields (4 m)
_OVERLAP_PX = 20  # overlap of neighbouring sheets
_COLLAR_PX = (10, 30)  # nodata collar width on the outer sheet edges (inclusive range)
_PLOT_RADIUS_PX = 20  # a relevé's habitat is read in ±10 m
_STAND_PURITY = 0.75  # share of one habitat around a relevé plot
_MIN_SITE_DISTANCE_M = 55.0  # plant surveys vs relevés; the contract promises ≥ 50 m

# Ground colour (R, G, B, NIR digital numbers) of each land-cover class; index 5 is open water.
_GROUND_DN = np.array(
    [
        [38, 48, 38, 70],  # needle litter and moss under conifers
        [58, 72, 46, 125],  # beech-wood floor
        [104, 128, 78, 178],  # meadow (shifted towards brown turf with elevation)
        [168, 164, 154, 160],  # limestone scree: bright in the visible, flat NIR
        [108, 114, 80, 118],  # sedge fen: olive-brown, moderate NIR
        [34, 48, 56, 14],  # open water in the fen
    ],
    dtype=np.float32,
)
_ALPINE_TURF_SHIFT = np.array([22, 8, 12, -40], dtype=np.float32)  # meadow → high turf
# Crown colours: spruce / larch, beech / maple, green alder / willow shrubs.
_CROWN_DN = np.array(
    [[50, 78, 56, 165], [62, 100, 50, 215], [66, 94, 54, 180]],
    dtype=np.float32,
)
# Ground texture amplitudes per habitat (fine speckle, 4 m mottling, 1.5 m blocks of rock).
_FINE_AMP = np.array([0.10, 0.09, 0.06, 0.06, 0.05, 0.03], dtype=np.float32)
_MOTTLE_AMP = np.array([0.06, 0.06, 0.08, 0.07, 0.12, 0.04], dtype=np.float32)
_BLOCK_AMP = np.array([0.0, 0.0, 0.0, 0.20, 0.0, 0.0], dtype=np.float32)
# Trees on jittered grids of (conifer, broadleaf, shrub) cells: probability of a tree per cell.
_TREE_CELL_PX = (10, 16, 8)
_TREE_PROB = np.array(
    [
        [0.8, 0.03, 0.0],  # coniferous forest
        [0.08, 0.8, 0.02],  # deciduous forest
        [0.01, 0.005, 0.02],  # grassland: scattered larches and shrubs
        [0.003, 0.0, 0.02],  # scree
        [0.0, 0.06, 0.12],  # wetland: alder and willow shrubs
    ]
)
_CROWN_SIGMA_PX = (3.0, 5.0, 2.0)
_CROWN_RELIEF = (1.2, 0.8, 0.6)  # dome height / crown sigma: spruces are pointed, beeches round
_TREE_HEIGHT_PX = (16.0, 12.0, 3.0)  # the part of the tree that casts shadows onto gaps
# unit vector towards the sun in (column = east, row = south, up): azimuth 157°, elevation 55°
_SUN = (0.22, 0.53, 0.82)

# Plants: name, affinity to each habitat (conifer, deciduous, grassland, scree, wetland),
# elevation optimum and tolerance (m), frequency at the optimum, dominance (cover tendency 1–4).
_PLANTS: tuple[tuple[str, tuple[float, ...], float, float, float, int], ...] = (
    ("Picea abies", (1.0, 0.3, 0.05, 0.0, 0.1), 1650, 350, 0.95, 4),
    ("Abies alba", (0.7, 0.5, 0.0, 0.0, 0.0), 1450, 300, 0.6, 3),
    ("Larix decidua", (0.6, 0.1, 0.2, 0.15, 0.0), 1950, 300, 0.6, 3),
    ("Pinus cembra", (0.5, 0.0, 0.05, 0.2, 0.0), 2100, 250, 0.4, 2),
    ("Fagus sylvatica", (0.15, 1.0, 0.0, 0.0, 0.0), 1300, 250, 0.95, 4),
    ("Acer pseudoplatanus", (0.2, 0.8, 0.05, 0.0, 0.1), 1400, 350, 0.6, 2),
    ("Fraxinus excelsior", (0.0, 0.7, 0.0, 0.0, 0.3), 1250, 250, 0.5, 2),
    ("Corylus avellana", (0.05, 0.8, 0.1, 0.0, 0.1), 1250, 250, 0.6, 2),
    ("Vaccinium myrtillus", (0.9, 0.3, 0.1, 0.1, 0.1), 1750, 400, 0.9, 3),
    ("Oxalis acetosella", (0.8, 0.6, 0.0, 0.0, 0.1), 1500, 350, 0.7, 1),
    ("Homogyne alpina", (0.8, 0.1, 0.2, 0.1, 0.1), 1850, 300, 0.6, 1),
    ("Luzula sylvatica", (0.6, 0.6, 0.05, 0.0, 0.0), 1450, 400, 0.5, 1),
    ("Prenanthes purpurea", (0.6, 0.6, 0.0, 0.0, 0.0), 1450, 350, 0.5, 1),
    ("Sorbus aucuparia", (0.5, 0.4, 0.1, 0.05, 0.1), 1650, 450, 0.5, 1),
    ("Rubus idaeus", (0.3, 0.3, 0.1, 0.0, 0.1), 1450, 500, 0.4, 1),
    ("Anemone nemorosa", (0.1, 0.9, 0.1, 0.0, 0.1), 1300, 300, 0.7, 2),
    ("Galium odoratum", (0.1, 0.9, 0.0, 0.0, 0.0), 1300, 250, 0.7, 2),
    ("Mercurialis perennis", (0.05, 0.8, 0.0, 0.0, 0.05), 1250, 250, 0.5, 2),
    ("Carex sylvatica", (0.1, 0.7, 0.0, 0.0, 0.2), 1300, 300, 0.5, 1),
    ("Festuca rubra", (0.05, 0.0, 1.0, 0.2, 0.3), 1850, 500, 0.9, 3),
    ("Dactylis glomerata", (0.0, 0.1, 0.9, 0.0, 0.1), 1600, 350, 0.7, 2),
    ("Trifolium pratense", (0.0, 0.0, 0.9, 0.0, 0.1), 1750, 400, 0.7, 2),
    ("Trifolium alpinum", (0.0, 0.0, 0.8, 0.2, 0.0), 2150, 250, 0.6, 2),
    ("Leontodon hispidus", (0.0, 0.0, 0.9, 0.1, 0.1), 1900, 400, 0.7, 1),
    ("Plantago lanceolata", (0.0, 0.0, 0.8, 0.0, 0.1), 1550, 300, 0.6, 1),
    ("Lotus corniculatus", (0.0, 0.0, 0.8, 0.1, 0.0), 1800, 450, 0.6, 1),
    ("Anthoxanthum odoratum", (0.1, 0.0, 0.9, 0.0, 0.2), 1850, 450, 0.7, 2),
    ("Nardus stricta", (0.05, 0.0, 0.8, 0.1, 0.3), 2000, 300, 0.6, 3),
    ("Arnica montana", (0.1, 0.0, 0.7, 0.0, 0.1), 1950, 300, 0.4, 1),
    ("Gentiana lutea", (0.0, 0.0, 0.6, 0.1, 0.0), 1850, 300, 0.3, 1),
    ("Achillea millefolium", (0.0, 0.05, 0.8, 0.0, 0.0), 1700, 400, 0.6, 1),
    ("Saxifraga oppositifolia", (0.0, 0.0, 0.05, 1.0, 0.0), 2350, 250, 0.7, 1),
    ("Poa alpina", (0.0, 0.0, 0.5, 0.7, 0.0), 2150, 300, 0.7, 1),
    ("Sesleria caerulea", (0.0, 0.0, 0.5, 0.7, 0.0), 2050, 350, 0.6, 2),
    ("Dryas octopetala", (0.0, 0.0, 0.2, 0.9, 0.0), 2200, 300, 0.6, 3),
    ("Linaria alpina", (0.0, 0.0, 0.0, 1.0, 0.0), 2300, 250, 0.6, 1),
    ("Oxyria digyna", (0.0, 0.0, 0.0, 0.9, 0.1), 2350, 250, 0.5, 1),
    ("Noccaea rotundifolia", (0.0, 0.0, 0.0, 0.9, 0.0), 2350, 250, 0.5, 1),
    ("Silene acaulis", (0.0, 0.0, 0.2, 0.8, 0.0), 2300, 250, 0.5, 1),
    ("Caltha palustris", (0.0, 0.05, 0.05, 0.0, 1.0), 1600, 450, 0.8, 2),
    ("Carex nigra", (0.0, 0.0, 0.1, 0.0, 1.0), 1800, 500, 0.8, 3),
    ("Eriophorum angustifolium", (0.0, 0.0, 0.0, 0.0, 0.9), 1900, 450, 0.7, 2),
    ("Alnus alnobetula", (0.1, 0.0, 0.05, 0.1, 0.8), 1850, 400, 0.7, 4),
    ("Salix appendiculata", (0.0, 0.1, 0.0, 0.0, 0.6), 1550, 400, 0.5, 2),
    ("Filipendula ulmaria", (0.0, 0.1, 0.05, 0.0, 0.8), 1400, 350, 0.6, 2),
    ("Deschampsia cespitosa", (0.1, 0.1, 0.5, 0.0, 0.6), 1700, 600, 0.6, 2),
    ("Potentilla erecta", (0.2, 0.0, 0.6, 0.0, 0.4), 1750, 600, 0.6, 1),
)

# Butterflies: name, habitat affinity (through their host plants and nectar sources),
# elevation optimum and tolerance (m), relative abundance among the records.
_BUTTERFLIES: tuple[tuple[str, tuple[float, ...], float, float, float], ...] = (
    ("Parnassius apollo", (0.0, 0.0, 0.6, 1.0, 0.0), 2100, 350, 1.0),
    ("Erebia euryale", (0.8, 0.2, 0.6, 0.0, 0.1), 1700, 350, 1.5),
    ("Erebia pandrose", (0.0, 0.0, 0.5, 1.0, 0.0), 2300, 250, 0.8),
    ("Erebia ligea", (0.6, 0.7, 0.4, 0.0, 0.0), 1450, 300, 1.0),
    ("Boloria pales", (0.0, 0.0, 1.0, 0.5, 0.0), 2150, 250, 1.0),
    ("Boloria eunomia", (0.0, 0.0, 0.2, 0.0, 1.0), 1700, 400, 0.5),
    ("Lycaena hippothoe", (0.0, 0.0, 0.5, 0.0, 1.0), 1650, 400, 0.7),
    ("Coenonympha gardetta", (0.0, 0.0, 1.0, 0.3, 0.1), 2050, 300, 1.5),
    ("Aglais urticae", (0.1, 0.3, 0.8, 0.1, 0.5), 1500, 600, 1.2),
    ("Pieris bryoniae", (0.2, 0.2, 0.7, 0.0, 0.6), 1750, 400, 1.0),
    ("Argynnis paphia", (0.3, 1.0, 0.3, 0.0, 0.0), 1300, 300, 0.8),
    ("Gonepteryx rhamni", (0.1, 0.9, 0.2, 0.0, 0.5), 1300, 350, 0.7),
    ("Plebejus orbitulus", (0.0, 0.0, 0.8, 0.6, 0.0), 2200, 250, 0.6),
    ("Colias phicomone", (0.0, 0.0, 1.0, 0.4, 0.0), 2050, 300, 0.8),
    ("Melitaea diamina", (0.0, 0.1, 0.3, 0.0, 1.0), 1500, 400, 0.5),
)

# Soil fauna (nematodes per 100 g dry soil): mean abundance per habitat.
_SOIL_GROUPS: tuple[tuple[str, tuple[float, ...]], ...] = (
    ("bacterivores", (300.0, 450.0, 700.0, 120.0, 600.0)),
    ("fungivores", (500.0, 350.0, 200.0, 60.0, 150.0)),
    ("predators", (60.0, 70.0, 80.0, 20.0, 50.0)),
    ("omnivores", (120.0, 150.0, 180.0, 40.0, 120.0)),
    ("herbivores", (150.0, 200.0, 600.0, 50.0, 300.0)),
)
_SOIL_DISPERSION = 3.0  # negative-binomial size parameter

# Braun-Blanquet classes (r, +, 1, 2, 3, 4, 5) as cover percentages.
_BRAUN_BLANQUET = np.array([0.1, 0.5, 3.0, 15.0, 37.5, 62.5, 87.5])
_BB_THRESHOLDS = np.array([-1.6, -0.6, 0.6, 1.5, 2.2, 2.9])

# Independent random streams, so that changing one product leaves the others unchanged.
_STREAMS = {
    "terrain": 1,
    "habitat": 2,
    "trees": 3,
    "texture": 4,
    "collar": 5,
    "releves": 6,
    "plants": 7,
    "butterflies": 8,
    "soil": 9,
}

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
- `truth/habitat.tif`: the habitat map at 0.5 m (codes 0–4: {habitats}).
- `truth/environment.tif`: elevation (m) and moisture (0–1) at 4 m.
"""

_CATALOG_HEADER = """\
# Data catalog of the BotaCLIP demo region, written by `botaclip demo`
# ({size} size, seed {seed}). Every path is relative to this file.
#
# regions     the areas to embed. `demo` is a {extent_m:g} m square of synthetic Alpine
#             orthophotos (R, G, B, NIR at 0.5 m, EPSG:2154). `bands` name the bands and
#             `wavelengths_um` give each band's centre wavelength to DOFA. `releves` names the
#             dataset that trains the contrastive model; `targets` those evaluated downstream.
# datasets    vector data, one row per site × species (long format). `kind` says how to use
#             them: releves (plot species lists with cover), presence_absence (surveys),
#             presence_only (occurrence records; background points are drawn), abundance
#             (counts). `site_id`, `species` and `value` name the columns; CSV files also need
#             `crs` and the coordinate columns `x` and `y`.
# model       the DOFA backbone; weights: null starts from random weights (put the path of
#             DOFA_ViT_base_e100.pth here for real use).
# finetune    contrastive training of image chips against relevés.
# downstream  per-species models on the embeddings (spatial cross-validation).
"""

_CATALOG_COMMENTS: dict[tuple[str, ...], str] = {
    ("workdir",): "artifact store: every stage writes under <workdir>/<stage>/<key>/",
    ("regions", "demo", "bounds"): "left, bottom, right, top: exactly the 224-px tile lattice",
    ("regions", "demo", "orthophotos"): "sheets overlap by 20 px; nodata = 0 (from the files)",
    ("datasets", "releves"): "relevés: plot × species with Braun-Blanquet cover (%)",
    ("datasets", "plants"): "plant presence/absence surveys, away from the relevés",
    ("datasets", "butterflies"): "butterfly presence-only records, lon/lat in a CSV",
    ("datasets", "soil"): "soil nematode trophic groups: counts per sample",
}


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------


def write_demo_region(
    root: Path,
    *,
    size: str = "default",
    seed: int = 0,
    catalog_overrides: dict[str, Any] | None = None,
) -> Path:
    """Write the demo data and its catalog under ``root``.

    The data go to ``root/demo-data/`` and are identical for the same ``size`` and ``seed``
    wherever ``root`` is. If ``root/demo-data/_SUCCESS.json`` records the same generator
    version, size and seed, no data file is rewritten (their modification times are kept);
    the catalog is rewritten only when its text changes.

    Args:
        root: folder that receives ``demo-data/`` and ``data_catalog.yaml``.
        size: a key of :data:`DEMO_SIZES` ("default": 12 × 12 tiles, "tiny": 2 × 2 tiles).
        seed: seed of every random draw.
        catalog_overrides: mapping deep-merged into the catalog before it is validated and written.

    Returns:
        The catalog path, ``root / "data_catalog.yaml"``.

    Raises:
        CatalogError: if ``size`` or ``seed`` is not allowed, or the overridden catalog is invalid.

    """
    if size not in DEMO_SIZES:
        raise CatalogError(
            f"demo size {size!r} is not one of {sorted(DEMO_SIZES)}; pass e.g. --size tiny"
        )
    if not isinstance(seed, int) or seed < 0:
        raise CatalogError(f"demo seed {seed!r} must be a non-negative integer")
    preset = DEMO_SIZES[size]
    root = Path(root)
    data_dir = root / "demo-data"
    catalog_path = root / "data_catalog.yaml"

    mapping = _catalog_mapping(size, preset)
    if catalog_overrides:
        mapping = _deep_merge(mapping, catalog_overrides)
    parse_catalog(mapping, base_dir=root, source=f"demo catalog ({size})")  # fail before writing
    catalog_text = _render_catalog(mapping, size=size, seed=seed, preset=preset)

    stamp = {"generator_version": GENERATOR_VERSION, "size": size, "seed": seed}
    if _is_complete(data_dir, stamp):
        logger.info("demo data in %s are up to date (size %s, seed %d)", data_dir, size, seed)
    else:
        files = _generate(data_dir, size=size, preset=preset, seed=seed)
        manifest = {**stamp, "preset": asdict(preset), "files": files}
        with _atomic(data_dir / "_SUCCESS.json") as tmp:
            tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    if not catalog_path.is_file() or catalog_path.read_text() != catalog_text:
        with _atomic(catalog_path) as tmp:
            tmp.write_text(catalog_text)
    return catalog_path


# --------------------------------------------------------------------------------------
# orchestration and I/O
# --------------------------------------------------------------------------------------


def _is_complete(data_dir: Path, stamp: dict[str, Any]) -> bool:
    """Whether ``_SUCCESS.json`` matches ``stamp`` and every file it lists exists."""
    path = data_dir / "_SUCCESS.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if any(manifest.get(k) != v for k, v in stamp.items()):
        return False
    return all((data_dir / f).is_file() for f in manifest.get("files", []))


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a hidden temporary path next to ``path`` and rename it onto ``path`` on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _generate(data_dir: Path, *, size: str, preset: DemoSize, seed: int) -> list[str]:
    """Generate every file of the demo region; return their paths relative to ``data_dir``."""
    (data_dir / "_SUCCESS.json").unlink(missing_ok=True)
    n = preset.tiles * TILE_PX
    logger.info("generating the %s demo region (%d × %d px, seed %d)", size, n, n, seed)

    land = _landscape(n, seed)
    valid, edges = _collar(n, preset.sheets, seed)
    mosaic = _render(land, seed)
    mosaic[:, ~valid] = 0

    files: list[str] = []
    ortho_dir = data_dir / "ortho"
    ortho_dir.mkdir(parents=True, exist_ok=True)
    sheet_names = set()
    for i in range(preset.sheets):
        for j in range(preset.sheets):
            r0, r1 = _sheet_span(i, edges)
            c0, c1 = _sheet_span(j, edges)
            name = f"ortho_r{i}_c{j}.tif"
            sheet_names.add(name)
            _write_sheet(ortho_dir / name, mosaic[:, r0:r1, c0:c1], _transform(r0, c0))
            files.append(f"ortho/{name}")
    for stale in ortho_dir.glob("*.tif"):  # sheets of an earlier, larger preset
        if stale.name not in sheet_names:
            stale.unlink()

    _write_truth(data_dir / "truth", land)
    files += ["truth/habitat.tif", "truth/environment.tif"]

    sampler = _Sampler(land, valid)
    releves, plots_xy = _releves(sampler, preset.n_releves, seed)
    _write_gpkg(data_dir / "releves.gpkg", releves)
    plants = _plant_surveys(sampler, plots_xy, preset.n_plant_sites, seed)
    with _atomic(data_dir / "plant_surveys.parquet") as tmp:
        plants.to_parquet(tmp, index=False)
    butterflies = _butterflies(sampler, preset.n_butterfly_records, seed)
    with _atomic(data_dir / "butterflies.csv") as tmp:
        butterflies.to_csv(tmp, index=False)
    soil = _soil(sampler, preset.n_soil_sites, seed)
    with _atomic(data_dir / "soil_fauna.csv") as tmp:
        soil.to_csv(tmp, index=False)
    files += ["releves.gpkg", "plant_surveys.parquet", "butterflies.csv", "soil_fauna.csv"]

    lo, hi = _COLLAR_PX
    readme = _README.format(
        extent_m=n * RESOLUTION,
        version=GENERATOR_VERSION,
        size=size,
        seed=seed,
        elev_lo=ELEV_MIN_M,
        elev_hi=ELEV_MIN_M + ELEV_RANGE_M,
        sheets=preset.sheets,
        overlap=_OVERLAP_PX,
        collar_lo=lo,
        collar_hi=hi,
        habitats=", ".join(f"{k} {h}" for k, h in enumerate(HABITATS)),
        **{k: v for k, v in asdict(preset).items() if k.startswith("n_")},
    )
    with _atomic(data_dir / "README.md") as tmp:
        tmp.write_text(readme)
    files.append("README.md")
    return files


def _transform(row0: int = 0, col0: int = 0, *, pixel: int = 1) -> Affine:
    """Geotransform with the corner at region pixel (row0, col0) and cells of ``pixel`` px."""
    left, top = ORIGIN
    res = RESOLUTION * pixel
    return Affine(res, 0.0, left + col0 * RESOLUTION, 0.0, -res, top - row0 * RESOLUTION)


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
    with _atomic(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(data)
            dst.update_tags(TIFFTAG_DATETIME=ACQUISITION, SOURCE="botaclip synthetic demo")
            for b, name in enumerate(BANDS, start=1):
                dst.set_band_description(b, name)


def _write_truth(folder: Path, land: _Landscape) -> None:
    """Write the habitat map (0.5 m) and the environmental fields (4 m) behind every dataset."""
    common = {"driver": "GTiff", "crs": CRS.from_string(CRS_CODE), "compress": "deflate"}
    n = land.habitat.shape[0]
    tiled = {"tiled": True, "blockxsize": 256, "blockysize": 256}
    with _atomic(folder / "habitat.tif") as tmp:
        with rasterio.open(
            tmp, "w", width=n, height=n, count=1, dtype="uint8", transform=_transform(),
            **common, **tiled,
        ) as dst:  # fmt: skip
            dst.write(land.habitat, 1)
            dst.update_tags(**{f"class_{k}": h for k, h in enumerate(HABITATS)})
            dst.set_band_description(1, "habitat")
    nc = land.elevation_m.shape[0]
    with _atomic(folder / "environment.tif") as tmp:
        with rasterio.open(
            tmp, "w", width=nc, height=nc, count=2, dtype="float32",
            transform=_transform(pixel=_COARSE), **common,
        ) as dst:  # fmt: skip
            dst.write(np.stack([land.elevation_m, land.moisture]).astype(np.float32))
            dst.set_band_description(1, "elevation_m")
            dst.set_band_description(2, "moisture")


def _write_gpkg(path: Path, frame: gpd.GeoDataFrame) -> None:
    """GeoPackage with a fixed timestamp, so that the file is byte-identical on every run."""
    previous = pyogrio.get_gdal_config_option("OGR_CURRENT_DATE")
    pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": _GPKG_DATE})
    try:
        with _atomic(path) as tmp:
            frame.to_file(tmp, layer="releves", driver="GPKG", engine="pyogrio")
    finally:
        pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": previous})


# --------------------------------------------------------------------------------------
# landscape
# --------------------------------------------------------------------------------------


@dataclass
class _Landscape:
    """The hidden truth every product is drawn from."""

    habitat: np.ndarray  # (n, n) uint8 at 0.5 m
    habitat_1m: np.ndarray  # (n/2, n/2) uint8; habitat == habitat_1m repeated 2 × 2
    ground: np.ndarray  # (n, n) uint8 land-cover class, 0–4 as habitat, 5 = open water
    elevation_m: np.ndarray  # (n/8, n/8) float32 at 4 m
    moisture: np.ndarray  # (n/8, n/8) float32 in [0, 1] at 4 m
    elev01: np.ndarray  # (n, n) float32 elevation scaled to [0, 1] at 0.5 m


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[stream]])


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation."""
    field = ndimage.gaussian_filter(
        rng.standard_normal(shape, dtype=np.float32), sigma, mode="reflect"
    )
    return (field / max(float(field.std()), 1e-6)).astype(np.float32)


def _upsample(a: np.ndarray, factor: int) -> np.ndarray:
    """Bilinear upsampling of cell-centred values by an integer factor (edges held)."""

    def axis_weights(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(n * factor, dtype=np.float64) + 0.5) / factor - 0.5
        i0 = np.floor(pos).astype(np.int64)
        w = (pos - i0).astype(np.float32)
        return np.clip(i0, 0, n - 1), np.clip(i0 + 1, 0, n - 1), w

    r0, r1, wr = axis_weights(a.shape[0])
    c0, c1, wc = axis_weights(a.shape[1])
    rows = a[r0] * (1 - wr)[:, None] + a[r1] * wr[:, None]
    return (rows[:, c0] * (1 - wc) + rows[:, c1] * wc).astype(np.float32)


def _landscape(n: int, seed: int) -> _Landscape:
    """Elevation, moisture and the habitat map: smooth fields and thresholded noise."""
    nc = n // _COARSE
    rng = _rng(seed, "terrain")
    yy, xx = np.mgrid[0:nc, 0:nc].astype(np.float32) / max(nc - 1, 1)
    cells_per_m = 1 / (_COARSE * RESOLUTION)
    relief = 0.14 * _smooth_noise(rng, (nc, nc), 150 * cells_per_m)
    relief += 0.05 * _smooth_noise(rng, (nc, nc), 40 * cells_per_m)
    elev = 0.78 * xx + 0.12 * yy + relief
    elev = (elev - elev.min()) / (elev.max() - elev.min())
    moist = _smooth_noise(rng, (nc, nc), 50 * cells_per_m) + 1.2 * (1 - elev)
    moist = (moist - moist.min()) / (moist.max() - moist.min())

    rng = _rng(seed, "habitat")
    centres = [(CONIF, 0.46, 0.2), (DECID, 0.14, 0.24), (GRASS, 0.74, 0.19), (SCREE, 0.97, 0.18)]
    scores = np.empty((5, nc, nc), dtype=np.float32)
    for h, mu, width in centres:
        scores[h] = -(((elev - mu) / width) ** 2)
    scores[WET] = 9.0 * (moist - 0.86)
    for h in range(5):
        scores[h] += 0.55 * _smooth_noise(rng, (nc, nc), 30 * cells_per_m)
        scores[h] += 0.3 * _smooth_noise(rng, (nc, nc), 10 * cells_per_m)
    # argmax on a 1 m grid with a little fine noise gives ragged, natural patch edges
    up = _COARSE // 2
    best = np.full((nc * up, nc * up), -np.inf, dtype=np.float32)
    hab_1m = np.zeros((nc * up, nc * up), dtype=np.uint8)
    for h in range(5):
        s = _upsample(scores[h], up) + 0.1 * _smooth_noise(rng, (nc * up, nc * up), 2.0)
        better = s > best
        best[better] = s[better]
        hab_1m[better] = h
    habitat = np.repeat(np.repeat(hab_1m, 2, axis=0), 2, axis=1)

    pools = _upsample(_smooth_noise(rng, (nc, nc), 1.5), _COARSE) > 1.0
    ground = habitat.copy()
    ground[(habitat == WET) & pools] = 5
    return _Landscape(
        habitat=habitat,
        habitat_1m=hab_1m,
        ground=ground,
        elevation_m=(ELEV_MIN_M + ELEV_RANGE_M * elev).astype(np.float32),
        moisture=moist.astype(np.float32),
        elev01=_upsample(elev.astype(np.float32), _COARSE),
    )


def _shift(a: np.ndarray, dr: int, dc: int) -> np.ndarray:
    """``out[r, c] = a[r + dr, c + dc]``, with the edge values held outside the array."""
    h, w = a.shape
    if dc == 0:
        return a[np.clip(np.arange(h) + dr, 0, h - 1)]
    cols = np.clip(np.arange(w) + dc, 0, w - 1)
    return (a if dr == 0 else _shift(a, dr, 0))[:, cols]


def _render(land: _Landscape, seed: int) -> np.ndarray:
    """Render the 4-band orthophoto mosaic (uint8, 1–255) of the landscape."""
    n = land.habitat.shape[0]
    rng = _rng(seed, "trees")
    # trees on a jittered grid (at most one per cell) so that crowns stay mostly apart
    surface = np.zeros((n, n), dtype=np.float32)  # crown domes, px
    height = np.zeros((n, n), dtype=np.float32)  # tree height above the ground, px
    alphas: list[np.ndarray] = []
    for k in range(3):
        cell = _TREE_CELL_PX[k]
        m = -(-n // cell)
        offsets = rng.integers(cell // 4, cell - cell // 4, size=(2, m, m))
        rows = np.minimum(np.arange(m)[:, None] * cell + offsets[0], n - 1)
        cols = np.minimum(np.arange(m)[None, :] * cell + offsets[1], n - 1)
        trees = rng.random((m, m)) < _TREE_PROB[land.habitat[rows, cols], k]
        impulses = np.zeros((n, n), dtype=np.float32)
        impulses[rows[trees], cols[trees]] = rng.uniform(0.75, 1.1, int(trees.sum()))
        sigma = _CROWN_SIGMA_PX[k]
        crowns = ndimage.gaussian_filter(impulses, sigma, truncate=2.5) * (2 * math.pi * sigma**2)
        crowns = np.minimum(crowns, 1.2)
        surface += _CROWN_RELIEF[k] * sigma * crowns
        height += _TREE_HEIGHT_PX[k] * crowns
        alphas.append(np.clip((crowns - 0.15) / 0.25, 0, 1))
    del impulses, crowns
    cover = np.clip(alphas[0] + alphas[1] + alphas[2], 0, 1)
    alpha_sum = alphas[0] + alphas[1] + alphas[2] + 1e-6
    # Lambertian shading of the crown domes; the sun is high in the south-south-east
    sun_col, sun_row, sun_up = _SUN
    dz_col = 0.5 * (_shift(surface, 0, 1) - _shift(surface, 0, -1))
    dz_row = 0.5 * (_shift(surface, 1, 0) - _shift(surface, -1, 0))
    lambert = (sun_up - sun_col * dz_col - sun_row * dz_row) / np.sqrt(1 + dz_col**2 + dz_row**2)
    sunlit = 0.25 + 0.9 * np.clip(lambert, 0, None) / sun_up
    del surface, dz_col, dz_row, lambert
    # cast shadows: a pixel is shaded when a tree towards the sun rises above the sun's ray
    rise = sun_up / math.hypot(sun_col, sun_row)
    shadow = np.zeros((n, n), dtype=np.float32)
    for t in (2, 4, 6):
        dr, dc = (
            round(t * sun_row / math.hypot(sun_col, sun_row)),
            round(t * sun_col / math.hypot(sun_col, sun_row)),
        )
        blocked = _shift(height, dr, dc) - height - rise * math.hypot(dr, dc)
        shadow = np.maximum(shadow, np.clip(blocked / 2.0, 0, 1))
    light = 1 - 0.6 * shadow
    del height, shadow

    rng = _rng(seed, "texture")
    fine = ndimage.gaussian_filter(rng.standard_normal((n, n), dtype=np.float32), 0.6)
    fine /= max(float(fine.std()), 1e-6)
    nc = n // _COARSE
    mottle = _upsample(_smooth_noise(rng, (nc, nc), 0.8), _COARSE)
    nb = -(-n // 3)
    blocks = np.repeat(np.repeat(rng.standard_normal((nb, nb), dtype=np.float32), 3, 0), 3, 1)
    boulders = np.repeat(np.repeat(rng.standard_normal((nc, nc), dtype=np.float32), 8, 0), 8, 1)
    g = land.ground
    texture = 1 + _FINE_AMP[g] * fine + _MOTTLE_AMP[g] * mottle
    texture += _BLOCK_AMP[g] * (blocks[:n, :n] + 0.6 * boulders)
    del fine, mottle, blocks, boulders
    # gentle terrain shading from the elevation field (slopes facing south-east are brighter)
    elev = land.elevation_m
    gy, gx = np.gradient(elev, _COARSE * RESOLUTION)
    hill = _upsample(
        np.clip(1 + 0.25 * (gx * 0.5 - gy * 0.7), 0.85, 1.15).astype(np.float32), _COARSE
    )
    turf = np.where(land.ground == GRASS, np.clip((land.elev01 - 0.6) / 0.35, 0, 1), 0).astype(
        np.float32
    )

    shading = light * hill
    ground_weight = texture * (1 - cover) * shading
    crown_weight = cover / alpha_sum * sunlit * shading
    del texture, light, hill, sunlit, cover
    mosaic = np.empty((4, n, n), dtype=np.uint8)
    for b in range(4):
        value = (_GROUND_DN[g, b] + _ALPINE_TURF_SHIFT[b] * turf) * ground_weight
        crown = (
            alphas[0] * _CROWN_DN[0, b] + alphas[1] * _CROWN_DN[1, b] + alphas[2] * _CROWN_DN[2, b]
        )
        value += crown * crown_weight
        value += 5.0 * (rng.random((n, n), dtype=np.float32) - 0.5)  # sensor noise, sd 1.4
        mosaic[b] = np.clip(np.rint(value), 1, 255).astype(np.uint8)
    return mosaic


def _sheet_span(i: int, edges: np.ndarray) -> tuple[int, int]:
    """Pixel range of sheet ``i`` along one axis: its share of the region plus the overlap."""
    half = _OVERLAP_PX // 2
    n = int(edges[-1])
    return max(0, int(edges[i]) - half), min(n, int(edges[i + 1]) + half)


def _collar(n: int, sheets: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Valid-pixel mask (False in the nodata collar) and the sheet edges along each axis.

    Each outer edge of each outermost sheet has its own collar width; where two sheets overlap,
    the lower-numbered sheet's width holds, so overlapping pixels stay identical.
    """
    rng = _rng(seed, "collar")
    edges = np.round(np.linspace(0, n, sheets + 1)).astype(np.int64)
    lo, hi = _COLLAR_PX
    widths = rng.integers(lo, hi + 1, size=(4, sheets))  # top, bottom, left, right
    per_px = np.repeat(widths, np.diff(edges), axis=1)  # (4, n): width at each row/column
    idx = np.arange(n)
    rows, cols = idx[:, None], idx[None, :]
    valid = (
        (rows >= per_px[0][None, :])
        & (rows < n - per_px[1][None, :])
        & (cols >= per_px[2][:, None])
        & (cols < n - per_px[3][:, None])
    )
    return valid, edges


# --------------------------------------------------------------------------------------
# sites and species
# --------------------------------------------------------------------------------------


class _Sampler:
    """Draws site locations on the 1 m habitat grid and reads the landscape around them."""

    def __init__(self, land: _Landscape, valid: np.ndarray) -> None:
        self.land = land
        self.n = land.habitat.shape[0]
        valid_1m = valid[::2, ::2] & valid[1::2, ::2] & valid[::2, 1::2] & valid[1::2, 1::2]
        self.valid_1m = valid_1m
        window = 2 * (_PLOT_RADIUS_PX // 2) + 1  # ±10 m in 1 m cells
        # relevés need their whole neighbourhood on valid pixels ...
        self.interior_1m = ndimage.minimum_filter(
            valid_1m, size=window, mode="constant", cval=False
        )
        # ... and, as phytosociologists do, a homogeneous stand of one habitat
        shares = np.stack(
            [
                ndimage.uniform_filter(
                    (land.habitat_1m == h).astype(np.float32), window, mode="nearest"
                )
                for h in range(5)
            ]
        )
        self.stand_1m = np.argmax(shares, axis=0).astype(np.uint8)
        self.homogeneous_1m = shares.max(axis=0) >= _STAND_PURITY
        # alternate east–west strips keep the surveys away from the relevé plots
        bands = max(2, round(self.n / TILE_PX / 3))
        band_of_row = np.minimum(np.arange(self.n // 2) * bands // (self.n // 2), bands - 1)
        self.releve_band_1m = np.broadcast_to((band_of_row % 2 == 0)[:, None], valid_1m.shape)

    def draw(
        self,
        rng: np.random.Generator,
        count: int,
        allowed: np.ndarray,
        *,
        min_spacing_m: float,
        stratify: bool,
        avoid_xy: np.ndarray | None = None,
        avoid_m: float = 0.0,
    ) -> np.ndarray:
        """``count`` (x, y) points in allowed 1 m cells, spaced and away from ``avoid_xy``.

        With ``stratify``, each point's habitat (the dominant one within 10 m) is drawn
        ∝ √(its area) before its cell, so that rare habitats get more sites than their area gives.
        """
        if avoid_xy is not None and len(avoid_xy):
            occupied = np.zeros(allowed.shape, dtype=bool)
            rows, cols = self.pixel(avoid_xy)
            occupied[rows // 2, cols // 2] = True
            # cell centres to the nearest occupied cell centre, in metres (1 m cells); two points
            # are each within 0.71 m of their cell centres, hence the 1.5 m margin
            distance = ndimage.distance_transform_edt(~occupied)
            allowed = allowed & (distance >= avoid_m + 1.5)
        cells = np.flatnonzero(allowed)
        if len(cells) == 0:
            raise StageError("demo generator: no room left to place sites")  # pragma: no cover
        hab = self.stand_1m.ravel()[cells]
        groups = [cells[hab == h] for h in range(5)]
        weights = np.array([math.sqrt(len(c)) if stratify else len(c) for c in groups], dtype=float)
        weights /= weights.sum()
        out: list[tuple[float, float]] = []
        spacing = min_spacing_m
        failures = 0
        while len(out) < count:
            group = groups[rng.choice(5, p=weights)]
            cell = group[rng.integers(len(group))]
            x, y = self._cell_xy(np.array([cell]), jitter=rng.random(2))
            if out:
                placed = np.asarray(out)
                if np.min((placed[:, 0] - x[0]) ** 2 + (placed[:, 1] - y[0]) ** 2) < spacing**2:
                    failures += 1
                    if failures > 200:  # crowded: accept closer neighbours rather than loop
                        spacing *= 0.8
                        failures = 0
                    continue
            out.append((round(float(x[0]), 2), round(float(y[0]), 2)))
        return np.asarray(out)

    def _cell_xy(
        self, cells: np.ndarray, jitter: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = np.divmod(cells, self.n // 2)
        ju, jv = (0.5, 0.5) if jitter is None else (jitter[0], jitter[1])
        x = ORIGIN[0] + (cols + ju) * 2 * RESOLUTION
        y = ORIGIN[1] - (rows + jv) * 2 * RESOLUTION
        return x, y

    def pixel(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row and column (0.5 m pixels) of (x, y) points inside the region."""
        cols = np.floor((xy[:, 0] - ORIGIN[0]) / RESOLUTION).astype(np.int64)
        rows = np.floor((ORIGIN[1] - xy[:, 1]) / RESOLUTION).astype(np.int64)
        return np.clip(rows, 0, self.n - 1), np.clip(cols, 0, self.n - 1)

    def neighbourhood(
        self, xy: np.ndarray, radius_px: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Habitat fractions (k, 5) within ``radius_px`` of each point; elevation (m), moisture."""
        fractions = np.zeros((len(xy), 5))
        rows, cols = self.pixel(xy)
        for k, (r, c) in enumerate(zip(rows, cols, strict=True)):
            window = self.land.habitat[
                max(0, r - radius_px) : r + radius_px + 1, max(0, c - radius_px) : c + radius_px + 1
            ]
            fractions[k] = np.bincount(window.ravel(), minlength=5)[:5] / window.size
        coarse = (rows // _COARSE, cols // _COARSE)
        return (
            fractions,
            self.land.elevation_m[coarse].astype(float),
            self.land.moisture[coarse].astype(float),
        )


def _plant_probabilities(fractions: np.ndarray, elev: np.ndarray) -> np.ndarray:
    """Probability (sites × plants) that each plant occurs, from habitat and elevation."""
    affinity = np.array([p[1] for p in _PLANTS])
    opt = np.array([p[2] for p in _PLANTS])
    tol = np.array([p[3] for p in _PLANTS])
    pmax = np.array([p[4] for p in _PLANTS])
    habitat_term = fractions @ affinity.T
    elev_term = np.exp(-0.5 * ((elev[:, None] - opt[None, :]) / tol[None, :]) ** 2)
    return np.clip(1.5 * pmax * habitat_term * elev_term**0.6, 0.0, 0.97)


def _releves(sampler: _Sampler, count: int, seed: int) -> tuple[gpd.GeoDataFrame, np.ndarray]:
    """Relevé plots (stratified by habitat) with species and Braun-Blanquet cover."""
    rng = _rng(seed, "releves")
    allowed = sampler.interior_1m & sampler.releve_band_1m & sampler.homogeneous_1m
    xy = sampler.draw(rng, count, allowed, min_spacing_m=10.0, stratify=True)
    fractions, elev, _ = sampler.neighbourhood(xy, _PLOT_RADIUS_PX)
    prob = _plant_probabilities(fractions, elev)
    present = rng.random(prob.shape) < prob
    for poor in np.flatnonzero(present.sum(axis=1) < 3):  # a relevé lists three species or more
        present[poor, np.argsort(-prob[poor], kind="stable")[:3]] = True
    dominance = np.array([p[5] for p in _PLANTS], dtype=float)
    score = np.log(dominance)[None, :] + 1.2 * np.log(prob + 0.05) + rng.normal(0, 0.8, prob.shape)
    cover = _BRAUN_BLANQUET[np.digitize(score + 1.0, _BB_THRESHOLDS)]
    rows = []
    for k in range(len(xy)):
        plot = f"R{k + 1:04d}"
        habitat = HABITATS[int(np.argmax(fractions[k]))]
        for s in np.flatnonzero(present[k]):
            rows.append((plot, _PLANTS[s][0], float(cover[k, s]), habitat, xy[k, 0], xy[k, 1]))
    frame = pd.DataFrame(rows, columns=["plot_id", "species", "cover", "habitat", "x", "y"])
    geometry = points(frame["x"].to_numpy(), frame["y"].to_numpy())
    gdf = gpd.GeoDataFrame(frame.drop(columns=["x", "y"]), geometry=geometry, crs=CRS_CODE)
    return gdf, xy


def _plant_surveys(
    sampler: _Sampler, plots_xy: np.ndarray, count: int, seed: int
) -> gpd.GeoDataFrame:
    """Presence/absence of the ~20 most balanced species at sites ≥ 50 m from every relevé."""
    rng = _rng(seed, "plants")
    allowed = sampler.valid_1m & ~sampler.releve_band_1m
    xy = sampler.draw(
        rng,
        count,
        allowed,
        min_spacing_m=8.0,
        stratify=True,
        avoid_xy=plots_xy,
        avoid_m=_MIN_SITE_DISTANCE_M,
    )
    fractions, elev, _ = sampler.neighbourhood(xy, _PLOT_RADIUS_PX)
    detection = 0.9  # surveyors miss some species
    present = rng.random((len(xy), len(_PLANTS))) < detection * _plant_probabilities(
        fractions, elev
    )
    prevalence = present.mean(axis=0)
    balance = np.minimum(prevalence, 1 - prevalence)
    chosen = sorted(np.argsort(-balance, kind="stable")[:20], key=lambda s: _PLANTS[s][0])
    site_ids = [f"P{k + 1:04d}" for k in range(len(xy))]
    frame = pd.DataFrame(
        {
            "site_id": np.repeat(site_ids, len(chosen)),
            "species": np.tile([_PLANTS[s][0] for s in chosen], len(xy)),
            "present": present[:, chosen].astype(np.int64).ravel(),
        }
    )
    geometry = points(np.repeat(xy[:, 0], len(chosen)), np.repeat(xy[:, 1], len(chosen)))
    return gpd.GeoDataFrame(frame, geometry=geometry, crs=CRS_CODE)


def _butterflies(sampler: _Sampler, count: int, seed: int) -> pd.DataFrame:
    """Presence-only records, located ∝ each species' suitability, in WGS84."""
    rng = _rng(seed, "butterflies")
    land = sampler.land
    cell = 16  # 8 m cells; butterflies use the habitats within ~25 m
    m = land.habitat.shape[0] // cell
    fractions = np.stack(
        [(land.habitat == h).reshape(m, cell, m, cell).mean(axis=(1, 3)) for h in range(5)], axis=-1
    )
    fractions = ndimage.gaussian_filter(fractions, sigma=(2.0, 2.0, 0.0), mode="nearest")
    step = cell // _COARSE
    elev = land.elevation_m.reshape(m, step, m, step).mean(axis=(1, 3))
    ok = sampler.valid_1m.reshape(m, cell // 2, m, cell // 2).all(axis=(1, 3)).ravel()
    cells = np.flatnonzero(ok)

    affinity = np.array([b[1] for b in _BUTTERFLIES])
    opt = np.array([b[2] for b in _BUTTERFLIES])
    tol = np.array([b[3] for b in _BUTTERFLIES])
    suit = fractions.reshape(-1, 5)[cells] @ affinity.T
    suit *= np.exp(-0.5 * ((elev.ravel()[cells, None] - opt) / tol) ** 2)

    abundance = np.array([b[4] for b in _BUTTERFLIES])
    minimum = min(5, count // len(_BUTTERFLIES))
    counts = minimum + rng.multinomial(
        count - minimum * len(_BUTTERFLIES), abundance / abundance.sum()
    )
    rows = []
    for s, (name, *_rest) in enumerate(_BUTTERFLIES):
        weight = suit[:, s] ** 2
        picks = rng.choice(cells, size=counts[s], p=weight / weight.sum())
        r, c = np.divmod(picks, m)
        jitter = rng.random((counts[s], 2))
        x = ORIGIN[0] + (c + jitter[:, 0]) * cell * RESOLUTION
        y = ORIGIN[1] - (r + jitter[:, 1]) * cell * RESOLUTION
        rows += [(name, xi, yi) for xi, yi in zip(x, y, strict=True)]
    frame = pd.DataFrame(rows, columns=["species", "x", "y"])
    frame = frame.iloc[rng.permutation(len(frame))].reset_index(drop=True)  # records in no order
    to_wgs84 = Transformer.from_crs(CRS_CODE, "EPSG:4326", always_xy=True)
    lon, lat = to_wgs84.transform(frame["x"].to_numpy(), frame["y"].to_numpy())
    return pd.DataFrame(
        {
            "record_id": [f"B{k + 1:04d}" for k in range(len(frame))],
            "species": frame["species"],
            "lon": np.round(lon, 7),
            "lat": np.round(lat, 7),
        }
    )


def _soil(sampler: _Sampler, count: int, seed: int) -> pd.DataFrame:
    """Trophic-group counts that follow habitat, elevation and moisture (negative binomial)."""
    rng = _rng(seed, "soil")
    xy = sampler.draw(rng, count, sampler.valid_1m, min_spacing_m=10.0, stratify=False)
    fractions, elev, moist = sampler.neighbourhood(xy, 10)  # a soil core reflects ±5 m
    elev01 = (elev - ELEV_MIN_M) / ELEV_RANGE_M
    rows = []
    for k in range(len(xy)):
        for name, means in _SOIL_GROUPS:
            mu = float(fractions[k] @ np.array(means)) * math.exp(-0.8 * (elev01[k] - 0.5))
            if name == "bacterivores":
                mu *= 0.7 + 0.6 * moist[k]
            p = _SOIL_DISPERSION / (_SOIL_DISPERSION + mu)
            rows.append(
                (
                    f"S{k + 1:03d}",
                    xy[k, 0],
                    xy[k, 1],
                    name,
                    int(rng.negative_binomial(_SOIL_DISPERSION, p)),
                )
            )
    return pd.DataFrame(rows, columns=["sample_id", "x", "y", "trophic_group", "abundance"])


# --------------------------------------------------------------------------------------
# catalog
# --------------------------------------------------------------------------------------


def _catalog_mapping(size: str, preset: DemoSize) -> dict[str, Any]:
    """Build the catalog as a plain mapping (before overrides)."""
    extent = preset.tiles * TILE_PX * RESOLUTION
    left, top = ORIGIN
    mapping: dict[str, Any] = {
        "version": 1,
        # the demo folder is the artifact store: report at <demo folder>/reports/demo.json
        "workdir": ".",
        "regions": {
            "demo": {
                "crs": CRS_CODE,
                "resolution": RESOLUTION,
                "bounds": [left, top - extent, left + extent, top],
                "orthophotos": {
                    "paths": ["demo-data/ortho/*.tif"],
                    "bands": list(BANDS),
                    "wavelengths_um": list(WAVELENGTHS_UM),
                },
                "releves": "releves",
                "targets": ["plants", "butterflies", "soil"],
            }
        },
        "datasets": {
            "releves": {
                "kind": "releves",
                "path": "demo-data/releves.gpkg",
                "layer": "releves",
                "site_id": "plot_id",
                "species": "species",
                "value": "cover",
            },
            "plants": {
                "kind": "presence_absence",
                "path": "demo-data/plant_surveys.parquet",
                "site_id": "site_id",
                "species": "species",
                "value": "present",
            },
            "butterflies": {
                "kind": "presence_only",
                "path": "demo-data/butterflies.csv",
                "crs": "EPSG:4326",
                "x": "lon",
                "y": "lat",
                "site_id": "record_id",
                "species": "species",
            },
            "soil": {
                "kind": "abundance",
                "path": "demo-data/soil_fauna.csv",
                "crs": CRS_CODE,
                "x": "x",
                "y": "y",
                "site_id": "sample_id",
                "species": "trophic_group",
                "value": "abundance",
            },
        },
    }
    if size == "tiny":
        mapping["model"] = {"dofa": {"size": "tiny", "weights": None}}
        mapping["finetune"] = {"epochs": 5, "batch_size": 16, "augment_views": 1}
        mapping["downstream"] = {"folds": 3, "n_background": 100, "min_presences": 3}
    else:
        mapping["model"] = {"dofa": {"size": "base", "weights": None}}
        # DOFA-Base runs at ~2.5 tiles/s on 2 CPU cores: one view per plot keeps the demo's
        # forward passes (144 region tiles + 240 plot chips) near 2.5 minutes
        mapping["finetune"] = {"epochs": 40, "augment_views": 1}
    return mapping


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into a copy of ``base``: mappings key by key, other values replace."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _render_catalog(mapping: dict[str, Any], *, size: str, seed: int, preset: DemoSize) -> str:
    """YAML text of the catalog: block style for mappings, comments above the main keys."""
    header = _CATALOG_HEADER.format(
        size=size, seed=seed, extent_m=preset.tiles * TILE_PX * RESOLUTION
    )
    lines = header.rstrip("\n").split("\n") + [""]
    _render_block(mapping, (), lines)
    return "\n".join(lines) + "\n"


def _render_block(mapping: dict[str, Any], path: tuple[str, ...], lines: list[str]) -> None:
    indent = "  " * len(path)
    for key, value in mapping.items():
        here = (*path, str(key))
        if not path and lines and lines[-1] != "":
            lines.append("")  # a blank line between top-level blocks
        if here in _CATALOG_COMMENTS:
            lines.append(f"{indent}# {_CATALOG_COMMENTS[here]}")
        if isinstance(value, dict) and value:
            lines.append(f"{indent}{_scalar(key)}:")
            _render_block(value, here, lines)
        else:
            lines.append(f"{indent}{_scalar(key)}: {_scalar(value)}")


def _scalar(value: Any) -> str:
    """Dump a value in YAML flow style on one line."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...").strip()
