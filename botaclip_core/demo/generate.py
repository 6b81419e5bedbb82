"""Writing the demo region once per size and seed, and its catalog whenever it changes."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from botaclip_core.catalog import merge_overrides, parse_catalog
from botaclip_core.demo.catalog import catalog_mapping, render_catalog
from botaclip_core.demo.files import (
    write_covariates,
    write_csv,
    write_geoparquet,
    write_gpkg,
    write_readme,
    write_sheets,
    write_truth,
)
from botaclip_core.demo.landscape import build_landscape
from botaclip_core.demo.orthophoto import render_mosaic
from botaclip_core.demo.region import DEMO_SIZES, GENERATOR_VERSION, DemoSize
from botaclip_core.demo.sheets import collar
from botaclip_core.demo.sites import SiteSampler
from botaclip_core.demo.surveys import (
    draw_butterflies,
    draw_butterfly_transects,
    draw_plant_surveys,
    draw_releves,
    draw_soil,
)
from botaclip_core.errors import CatalogError
from botaclip_core.store import SUCCESS, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)


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

    mapping = merge_overrides(catalog_mapping(size, preset), catalog_overrides)
    parse_catalog(mapping, base_dir=root, source=f"demo catalog ({size})")  # fail before writing
    catalog_text = render_catalog(mapping, size=size, seed=seed, preset=preset)

    stamp = {"generator_version": GENERATOR_VERSION, "size": size, "seed": seed}
    if _is_complete(data_dir, stamp):
        logger.info("demo data in %s are up to date (size %s, seed %d)", data_dir, size, seed)
    else:
        files = _generate(data_dir, size=size, preset=preset, seed=seed)
        atomic_write_json(data_dir / SUCCESS, {**stamp, "preset": asdict(preset), "files": files})
    if not catalog_path.is_file() or catalog_path.read_text() != catalog_text:
        atomic_write_text(catalog_path, catalog_text)
    return catalog_path


def _is_complete(data_dir: Path, stamp: dict[str, Any]) -> bool:
    """Whether ``_SUCCESS.json`` matches ``stamp`` and every file it lists exists."""
    try:
        manifest = json.loads((data_dir / SUCCESS).read_text())
    except (OSError, ValueError):
        return False
    if any(manifest.get(k) != v for k, v in stamp.items()):
        return False
    return all((data_dir / f).is_file() for f in manifest.get("files", []))


def _generate(data_dir: Path, *, size: str, preset: DemoSize, seed: int) -> list[str]:
    """Generate every file of the demo region; return their paths relative to ``data_dir``."""
    # a run that stops half-way must not leave the old stamp next to new files
    (data_dir / SUCCESS).unlink(missing_ok=True)
    n = preset.pixels
    logger.info("generating the %s demo region (%d × %d px, seed %d)", size, n, n, seed)

    land = build_landscape(n, seed)
    valid, edges = collar(n, preset.sheets, seed)
    mosaic = render_mosaic(land, seed)
    mosaic[:, ~valid] = 0
    files = write_sheets(data_dir, mosaic, edges)
    files += write_truth(data_dir, land)
    files += write_covariates(data_dir, land, seed)
    files += _write_field_data(data_dir, SiteSampler(land, valid), preset, seed)
    files.append(write_readme(data_dir, size=size, seed=seed, preset=preset))
    return files


def _write_field_data(
    data_dir: Path, sampler: SiteSampler, preset: DemoSize, seed: int
) -> list[str]:
    """Draw and write the relevés, the three downstream datasets and the butterflies' test set."""
    releves, plots_xy = draw_releves(sampler, preset.n_releves, seed)
    write_gpkg(data_dir / "releves.gpkg", releves, layer="releves")
    plants = draw_plant_surveys(sampler, plots_xy, preset.n_plant_sites, seed)
    write_geoparquet(data_dir / "plant_surveys.parquet", plants)
    write_csv(
        data_dir / "butterflies.csv", draw_butterflies(sampler, preset.n_butterfly_records, seed)
    )
    write_csv(data_dir / "soil_fauna.csv", draw_soil(sampler, preset.n_soil_sites, seed))
    transects = draw_butterfly_transects(sampler, preset.n_transect_sites, seed)
    write_csv(data_dir / "butterfly_transects.csv", transects)
    return [
        "releves.gpkg",
        "plant_surveys.parquet",
        "butterflies.csv",
        "soil_fauna.csv",
        "butterfly_transects.csv",
    ]
