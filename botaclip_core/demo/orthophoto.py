"""Rendering of the demo's 4-band orthophoto mosaic: trees, shading, shadows and texture."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from botaclip_core.demo.landscape import Landscape, smooth_noise, upsample
from botaclip_core.demo.region import COARSE_PX, GRASS, RESOLUTION, stream_rng

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


@dataclass
class _Canopy:
    """The tree crowns of the region, one layer per tree kind (conifer, broadleaf, shrub)."""

    alphas: list[np.ndarray]  # (n, n) crown opacity in [0, 1] of each kind
    surface: np.ndarray  # (n, n) height of the crown domes, px
    height: np.ndarray  # (n, n) tree height above the ground, px


def render_mosaic(land: Landscape, seed: int) -> np.ndarray:
    """Render the 4-band orthophoto mosaic of the landscape.

    Args:
        land: the landscape to render.
        seed: seed of the demo region.

    Returns:
        A (4, n, n) uint8 array of R, G, B, NIR digital numbers in 1–255.

    """
    canopy = _grow_trees(land.habitat, stream_rng(seed, "trees"))
    sunlit = _crown_sunlight(canopy.surface)
    light = _shadow_light(canopy.height)
    rng = stream_rng(seed, "texture")
    texture = _ground_texture(land.ground, rng)
    alphas = canopy.alphas
    cover = np.clip(alphas[0] + alphas[1] + alphas[2], 0, 1)
    alpha_sum = alphas[0] + alphas[1] + alphas[2] + 1e-6
    shading = light * _terrain_shading(land.elevation_m)
    ground_weight = texture * (1 - cover) * shading
    crown_weight = cover / alpha_sum * sunlit * shading
    return _compose_bands(land, alphas, ground_weight, crown_weight, rng)


def _grow_trees(habitat: np.ndarray, rng: np.random.Generator) -> _Canopy:
    """Crowns of the trees that each habitat grows, at most one per cell of a jittered grid."""
    n = habitat.shape[0]
    # one tree per grid cell at most keeps the crowns mostly apart
    surface = np.zeros((n, n), dtype=np.float32)
    height = np.zeros((n, n), dtype=np.float32)
    alphas: list[np.ndarray] = []
    for k in range(3):
        cell = _TREE_CELL_PX[k]
        m = -(-n // cell)
        offsets = rng.integers(cell // 4, cell - cell // 4, size=(2, m, m))
        rows = np.minimum(np.arange(m)[:, None] * cell + offsets[0], n - 1)
        cols = np.minimum(np.arange(m)[None, :] * cell + offsets[1], n - 1)
        trees = rng.random((m, m)) < _TREE_PROB[habitat[rows, cols], k]
        impulses = np.zeros((n, n), dtype=np.float32)
        impulses[rows[trees], cols[trees]] = rng.uniform(0.75, 1.1, int(trees.sum()))
        sigma = _CROWN_SIGMA_PX[k]
        crowns = ndimage.gaussian_filter(impulses, sigma, truncate=2.5) * (2 * math.pi * sigma**2)
        crowns = np.minimum(crowns, 1.2)
        surface += _CROWN_RELIEF[k] * sigma * crowns
        height += _TREE_HEIGHT_PX[k] * crowns
        alphas.append(np.clip((crowns - 0.15) / 0.25, 0, 1))
    return _Canopy(alphas=alphas, surface=surface, height=height)


def _shift(a: np.ndarray, dr: int, dc: int) -> np.ndarray:
    """``out[r, c] = a[r + dr, c + dc]``, with the edge values held outside the array."""
    h, w = a.shape
    if dc == 0:
        return a[np.clip(np.arange(h) + dr, 0, h - 1)]
    cols = np.clip(np.arange(w) + dc, 0, w - 1)
    return (a if dr == 0 else _shift(a, dr, 0))[:, cols]


def _crown_sunlight(surface: np.ndarray) -> np.ndarray:
    """Lambertian shading of the crown domes by the high south-south-eastern sun."""
    sun_col, sun_row, sun_up = _SUN
    dz_col = 0.5 * (_shift(surface, 0, 1) - _shift(surface, 0, -1))
    dz_row = 0.5 * (_shift(surface, 1, 0) - _shift(surface, -1, 0))
    lambert = (sun_up - sun_col * dz_col - sun_row * dz_row) / np.sqrt(1 + dz_col**2 + dz_row**2)
    return 0.25 + 0.9 * np.clip(lambert, 0, None) / sun_up


def _shadow_light(height: np.ndarray) -> np.ndarray:
    """Light left by cast shadows: 1 in the open, 0.4 where a tree hides the sun."""
    sun_col, sun_row, sun_up = _SUN
    rise = sun_up / math.hypot(sun_col, sun_row)
    shadow = np.zeros(height.shape, dtype=np.float32)
    # a pixel is shaded when a tree towards the sun rises above the sun's ray
    for t in (2, 4, 6):
        dr, dc = (
            round(t * sun_row / math.hypot(sun_col, sun_row)),
            round(t * sun_col / math.hypot(sun_col, sun_row)),
        )
        blocked = _shift(height, dr, dc) - height - rise * math.hypot(dr, dc)
        shadow = np.maximum(shadow, np.clip(blocked / 2.0, 0, 1))
    return 1 - 0.6 * shadow


def _ground_texture(ground: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness factor of the ground: speckle, mottling and, on scree, blocks and boulders."""
    n = ground.shape[0]
    fine = ndimage.gaussian_filter(rng.standard_normal((n, n), dtype=np.float32), 0.6)
    fine /= max(float(fine.std()), 1e-6)
    nc = n // COARSE_PX
    mottle = upsample(smooth_noise(rng, (nc, nc), 0.8), COARSE_PX)
    nb = -(-n // 3)
    blocks = np.repeat(np.repeat(rng.standard_normal((nb, nb), dtype=np.float32), 3, 0), 3, 1)
    boulders = np.repeat(np.repeat(rng.standard_normal((nc, nc), dtype=np.float32), 8, 0), 8, 1)
    texture = 1 + _FINE_AMP[ground] * fine + _MOTTLE_AMP[ground] * mottle
    texture += _BLOCK_AMP[ground] * (blocks[:n, :n] + 0.6 * boulders)
    return texture


def _terrain_shading(elevation_m: np.ndarray) -> np.ndarray:
    """Gentle hill shading at 0.5 m from the 4 m elevation: slopes facing south-east are brighter."""
    gy, gx = np.gradient(elevation_m, COARSE_PX * RESOLUTION)
    return upsample(
        np.clip(1 + 0.25 * (gx * 0.5 - gy * 0.7), 0.85, 1.15).astype(np.float32), COARSE_PX
    )


def _compose_bands(
    land: Landscape,
    alphas: list[np.ndarray],
    ground_weight: np.ndarray,
    crown_weight: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Mix ground and crown colours with their weights and add sensor noise, band by band."""
    g = land.ground
    n = g.shape[0]
    turf = np.where(g == GRASS, np.clip((land.elev01 - 0.6) / 0.35, 0, 1), 0).astype(np.float32)
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
