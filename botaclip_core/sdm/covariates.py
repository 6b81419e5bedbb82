"""Environmental covariate rasters as a feature source: sampled at points, encoded for models.

Each covariate is one band of a raster in any CRS. Points (sites, background points, map cell
centres) are given in the region's CRS and sampled where they fall (nearest pixel); nodata and
points outside the raster are NaN. Continuous covariates are z-scored and categorical ones
one-hot encoded, both from the background points (the landscape), so that every species and
fold shares one encoding, as the embedding sources share one projection.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from pyproj import CRS, Transformer
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from botaclip_core.errors import InputDataError

logger = logging.getLogger(__name__)

#: Raster pixels per side of the windows read around points.
READ_TILE = 1024
#: Most classes a categorical covariate may have among the background points.
MAX_LEVELS = 64


@dataclass(frozen=True)
class Layer:
    """One covariate: its name, raster, band and whether its values are classes."""

    name: str
    path: Path
    categorical: bool = False
    band: int = 1


def sample_layers(layers: Sequence[Layer], xy: np.ndarray, crs: str) -> np.ndarray:
    """Raw covariate values ``(n, len(layers))`` at points ``xy`` (region CRS); NaN where none.

    Raises:
        InputDataError: a raster that cannot be read, lacks a CRS or the band, naming the file.
    """
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    out = np.full((len(xy), len(layers)), np.nan)
    for k, layer in enumerate(layers):
        out[:, k] = _sample(layer, xy, crs)
    return out


def _sample(layer: Layer, xy: np.ndarray, crs: str) -> np.ndarray:
    try:
        ds = rasterio.open(layer.path)
    except RasterioIOError as exc:
        raise InputDataError(
            f"covariate {layer.name!r}: {layer.path} cannot be read as a raster ({exc}); fix "
            "the file or its 'path' under the region's covariates"
        ) from None
    with ds:
        if ds.crs is None:
            raise InputDataError(
                f"covariate {layer.name!r}: {layer.path} has no CRS; assign one (e.g. gdal_edit.py "
                "-a_srs EPSG:2154) so that it can be sampled at the sites"
            )
        if layer.band > ds.count:
            raise InputDataError(
                f"covariate {layer.name!r}: {layer.path} has {ds.count} band(s), not band "
                f"{layer.band}; set 'band' to 1..{ds.count}"
            )
        x, y = xy[:, 0], xy[:, 1]
        if CRS.from_user_input(crs) != ds.crs:
            x, y = Transformer.from_crs(crs, ds.crs, always_xy=True).transform(x, y)
        cols, rows = ~ds.transform * (np.asarray(x), np.asarray(y))
        rows, cols = np.floor(rows).astype(np.int64), np.floor(cols).astype(np.int64)
        inside = (rows >= 0) & (rows < ds.height) & (cols >= 0) & (cols < ds.width)
        values = np.full(len(xy), np.nan)
        # read the raster in tiles that hold points: memory bounded however large the raster
        index = np.flatnonzero(inside)
        tiles = np.stack([rows[index] // READ_TILE, cols[index] // READ_TILE], axis=1)
        for ty, tx in np.unique(tiles, axis=0):
            here = index[(tiles[:, 0] == ty) & (tiles[:, 1] == tx)]
            r0, c0 = int(ty) * READ_TILE, int(tx) * READ_TILE
            window = Window(c0, r0, min(READ_TILE, ds.width - c0), min(READ_TILE, ds.height - r0))
            data = ds.read(layer.band, window=window, masked=True)
            picked = data[rows[here] - r0, cols[here] - c0]
            values[here] = np.ma.filled(picked.astype(float), np.nan)
        return values


@dataclass
class Encoder:
    """Z-scores of continuous covariates and one-hot columns of categorical ones.

    Attributes:
        layers: the covariates.
        mean: background mean of each continuous covariate (NaN for categorical ones).
        scale: background standard deviation of each continuous covariate.
        levels: the classes of each categorical covariate, sorted (empty for continuous ones).
    """

    layers: list[Layer]
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scale: np.ndarray = field(default_factory=lambda: np.zeros(0))
    levels: list[list[float]] = field(default_factory=list)

    @classmethod
    def fit(cls, layers: Sequence[Layer], raw: np.ndarray) -> Encoder:
        """Fit on raw values of the background points.

        Raises:
            InputDataError: a covariate with no value at any background point (the raster does
                not cover the region), or a categorical one with too many classes.
        """
        layers = list(layers)
        mean, scale, levels = np.full(len(layers), np.nan), np.ones(len(layers)), []
        for k, layer in enumerate(layers):
            values = raw[:, k][~np.isnan(raw[:, k])]
            if not len(values):
                raise InputDataError(
                    f"covariate {layer.name!r}: {layer.path} has no value at any of the "
                    f"{len(raw)} background points; does it cover the region (and is its "
                    "nodata value right)?"
                )
            if layer.categorical:
                classes = np.unique(values)
                if len(classes) > MAX_LEVELS:
                    raise InputDataError(
                        f"covariate {layer.name!r}: {len(classes)} classes in {layer.path}; a "
                        f"categorical covariate may have at most {MAX_LEVELS}. Is it continuous "
                        "(set categorical: false)?"
                    )
                levels.append([float(c) for c in classes])
            else:
                levels.append([])
                mean[k] = float(values.mean())
                scale[k] = float(values.std()) or 1.0
        return cls(layers, mean, scale, levels)

    @property
    def columns(self) -> list[str]:
        """Names of the encoded columns (``geology=3`` for a class)."""
        names = []
        for layer, levels in zip(self.layers, self.levels, strict=True):
            if layer.categorical:
                names += [f"{layer.name}={level:g}" for level in levels]
            else:
                names.append(layer.name)
        return names

    def transform(self, raw: np.ndarray) -> np.ndarray:
        """Encoded rows of raw values; a row with any NaN covariate stays NaN throughout.

        A class not seen among the background points gets zeros in every one-hot column.
        """
        raw = np.asarray(raw, dtype=float).reshape(-1, len(self.layers))
        parts = []
        for k, layer in enumerate(self.layers):
            if layer.categorical:
                parts.append(
                    np.column_stack([raw[:, k] == level for level in self.levels[k]]).astype(float)
                )
            else:
                parts.append(((raw[:, k] - self.mean[k]) / self.scale[k])[:, None])
        out = np.hstack(parts)
        out[np.isnan(raw).any(axis=1)] = np.nan
        return out
