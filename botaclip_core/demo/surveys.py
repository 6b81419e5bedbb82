"""The demo's field data: relevés, plant surveys, butterfly records and soil samples."""

from __future__ import annotations

import math

import geopandas as gpd
import numpy as np
import pandas as pd
from pyproj import Transformer
from scipy import ndimage
from shapely import points

from botaclip_core.demo.region import (
    COARSE_PX,
    CRS_CODE,
    ELEV_MIN_M,
    ELEV_RANGE_M,
    HABITATS,
    ORIGIN,
    RESOLUTION,
    stream_rng,
)
from botaclip_core.demo.sites import PLOT_RADIUS_PX, SiteSampler
from botaclip_core.demo.species import (
    BUTTERFLIES,
    PLANTS,
    SOIL_DISPERSION,
    SOIL_GROUPS,
    butterfly_suitability,
    plant_probabilities,
)

_MIN_SITE_DISTANCE_M = 55.0  # plant surveys vs relevés; the contract promises ≥ 50 m
# Braun-Blanquet classes (r, +, 1, 2, 3, 4, 5) as cover percentages.
_BRAUN_BLANQUET = np.array([0.1, 0.5, 3.0, 15.0, 37.5, 62.5, 87.5])
_BB_THRESHOLDS = np.array([-1.6, -0.6, 0.6, 1.5, 2.2, 2.9])
_BUTTERFLY_CELL_PX = 16  # 8 m cells; butterflies use the habitats within ~25 m


def draw_releves(
    sampler: SiteSampler, count: int, seed: int
) -> tuple[gpd.GeoDataFrame, np.ndarray]:
    """Relevé plots (stratified by habitat) with species and Braun-Blanquet cover.

    Args:
        sampler: places the plots on the landscape.
        count: number of plots.
        seed: seed of the demo region.

    Returns:
        One row per plot × species (``plot_id``, ``species``, ``cover``, ``habitat``, point
        geometry) and the (count, 2) plot locations.

    """
    rng = stream_rng(seed, "releves")
    allowed = sampler.interior_1m & sampler.releve_band_1m & sampler.homogeneous_1m
    xy = sampler.draw(rng, count, allowed, min_spacing_m=10.0, stratify=True)
    fractions, elev, _ = sampler.neighbourhood(xy, PLOT_RADIUS_PX)
    prob = plant_probabilities(fractions, elev)
    present = rng.random(prob.shape) < prob
    for poor in np.flatnonzero(present.sum(axis=1) < 3):  # a relevé lists three species or more
        present[poor, np.argsort(-prob[poor], kind="stable")[:3]] = True
    dominance = np.array([p[5] for p in PLANTS], dtype=float)
    score = np.log(dominance)[None, :] + 1.2 * np.log(prob + 0.05) + rng.normal(0, 0.8, prob.shape)
    cover = _BRAUN_BLANQUET[np.digitize(score + 1.0, _BB_THRESHOLDS)]
    rows = []
    for k in range(len(xy)):
        plot = f"R{k + 1:04d}"
        habitat = HABITATS[int(np.argmax(fractions[k]))]
        for s in np.flatnonzero(present[k]):
            rows.append((plot, PLANTS[s][0], float(cover[k, s]), habitat, xy[k, 0], xy[k, 1]))
    frame = pd.DataFrame(rows, columns=["plot_id", "species", "cover", "habitat", "x", "y"])
    geometry = points(frame["x"].to_numpy(), frame["y"].to_numpy())
    gdf = gpd.GeoDataFrame(frame.drop(columns=["x", "y"]), geometry=geometry, crs=CRS_CODE)
    return gdf, xy


def draw_plant_surveys(
    sampler: SiteSampler, plots_xy: np.ndarray, count: int, seed: int
) -> gpd.GeoDataFrame:
    """Presence/absence of the ~20 most balanced species at sites ≥ 50 m from every relevé.

    Args:
        sampler: places the sites on the landscape.
        plots_xy: (k, 2) relevé plot locations the sites keep away from.
        count: number of sites.
        seed: seed of the demo region.

    Returns:
        One row per site × species (``site_id``, ``species``, ``present`` 0/1, point geometry).

    """
    rng = stream_rng(seed, "plants")
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
    fractions, elev, _ = sampler.neighbourhood(xy, PLOT_RADIUS_PX)
    detection = 0.9  # surveyors miss some species
    present = rng.random((len(xy), len(PLANTS))) < detection * plant_probabilities(fractions, elev)
    prevalence = present.mean(axis=0)
    balance = np.minimum(prevalence, 1 - prevalence)
    chosen = sorted(np.argsort(-balance, kind="stable")[:20], key=lambda s: PLANTS[s][0])
    site_ids = [f"P{k + 1:04d}" for k in range(len(xy))]
    frame = pd.DataFrame(
        {
            "site_id": np.repeat(site_ids, len(chosen)),
            "species": np.tile([PLANTS[s][0] for s in chosen], len(xy)),
            "present": present[:, chosen].astype(np.int64).ravel(),
        }
    )
    geometry = points(np.repeat(xy[:, 0], len(chosen)), np.repeat(xy[:, 1], len(chosen)))
    return gpd.GeoDataFrame(frame, geometry=geometry, crs=CRS_CODE)


def draw_butterflies(sampler: SiteSampler, count: int, seed: int) -> pd.DataFrame:
    """Presence-only records, located ∝ each species' suitability, in WGS84.

    Args:
        sampler: gives the landscape and where records may fall.
        count: number of records, at least a few of each species.
        seed: seed of the demo region.

    Returns:
        One row per record, in no order: ``record_id``, ``species``, ``lon``, ``lat``.

    """
    rng = stream_rng(seed, "butterflies")
    cells, m, suit = _butterfly_cells(sampler)
    abundance = np.array([b[4] for b in BUTTERFLIES])
    minimum = min(5, count // len(BUTTERFLIES))
    counts = minimum + rng.multinomial(
        count - minimum * len(BUTTERFLIES), abundance / abundance.sum()
    )
    cell = _BUTTERFLY_CELL_PX
    rows = []
    for s, (name, *_rest) in enumerate(BUTTERFLIES):
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


def draw_butterfly_transects(sampler: SiteSampler, count: int, seed: int) -> pd.DataFrame:
    """Presence/absence of every butterfly on transects at random places: the records' test set.

    A transect walks one 8 m cell; a species is seen there with probability 0.9 × its
    suitability relative to its 95th percentile over the region (at most 0.95), so that the
    records (drawn ∝ suitability², :func:`draw_butterflies`) and the transects tell the same
    story from independent draws.

    Args:
        sampler: gives the landscape and where transects may lie.
        count: number of transects.
        seed: seed of the demo region.

    Returns:
        One row per transect × species: ``site_id``, ``species``, ``present`` (0/1), ``x``,
        ``y`` (the region CRS).

    """
    rng = stream_rng(seed, "transects")
    cells, m, suit = _butterfly_cells(sampler)
    picks = rng.choice(len(cells), size=min(count, len(cells)), replace=False)
    relative = suit[picks] / np.maximum(np.quantile(suit, 0.95, axis=0), 1e-9)
    seen = rng.random(relative.shape) < np.minimum(0.9 * relative, 0.95)
    r, c = np.divmod(cells[picks], m)
    cell = _BUTTERFLY_CELL_PX * RESOLUTION
    x, y = ORIGIN[0] + (c + 0.5) * cell, ORIGIN[1] - (r + 0.5) * cell
    names = [b[0] for b in BUTTERFLIES]
    return pd.DataFrame(
        {
            "site_id": np.repeat([f"T{k + 1:04d}" for k in range(len(picks))], len(names)),
            "species": np.tile(names, len(picks)),
            "present": seen.astype(np.int64).ravel(),
            "x": np.repeat(np.round(x, 2), len(names)),
            "y": np.repeat(np.round(y, 2), len(names)),
        }
    )


def _butterfly_cells(sampler: SiteSampler) -> tuple[np.ndarray, int, np.ndarray]:
    """Valid 8 m cells (flat indices), cells per side, and each species' suitability there."""
    land = sampler.land
    cell = _BUTTERFLY_CELL_PX
    m = land.habitat.shape[0] // cell
    fractions = np.stack(
        [(land.habitat == h).reshape(m, cell, m, cell).mean(axis=(1, 3)) for h in range(5)], axis=-1
    )
    fractions = ndimage.gaussian_filter(fractions, sigma=(2.0, 2.0, 0.0), mode="nearest")
    step = cell // COARSE_PX
    elev = land.elevation_m.reshape(m, step, m, step).mean(axis=(1, 3))
    ok = sampler.valid_1m.reshape(m, cell // 2, m, cell // 2).all(axis=(1, 3)).ravel()
    cells = np.flatnonzero(ok)
    return cells, m, butterfly_suitability(fractions.reshape(-1, 5)[cells], elev.ravel()[cells])


def draw_soil(sampler: SiteSampler, count: int, seed: int) -> pd.DataFrame:
    """Trophic-group counts that follow habitat, elevation and moisture (negative binomial).

    Args:
        sampler: places the samples on the landscape.
        count: number of soil samples.
        seed: seed of the demo region.

    Returns:
        One row per sample × trophic group: ``sample_id``, ``x``, ``y``, ``trophic_group``,
        ``abundance``.

    """
    rng = stream_rng(seed, "soil")
    xy = sampler.draw(rng, count, sampler.valid_1m, min_spacing_m=10.0, stratify=False)
    fractions, elev, moist = sampler.neighbourhood(xy, 10)  # a soil core reflects ±5 m
    elev01 = (elev - ELEV_MIN_M) / ELEV_RANGE_M
    rows = []
    for k in range(len(xy)):
        for name, means in SOIL_GROUPS:
            mu = float(fractions[k] @ np.array(means)) * math.exp(-0.8 * (elev01[k] - 0.5))
            if name == "bacterivores":
                mu *= 0.7 + 0.6 * moist[k]
            p = SOIL_DISPERSION / (SOIL_DISPERSION + mu)
            rows.append(
                (
                    f"S{k + 1:03d}",
                    xy[k, 0],
                    xy[k, 1],
                    name,
                    int(rng.negative_binomial(SOIL_DISPERSION, p)),
                )
            )
    return pd.DataFrame(rows, columns=["sample_id", "x", "y", "trophic_group", "abundance"])
