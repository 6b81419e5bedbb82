"""Placing survey sites on the demo landscape and reading the landscape around them."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from botaclip_core.demo.landscape import Landscape
from botaclip_core.demo.region import COARSE_PX, ORIGIN, RESOLUTION, TILE_PX
from botaclip_core.errors import StageError

PLOT_RADIUS_PX = 20  # a relevé's habitat is read in ±10 m
_STAND_PURITY = 0.75  # share of one habitat around a relevé plot


class SiteSampler:
    """Draws site locations on the 1 m habitat grid and reads the landscape around them.

    Attributes:
        land: the landscape the sites are drawn on.
        n: side of the region in 0.5 m pixels.
        valid_1m: (n/2, n/2) 1 m cells whose four pixels are all outside the nodata collar.
        interior_1m: 1 m cells whose whole ±10 m neighbourhood is valid.
        stand_1m: the dominant habitat within ±10 m of each 1 m cell.
        homogeneous_1m: 1 m cells whose ±10 m neighbourhood is mostly one habitat.
        releve_band_1m: 1 m cells in the east–west strips reserved for relevés.

    """

    def __init__(self, land: Landscape, valid: np.ndarray) -> None:
        self.land = land
        self.n = land.habitat.shape[0]
        valid_1m = valid[::2, ::2] & valid[1::2, ::2] & valid[::2, 1::2] & valid[1::2, 1::2]
        self.valid_1m = valid_1m
        window = 2 * (PLOT_RADIUS_PX // 2) + 1  # ±10 m in 1 m cells
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

        Args:
            rng: generator of the draws.
            count: number of points.
            allowed: (n/2, n/2) boolean mask of the 1 m cells the points may fall in.
            min_spacing_m: distance between points; relaxed when the allowed cells are crowded.
            stratify: draw the habitat first, ∝ √(its area), instead of ∝ its area.
            avoid_xy: (k, 2) points the new points keep away from.
            avoid_m: distance to keep from ``avoid_xy``, in metres.

        Returns:
            A (count, 2) array of x, y in the region's CRS, rounded to 1 cm.

        Raises:
            StageError: if no allowed cell is left.

        """
        if avoid_xy is not None and len(avoid_xy):
            allowed = allowed & self._away_from(avoid_xy, avoid_m)
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

    def _away_from(self, avoid_xy: np.ndarray, avoid_m: float) -> np.ndarray:
        """1 m cells whose every point is at least ``avoid_m`` from each of ``avoid_xy``."""
        occupied = np.zeros(self.valid_1m.shape, dtype=bool)
        rows, cols = self.pixel(avoid_xy)
        occupied[rows // 2, cols // 2] = True
        # cell centres to the nearest occupied cell centre, in metres (1 m cells); two points
        # are each within 0.71 m of their cell centres, hence the 1.5 m margin
        distance = ndimage.distance_transform_edt(~occupied)
        return np.asarray(distance >= avoid_m + 1.5)

    def _cell_xy(
        self, cells: np.ndarray, jitter: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates of 1 m cells (flat indices): their centres, or ``jitter`` (0–1) within them."""
        rows, cols = np.divmod(cells, self.n // 2)
        ju, jv = (0.5, 0.5) if jitter is None else (jitter[0], jitter[1])
        x = ORIGIN[0] + (cols + ju) * 2 * RESOLUTION
        y = ORIGIN[1] - (rows + jv) * 2 * RESOLUTION
        return x, y

    def pixel(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row and column (0.5 m pixels) of (x, y) points inside the region.

        Args:
            xy: (k, 2) points in the region's CRS.

        Returns:
            The rows and the columns, clipped to the region.

        """
        cols = np.floor((xy[:, 0] - ORIGIN[0]) / RESOLUTION).astype(np.int64)
        rows = np.floor((ORIGIN[1] - xy[:, 1]) / RESOLUTION).astype(np.int64)
        return np.clip(rows, 0, self.n - 1), np.clip(cols, 0, self.n - 1)

    def neighbourhood(
        self, xy: np.ndarray, radius_px: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The habitats around points and the environment at them.

        Args:
            xy: (k, 2) points in the region's CRS.
            radius_px: half-width of the square window read around each point, in pixels.

        Returns:
            Habitat fractions (k, 5) within ``radius_px`` of each point, elevation (m) and
            moisture (0–1) of each point.

        """
        fractions = np.zeros((len(xy), 5))
        rows, cols = self.pixel(xy)
        for k, (r, c) in enumerate(zip(rows, cols, strict=True)):
            window = self.land.habitat[
                max(0, r - radius_px) : r + radius_px + 1, max(0, c - radius_px) : c + radius_px + 1
            ]
            fractions[k] = np.bincount(window.ravel(), minlength=5)[:5] / window.size
        coarse = (rows // COARSE_PX, cols // COARSE_PX)
        return (
            fractions,
            self.land.elevation_m[coarse].astype(float),
            self.land.moisture[coarse].astype(float),
        )
