"""The demo region's size presets, grid, bands, habitat classes and seeded random streams."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Bumped whenever the generated data change; part of ``_SUCCESS.json``.
GENERATOR_VERSION = "2"  # 2: covariate rasters, butterfly transects (test set)

CRS_CODE = "EPSG:2154"
RESOLUTION = 0.5
TILE_PX = 224
# upper-left corner in Lambert-93 (Belledonne, Isère), on the 112 m lattice of 224-px tiles
ORIGIN = (915040.0, 6458032.0)
BANDS = ("red", "green", "blue", "nir")
WAVELENGTHS_UM = (0.665, 0.56, 0.49, 0.842)

HABITATS = ("coniferous forest", "deciduous forest", "grassland", "scree", "wetland")
CONIF, DECID, GRASS, SCREE, WET = range(5)
ELEV_MIN_M, ELEV_RANGE_M = 1200.0, 1100.0

COARSE_PX = 8  # px per cell of the smooth environmental fields (4 m)

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
    "transects": 10,
    "geology": 11,
}


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
        n_transect_sites: butterfly transects (presence/absence): the records' test set.

    """

    tiles: int
    sheets: int
    n_releves: int
    n_plant_sites: int
    n_butterfly_records: int
    n_soil_sites: int
    n_transect_sites: int

    @property
    def pixels(self) -> int:
        """Side of the square region in 0.5 m pixels."""
        return self.tiles * TILE_PX

    @property
    def extent_m(self) -> float:
        """Side of the square region in metres."""
        return self.pixels * RESOLUTION


DEMO_SIZES: dict[str, DemoSize] = {
    "default": DemoSize(12, 3, 240, 200, 300, 80, 150),
    "tiny": DemoSize(2, 2, 60, 60, 80, 30, 40),
}


def stream_rng(seed: int, stream: str) -> np.random.Generator:
    """The random generator of one product, independent of every other product's.

    Args:
        seed: seed of the demo region.
        stream: a product name: terrain, habitat, trees, texture, collar, releves, plants,
            butterflies, transects, soil or geology.

    Returns:
        A fresh generator seeded by ``seed`` and the stream.

    """
    return np.random.default_rng([seed, _STREAMS[stream]])
