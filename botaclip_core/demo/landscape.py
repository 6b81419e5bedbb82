"""The hidden landscape of the demo: elevation, moisture and the habitat map."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from botaclip_core.demo.region import (
    COARSE_PX,
    CONIF,
    DECID,
    ELEV_MIN_M,
    ELEV_RANGE_M,
    GRASS,
    RESOLUTION,
    SCREE,
    WET,
    stream_rng,
)

_CELLS_PER_M = 1 / (COARSE_PX * RESOLUTION)
# habitat, elevation (0–1) where it scores best, and the width of its elevation belt
_ELEVATION_BELTS = (
    (CONIF, 0.46, 0.2),
    (DECID, 0.14, 0.24),
    (GRASS, 0.74, 0.19),
    (SCREE, 0.97, 0.18),
)


@dataclass
class Landscape:
    """The hidden truth every product is drawn from.

    Attributes:
        habitat: (n, n) uint8 habitat codes at 0.5 m.
        habitat_1m: (n/2, n/2) uint8; ``habitat`` is ``habitat_1m`` repeated 2 × 2.
        ground: (n, n) uint8 land-cover class, 0–4 as ``habitat``, 5 = open water.
        elevation_m: (n/8, n/8) float32 elevation at 4 m.
        moisture: (n/8, n/8) float32 moisture in [0, 1] at 4 m.
        elev01: (n, n) float32 elevation scaled to [0, 1] at 0.5 m.

    """

    habitat: np.ndarray
    habitat_1m: np.ndarray
    ground: np.ndarray
    elevation_m: np.ndarray
    moisture: np.ndarray
    elev01: np.ndarray


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation.

    Args:
        rng: generator of the white noise.
        shape: shape of the field.
        sigma: standard deviation of the Gaussian filter, in cells.

    Returns:
        A float32 field of ``shape``.

    """
    field = ndimage.gaussian_filter(
        rng.standard_normal(shape, dtype=np.float32), sigma, mode="reflect"
    )
    return (field / max(float(field.std()), 1e-6)).astype(np.float32)


def upsample(a: np.ndarray, factor: int) -> np.ndarray:
    """Bilinear upsampling of cell-centred values by an integer factor (edges held).

    Args:
        a: 2-D field.
        factor: how many output cells each input cell spans along each axis.

    Returns:
        A float32 field ``factor`` times larger along each axis.

    """

    def axis_weights(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(n * factor, dtype=np.float64) + 0.5) / factor - 0.5
        i0 = np.floor(pos).astype(np.int64)
        w = (pos - i0).astype(np.float32)
        return np.clip(i0, 0, n - 1), np.clip(i0 + 1, 0, n - 1), w

    r0, r1, wr = axis_weights(a.shape[0])
    c0, c1, wc = axis_weights(a.shape[1])
    rows = a[r0] * (1 - wr)[:, None] + a[r1] * wr[:, None]
    return (rows[:, c0] * (1 - wc) + rows[:, c1] * wc).astype(np.float32)


def build_landscape(n: int, seed: int) -> Landscape:
    """Elevation, moisture and the habitat map: smooth fields and thresholded noise.

    Args:
        n: side of the region in 0.5 m pixels (a multiple of 8).
        seed: seed of the demo region.

    Returns:
        The landscape of the region.

    """
    nc = n // COARSE_PX
    elev, moist = _terrain(nc, stream_rng(seed, "terrain"))
    rng = stream_rng(seed, "habitat")
    hab_1m = _habitat_1m(_habitat_scores(elev, moist, rng), rng)
    habitat = np.repeat(np.repeat(hab_1m, 2, axis=0), 2, axis=1)
    pools = upsample(smooth_noise(rng, (nc, nc), 1.5), COARSE_PX) > 1.0
    ground = habitat.copy()
    ground[(habitat == WET) & pools] = 5
    return Landscape(
        habitat=habitat,
        habitat_1m=hab_1m,
        ground=ground,
        elevation_m=(ELEV_MIN_M + ELEV_RANGE_M * elev).astype(np.float32),
        moisture=moist.astype(np.float32),
        elev01=upsample(elev.astype(np.float32), COARSE_PX),
    )


def _terrain(nc: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Elevation and moisture in [0, 1] on the (nc, nc) coarse grid."""
    yy, xx = np.mgrid[0:nc, 0:nc].astype(np.float32) / max(nc - 1, 1)
    relief = 0.14 * smooth_noise(rng, (nc, nc), 150 * _CELLS_PER_M)
    relief += 0.05 * smooth_noise(rng, (nc, nc), 40 * _CELLS_PER_M)
    elev = 0.78 * xx + 0.12 * yy + relief
    elev = (elev - elev.min()) / (elev.max() - elev.min())
    moist = smooth_noise(rng, (nc, nc), 50 * _CELLS_PER_M) + 1.2 * (1 - elev)
    moist = (moist - moist.min()) / (moist.max() - moist.min())
    return elev, moist


def _habitat_scores(elev: np.ndarray, moist: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Suitability (5, nc, nc) of each habitat on the coarse grid, with patchy noise."""
    nc = elev.shape[0]
    scores = np.empty((5, nc, nc), dtype=np.float32)
    for h, mu, width in _ELEVATION_BELTS:
        scores[h] = -(((elev - mu) / width) ** 2)
    scores[WET] = 9.0 * (moist - 0.86)
    for h in range(5):
        scores[h] += 0.55 * smooth_noise(rng, (nc, nc), 30 * _CELLS_PER_M)
        scores[h] += 0.3 * smooth_noise(rng, (nc, nc), 10 * _CELLS_PER_M)
    return scores


def _habitat_1m(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The best-scoring habitat of each 1 m cell."""
    # argmax on a 1 m grid with a little fine noise gives ragged, natural patch edges
    up = COARSE_PX // 2
    side = scores.shape[1] * up
    best = np.full((side, side), -np.inf, dtype=np.float32)
    hab_1m = np.zeros((side, side), dtype=np.uint8)
    for h in range(5):
        s = upsample(scores[h], up) + 0.1 * smooth_noise(rng, (side, side), 2.0)
        better = s > best
        best[better] = s[better]
        hab_1m[better] = h
    return hab_1m
