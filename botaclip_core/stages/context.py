"""What stages read from the catalog while planning: the region, its grid, input fingerprints."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from botaclip_core.catalog import Catalog, RegionSpec
from botaclip_core.grid import RegionGrid
from botaclip_core.store import ArtifactStore, fingerprint_file


class PlanContext:
    """One region of a catalog, as the stages' settings and inputs functions see it.

    Planning is cheap: file fingerprints (remembered between runs by size and mtime), raster
    headers and settings. Nothing here is passed to a build: builds get settings and inputs.

    Args:
        catalog: the validated catalog (overrides already merged).
        region: the region's name.
    """

    def __init__(self, catalog: Catalog, region: str) -> None:
        self.catalog = catalog
        self.region_name = region
        self.region: RegionSpec = catalog.region(region)
        self.store = ArtifactStore(catalog.workdir_path)
        self._fingerprints: dict[str, dict[str, Any]] | None = None

    def fingerprint(self, path: Path) -> dict[str, Any]:
        """Fingerprint of an input file, hashed only when new or changed since an earlier run."""
        if self._fingerprints is None:
            self._fingerprints = self.store.load_fingerprints()
        fp = fingerprint_file(path, self._fingerprints)
        self._fingerprints[fp["path"]] = fp
        return fp

    def save_fingerprints(self) -> None:
        """Remember the fingerprints computed while planning, for the next run."""
        if self._fingerprints is not None:
            self.store.save_fingerprints(self._fingerprints)

    @functools.cached_property
    def orthophoto_files(self) -> list[Path]:
        """The region's orthophotos, in catalog order."""
        return self.catalog.orthophoto_files(self.region_name)

    @functools.cached_property
    def grid(self) -> RegionGrid:
        """Region grid: the catalog's bounds, or the union of the orthophotos' footprints."""
        from botaclip_core.tiling import region_grid_for_sources

        return region_grid_for_sources(
            self.orthophoto_files,
            crs=self.region.crs,
            resolution=self.region.resolution,
            bounds=self.region.bounds,
        )

    @functools.cached_property
    def imagery_dtype(self) -> str:
        """Data type of the orthophotos (the first file's; tiling checks that they agree)."""
        import rasterio

        with rasterio.open(self.orthophoto_files[0]) as ds:
            return str(ds.dtypes[0])

    def orthophoto_inputs(self) -> list[dict[str, Any]]:
        """Fingerprints of the orthophotos, in catalog order."""
        return [self.fingerprint(p) for p in self.orthophoto_files]

    def weights_input(self) -> dict[str, Any] | None:
        """Fingerprint of the DOFA checkpoint, or None for random weights."""
        weights = self.catalog.model.dofa.weights
        return self.fingerprint(self.catalog.resolve(weights)) if weights else None

    def dataset_input(self, name: str) -> dict[str, Any]:
        """A site dataset as an input: how to read it (its spec) and its file's fingerprint.

        Its test set is not how it is read, and stays out (keys from before it existed hold).
        """
        spec = self.catalog.datasets[name]
        return {
            "spec": spec.model_dump(mode="json", exclude={"test"}),
            "file": self.fingerprint(self.catalog.resolve(spec.path)),
        }
