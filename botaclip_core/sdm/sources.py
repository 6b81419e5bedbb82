"""Feature sources of the species models: embedding stores, covariate rasters, combinations.

Every source gives the same three things: its features at sites (:meth:`FeatureSource.at`),
at the background points that stand for the landscape (:attr:`FeatureSource.landscape`), and
what a prediction map of it needs (:meth:`FeatureSource.map_inputs`). An embedding store's
features are standardised and projected on its principal components, fitted on the background
points; covariates are z-scored or one-hot encoded on them; a combination
(``botaclip+covariates``) puts its parts' columns side by side.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from botaclip_core.catalog import DownstreamSettings
from botaclip_core.grid import RegionGrid
from botaclip_core.sdm.covariates import Encoder, Layer, sample_layers

logger = logging.getLogger(__name__)


@dataclass
class Background:
    """Background points: image pixels and their map coordinates (region CRS)."""

    rows: np.ndarray
    cols: np.ndarray
    xy: np.ndarray


@dataclass
class MapInputs:
    """What :func:`botaclip_core.sdm.maps.predict_map` needs to map a source.

    Attributes:
        store: the feature store whose cell grid the map has.
        transform: stored features (and ``extra``'s) of cells → the source's features.
        extra: ``(y0, x0, h, w)`` → ``(E, h, w)`` more raw features of a block of cells.
    """

    store: Path
    transform: Callable[[np.ndarray], np.ndarray]
    extra: Callable[[int, int, int, int], np.ndarray] | None = None


class FeatureSource:
    """A source of features: subclasses define :meth:`features` and :attr:`landscape`."""

    landscape: np.ndarray

    def features(self, rows: np.ndarray, cols: np.ndarray, xy: np.ndarray) -> np.ndarray:
        """``(n, D)`` features at pixels ``(rows, cols)`` / points ``xy``; NaN rows: none there."""
        raise NotImplementedError

    def at(
        self, rows: np.ndarray, cols: np.ndarray, xy: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Which sites have features, and the features of those that do."""
        X = self.features(rows, cols, xy)
        ok = ~np.isnan(X).any(axis=1)
        return ok, X[ok]

    def map_inputs(self) -> MapInputs | None:
        """How to map this source, or None where it cannot be mapped."""
        return None


class StoreSource(FeatureSource):
    """An embedding (or spectral) store, projected with a PCA fitted on the background."""

    def __init__(self, path: Path, background: Background, opts: DownstreamSettings) -> None:
        from botaclip_core.downstream import fit_projector

        self.path = path
        raw = _sample_store(path, background.rows, background.cols)
        ok = ~np.isnan(raw).any(axis=1)
        self.projector = fit_projector(raw[ok], opts)
        # background points where this source has no value (spectral: no valid pixel) get the
        # projected mean (zero), so that every source sees the same points
        self.landscape = np.zeros((len(raw), self.projector.transform(raw[ok][:1]).shape[1]))
        self.landscape[ok] = self.projector.transform(raw[ok])

    def features(self, rows: np.ndarray, cols: np.ndarray, xy: np.ndarray) -> np.ndarray:
        """Projected features of the cells holding the pixels."""
        raw = _sample_store(self.path, rows, cols)
        ok = ~np.isnan(raw).any(axis=1)
        projected = self.projector.transform(raw[ok] if ok.any() else raw[:1] * 0)
        # in the projection's own dtype (float32 from a float32 store): the models see the
        # same numbers whether or not some sites lack features
        out = np.full((len(raw), projected.shape[1]), np.nan, dtype=projected.dtype)
        if ok.any():
            out[ok] = projected
        return out

    def map_inputs(self) -> MapInputs:
        """The store's own cells, projected."""
        return MapInputs(self.path, self.projector.transform)


class CovariateSource(FeatureSource):
    """The region's covariate rasters, sampled at the sites' own coordinates."""

    def __init__(
        self, layers: Sequence[Layer], grid: RegionGrid, background: Background, cell_store: Path
    ) -> None:
        from botaclip_core.embedding_store import EmbeddingStore

        self.layers, self.grid, self.cell_store = list(layers), grid, cell_store
        self.cell_m = (
            EmbeddingStore(cell_store).cell_px * grid.resolution
        )  # read once, not per block
        raw = sample_layers(self.layers, background.xy, grid.crs)
        self.encoder = Encoder.fit(self.layers, raw)
        encoded = self.encoder.transform(raw)
        # a background point off a covariate raster gets the landscape's mean (zeros)
        self.landscape = np.where(np.isnan(encoded), 0.0, encoded)

    def features(self, rows: np.ndarray, cols: np.ndarray, xy: np.ndarray) -> np.ndarray:
        """Encoded covariates at the points themselves."""
        return self.encoder.transform(sample_layers(self.layers, xy, self.grid.crs))

    def block(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Raw covariates ``(K, h, w)`` at the centres of a block of map cells."""
        size = self.cell_m
        cy, cx = np.mgrid[y0 : y0 + h, x0 : x0 + w]
        xs = self.grid.left + (cx.ravel() + 0.5) * size
        ys = self.grid.top - (cy.ravel() + 0.5) * size
        raw = sample_layers(self.layers, np.column_stack([xs, ys]), self.grid.crs)
        return raw.T.reshape(len(self.layers), h, w)

    def map_inputs(self) -> MapInputs:
        """The covariates at the cell centres of the embedding grid (its cells with features)."""
        skip = _store_dim(self.cell_store)  # the cell store's own features come first
        return MapInputs(
            self.cell_store, lambda rows: self.encoder.transform(rows[:, skip:]), self.block
        )


class CombinedSource(FeatureSource):
    """Several sources side by side (``botaclip+covariates``)."""

    def __init__(self, parts: Sequence[FeatureSource]) -> None:
        self.parts = list(parts)
        self.landscape = np.hstack([p.landscape for p in self.parts])

    def features(self, rows: np.ndarray, cols: np.ndarray, xy: np.ndarray) -> np.ndarray:
        """The parts' features side by side (NaN where any part has none)."""
        return np.hstack([p.features(rows, cols, xy) for p in self.parts])

    def map_inputs(self) -> MapInputs | None:
        """One store and the covariates can be mapped; two stores cannot (one grid each)."""
        stores = [p for p in self.parts if isinstance(p, StoreSource)]
        covs = [p for p in self.parts if isinstance(p, CovariateSource)]
        if len(stores) != 1 or len(covs) != len(self.parts) - 1:
            return None
        store, dim = stores[0], _store_dim(stores[0].path)

        def transform(rows: np.ndarray) -> np.ndarray:
            return np.hstack(
                [
                    p.projector.transform(rows[:, :dim])
                    if isinstance(p, StoreSource)
                    else covs[0].encoder.transform(rows[:, dim:])
                    for p in self.parts
                ]
            )

        return MapInputs(store.path, transform, covs[0].block if covs else None)


def _store_dim(path: Path) -> int:
    """Features per cell of a store (before projection)."""
    from botaclip_core.embedding_store import EmbeddingStore

    return int(EmbeddingStore(path).dim)


def _sample_store(path: Path, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Features (dequantized) of the cells holding image pixels (rows, cols)."""
    from botaclip_core.embed import sample_embeddings

    return sample_embeddings(path, rows, cols)
