"""The region grid: CRS, resolution and pixel-snapped bounds shared by every stage."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from affine import Affine

from botaclip_core.errors import CRSMismatchError

if TYPE_CHECKING:  # rasterio only where a CRS is parsed: embedding on a GPU box needs no GDAL
    from rasterio.crs import CRS


def parse_crs(value: str | CRS, *, field: str = "crs") -> CRS:
    """Parse a CRS string ("EPSG:2154", WKT, PROJ) with an error that names the field.

    Raises:
        CRSMismatchError: if the value is not a CRS that PROJ knows.
    """
    from rasterio.crs import CRS

    if isinstance(value, CRS):
        return value
    try:
        return CRS.from_user_input(value)
    except Exception as exc:  # rasterio raises CRSError subclasses of several kinds
        raise CRSMismatchError(
            f"{field}: {value!r} is not a CRS PROJ understands ({exc}). "
            "Use an authority code such as 'EPSG:2154' or a WKT string."
        ) from exc


@dataclass(frozen=True)
class RegionGrid:
    """A north-up pixel grid: ``width`` × ``height`` pixels of ``resolution`` from (left, top).

    Bounds are snapped to multiples of the resolution so that two regions with the same CRS and
    resolution share pixel edges, and a source already on that lattice is copied exactly.
    """

    crs: str
    resolution: float
    left: float
    top: float
    width: int
    height: int

    @classmethod
    def from_bounds(
        cls, crs: str | CRS, resolution: float, bounds: tuple[float, float, float, float]
    ) -> RegionGrid:
        """Smallest grid on the resolution lattice that covers ``bounds`` (left, bottom, right, top)."""
        left, bottom, right, top = bounds
        res = float(resolution)
        # the small tolerance keeps bounds already on the lattice from gaining a pixel to rounding
        snap_left = math.floor(left / res + 1e-6) * res
        snap_top = math.ceil(top / res - 1e-6) * res
        snap_right = math.ceil(right / res - 1e-6) * res
        snap_bottom = math.floor(bottom / res + 1e-6) * res
        width = max(1, round((snap_right - snap_left) / res))
        height = max(1, round((snap_top - snap_bottom) / res))
        crs_str = crs if isinstance(crs, str) else crs.to_string()
        return cls(crs_str, res, snap_left, snap_top, width, height)

    @property
    def crs_obj(self) -> CRS:
        """The grid CRS as a rasterio CRS."""
        return parse_crs(self.crs)

    @property
    def transform(self) -> Affine:
        """Pixel (col, row) → map (x, y) transform of the pixel corners."""
        return Affine(self.resolution, 0.0, self.left, 0.0, -self.resolution, self.top)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in grid CRS units."""
        return (
            self.left,
            self.top - self.height * self.resolution,
            self.left + self.width * self.resolution,
            self.top,
        )

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return (self.height, self.width)

    def rowcol(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Integer (row, col) of the pixels containing map points; may fall outside the grid."""
        cols = np.floor((np.asarray(xs, dtype=float) - self.left) / self.resolution).astype(
            np.int64
        )
        rows = np.floor((self.top - np.asarray(ys, dtype=float)) / self.resolution).astype(np.int64)
        return rows, cols

    def xy(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map coordinates of pixel centres."""
        xs = self.left + (np.asarray(cols, dtype=float) + 0.5) * self.resolution
        ys = self.top - (np.asarray(rows, dtype=float) + 0.5) * self.resolution
        return xs, ys

    def contains(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Boolean mask of (row, col) pairs inside the grid."""
        rows, cols = np.asarray(rows), np.asarray(cols)
        return (rows >= 0) & (rows < self.height) & (cols >= 0) & (cols < self.width)

    def coarsen(self, factor: int) -> RegionGrid:
        """Grid of ``factor`` × ``factor`` pixel cells (e.g. one cell per model tile)."""
        return RegionGrid(
            self.crs,
            self.resolution * factor,
            self.left,
            self.top,
            math.ceil(self.width / factor),
            math.ceil(self.height / factor),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (stored in manifests and Zarr attributes)."""
        return {
            "crs": self.crs,
            "resolution": self.resolution,
            "left": self.left,
            "top": self.top,
            "width": self.width,
            "height": self.height,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RegionGrid:
        """Inverse of :meth:`to_dict`."""
        return cls(
            str(data["crs"]),
            float(data["resolution"]),
            float(data["left"]),
            float(data["top"]),
            int(data["width"]),
            int(data["height"]),
        )
