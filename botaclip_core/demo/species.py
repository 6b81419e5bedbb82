"""Species of the demo: plants, butterflies and soil fauna, with their niches."""

from __future__ import annotations

import numpy as np

# Plants: name, affinity to each habitat (conifer, deciduous, grassland, scree, wetland),
# elevation optimum and tolerance (m), frequency at the optimum, dominance (cover tendency 1–4).
PLANTS: tuple[tuple[str, tuple[float, ...], float, float, float, int], ...] = (
    ("Picea abies", (1.0, 0.3, 0.05, 0.0, 0.1), 1650, 350, 0.95, 4),
    ("Abies alba", (0.7, 0.5, 0.0, 0.0, 0.0), 1450, 300, 0.6, 3),
    ("Larix decidua", (0.6, 0.1, 0.2, 0.15, 0.0), 1950, 300, 0.6, 3),
    ("Pinus cembra", (0.5, 0.0, 0.05, 0.2, 0.0), 2100, 250, 0.4, 2),
    ("Fagus sylvatica", (0.15, 1.0, 0.0, 0.0, 0.0), 1300, 250, 0.95, 4),
    ("Acer pseudoplatanus", (0.2, 0.8, 0.05, 0.0, 0.1), 1400, 350, 0.6, 2),
    ("Fraxinus excelsior", (0.0, 0.7, 0.0, 0.0, 0.3), 1250, 250, 0.5, 2),
    ("Corylus avellana", (0.05, 0.8, 0.1, 0.0, 0.1), 1250, 250, 0.6, 2),
    ("Vaccinium myrtillus", (0.9, 0.3, 0.1, 0.1, 0.1), 1750, 400, 0.9, 3),
    ("Oxalis acetosella", (0.8, 0.6, 0.0, 0.0, 0.1), 1500, 350, 0.7, 1),
    ("Homogyne alpina", (0.8, 0.1, 0.2, 0.1, 0.1), 1850, 300, 0.6, 1),
    ("Luzula sylvatica", (0.6, 0.6, 0.05, 0.0, 0.0), 1450, 400, 0.5, 1),
    ("Prenanthes purpurea", (0.6, 0.6, 0.0, 0.0, 0.0), 1450, 350, 0.5, 1),
    ("Sorbus aucuparia", (0.5, 0.4, 0.1, 0.05, 0.1), 1650, 450, 0.5, 1),
    ("Rubus idaeus", (0.3, 0.3, 0.1, 0.0, 0.1), 1450, 500, 0.4, 1),
    ("Anemone nemorosa", (0.1, 0.9, 0.1, 0.0, 0.1), 1300, 300, 0.7, 2),
    ("Galium odoratum", (0.1, 0.9, 0.0, 0.0, 0.0), 1300, 250, 0.7, 2),
    ("Mercurialis perennis", (0.05, 0.8, 0.0, 0.0, 0.05), 1250, 250, 0.5, 2),
    ("Carex sylvatica", (0.1, 0.7, 0.0, 0.0, 0.2), 1300, 300, 0.5, 1),
    ("Festuca rubra", (0.05, 0.0, 1.0, 0.2, 0.3), 1850, 500, 0.9, 3),
    ("Dactylis glomerata", (0.0, 0.1, 0.9, 0.0, 0.1), 1600, 350, 0.7, 2),
    ("Trifolium pratense", (0.0, 0.0, 0.9, 0.0, 0.1), 1750, 400, 0.7, 2),
    ("Trifolium alpinum", (0.0, 0.0, 0.8, 0.2, 0.0), 2150, 250, 0.6, 2),
    ("Leontodon hispidus", (0.0, 0.0, 0.9, 0.1, 0.1), 1900, 400, 0.7, 1),
    ("Plantago lanceolata", (0.0, 0.0, 0.8, 0.0, 0.1), 1550, 300, 0.6, 1),
    ("Lotus corniculatus", (0.0, 0.0, 0.8, 0.1, 0.0), 1800, 450, 0.6, 1),
    ("Anthoxanthum odoratum", (0.1, 0.0, 0.9, 0.0, 0.2), 1850, 450, 0.7, 2),
    ("Nardus stricta", (0.05, 0.0, 0.8, 0.1, 0.3), 2000, 300, 0.6, 3),
    ("Arnica montana", (0.1, 0.0, 0.7, 0.0, 0.1), 1950, 300, 0.4, 1),
    ("Gentiana lutea", (0.0, 0.0, 0.6, 0.1, 0.0), 1850, 300, 0.3, 1),
    ("Achillea millefolium", (0.0, 0.05, 0.8, 0.0, 0.0), 1700, 400, 0.6, 1),
    ("Saxifraga oppositifolia", (0.0, 0.0, 0.05, 1.0, 0.0), 2350, 250, 0.7, 1),
    ("Poa alpina", (0.0, 0.0, 0.5, 0.7, 0.0), 2150, 300, 0.7, 1),
    ("Sesleria caerulea", (0.0, 0.0, 0.5, 0.7, 0.0), 2050, 350, 0.6, 2),
    ("Dryas octopetala", (0.0, 0.0, 0.2, 0.9, 0.0), 2200, 300, 0.6, 3),
    ("Linaria alpina", (0.0, 0.0, 0.0, 1.0, 0.0), 2300, 250, 0.6, 1),
    ("Oxyria digyna", (0.0, 0.0, 0.0, 0.9, 0.1), 2350, 250, 0.5, 1),
    ("Noccaea rotundifolia", (0.0, 0.0, 0.0, 0.9, 0.0), 2350, 250, 0.5, 1),
    ("Silene acaulis", (0.0, 0.0, 0.2, 0.8, 0.0), 2300, 250, 0.5, 1),
    ("Caltha palustris", (0.0, 0.05, 0.05, 0.0, 1.0), 1600, 450, 0.8, 2),
    ("Carex nigra", (0.0, 0.0, 0.1, 0.0, 1.0), 1800, 500, 0.8, 3),
    ("Eriophorum angustifolium", (0.0, 0.0, 0.0, 0.0, 0.9), 1900, 450, 0.7, 2),
    ("Alnus alnobetula", (0.1, 0.0, 0.05, 0.1, 0.8), 1850, 400, 0.7, 4),
    ("Salix appendiculata", (0.0, 0.1, 0.0, 0.0, 0.6), 1550, 400, 0.5, 2),
    ("Filipendula ulmaria", (0.0, 0.1, 0.05, 0.0, 0.8), 1400, 350, 0.6, 2),
    ("Deschampsia cespitosa", (0.1, 0.1, 0.5, 0.0, 0.6), 1700, 600, 0.6, 2),
    ("Potentilla erecta", (0.2, 0.0, 0.6, 0.0, 0.4), 1750, 600, 0.6, 1),
)

# Butterflies: name, habitat affinity (through their host plants and nectar sources),
# elevation optimum and tolerance (m), relative abundance among the records.
BUTTERFLIES: tuple[tuple[str, tuple[float, ...], float, float, float], ...] = (
    ("Parnassius apollo", (0.0, 0.0, 0.6, 1.0, 0.0), 2100, 350, 1.0),
    ("Erebia euryale", (0.8, 0.2, 0.6, 0.0, 0.1), 1700, 350, 1.5),
    ("Erebia pandrose", (0.0, 0.0, 0.5, 1.0, 0.0), 2300, 250, 0.8),
    ("Erebia ligea", (0.6, 0.7, 0.4, 0.0, 0.0), 1450, 300, 1.0),
    ("Boloria pales", (0.0, 0.0, 1.0, 0.5, 0.0), 2150, 250, 1.0),
    ("Boloria eunomia", (0.0, 0.0, 0.2, 0.0, 1.0), 1700, 400, 0.5),
    ("Lycaena hippothoe", (0.0, 0.0, 0.5, 0.0, 1.0), 1650, 400, 0.7),
    ("Coenonympha gardetta", (0.0, 0.0, 1.0, 0.3, 0.1), 2050, 300, 1.5),
    ("Aglais urticae", (0.1, 0.3, 0.8, 0.1, 0.5), 1500, 600, 1.2),
    ("Pieris bryoniae", (0.2, 0.2, 0.7, 0.0, 0.6), 1750, 400, 1.0),
    ("Argynnis paphia", (0.3, 1.0, 0.3, 0.0, 0.0), 1300, 300, 0.8),
    ("Gonepteryx rhamni", (0.1, 0.9, 0.2, 0.0, 0.5), 1300, 350, 0.7),
    ("Plebejus orbitulus", (0.0, 0.0, 0.8, 0.6, 0.0), 2200, 250, 0.6),
    ("Colias phicomone", (0.0, 0.0, 1.0, 0.4, 0.0), 2050, 300, 0.8),
    ("Melitaea diamina", (0.0, 0.1, 0.3, 0.0, 1.0), 1500, 400, 0.5),
)

# Soil fauna (nematodes per 100 g dry soil): mean abundance per habitat.
SOIL_GROUPS: tuple[tuple[str, tuple[float, ...]], ...] = (
    ("bacterivores", (300.0, 450.0, 700.0, 120.0, 600.0)),
    ("fungivores", (500.0, 350.0, 200.0, 60.0, 150.0)),
    ("predators", (60.0, 70.0, 80.0, 20.0, 50.0)),
    ("omnivores", (120.0, 150.0, 180.0, 40.0, 120.0)),
    ("herbivores", (150.0, 200.0, 600.0, 50.0, 300.0)),
)
SOIL_DISPERSION = 3.0  # negative-binomial size parameter


def plant_probabilities(fractions: np.ndarray, elev: np.ndarray) -> np.ndarray:
    """Probability that each plant occurs at each site, from its habitat and elevation.

    Args:
        fractions: (sites, 5) share of each habitat around each site.
        elev: (sites,) elevation of each site, in metres.

    Returns:
        A (sites, plants) array in [0, 0.97], plants in the order of :data:`PLANTS`.

    """
    affinity = np.array([p[1] for p in PLANTS])
    opt = np.array([p[2] for p in PLANTS])
    tol = np.array([p[3] for p in PLANTS])
    pmax = np.array([p[4] for p in PLANTS])
    habitat_term = fractions @ affinity.T
    elev_term = np.exp(-0.5 * ((elev[:, None] - opt[None, :]) / tol[None, :]) ** 2)
    return np.clip(1.5 * pmax * habitat_term * elev_term**0.6, 0.0, 0.97)


def butterfly_suitability(fractions: np.ndarray, elev: np.ndarray) -> np.ndarray:
    """Habitat suitability of places for each butterfly, from their habitats and elevation.

    Args:
        fractions: (places, 5) share of each habitat around each place.
        elev: (places,) elevation of each place, in metres.

    Returns:
        A (places, butterflies) array of non-negative suitabilities, butterflies in the order
        of :data:`BUTTERFLIES`.

    """
    affinity = np.array([b[1] for b in BUTTERFLIES])
    opt = np.array([b[2] for b in BUTTERFLIES])
    tol = np.array([b[3] for b in BUTTERFLIES])
    suit = fractions @ affinity.T
    suit *= np.exp(-0.5 * ((elev[:, None] - opt) / tol) ** 2)
    return suit
