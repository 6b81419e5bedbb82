"""How the demo mosaic is cut into overlapping orthophoto sheets with a nodata collar."""

from __future__ import annotations

import numpy as np

from botaclip_core.demo.region import stream_rng

OVERLAP_PX = 20  # overlap of neighbouring sheets
COLLAR_PX = (10, 30)  # nodata collar width on the outer sheet edges (inclusive range)


def sheet_span(i: int, edges: np.ndarray) -> tuple[int, int]:
    """Pixel range of sheet ``i`` along one axis: its share of the region plus the overlap.

    Args:
        i: index of the sheet along the axis.
        edges: sheet edges along the axis, as returned by :func:`collar`.

    Returns:
        The first pixel of the sheet and the pixel after its last.

    """
    half = OVERLAP_PX // 2
    n = int(edges[-1])
    return max(0, int(edges[i]) - half), min(n, int(edges[i + 1]) + half)


def collar(n: int, sheets: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Valid-pixel mask (False in the nodata collar) and the sheet edges along each axis.

    Each outer edge of each outermost sheet has its own collar width; where two sheets overlap,
    the lower-numbered sheet's width holds, so overlapping pixels stay identical.

    Args:
        n: side of the region in pixels.
        sheets: sheets per side.
        seed: seed of the demo region.

    Returns:
        The (n, n) boolean mask and the ``sheets + 1`` edges of the sheets' shares.

    """
    rng = stream_rng(seed, "collar")
    edges = np.round(np.linspace(0, n, sheets + 1)).astype(np.int64)
    lo, hi = COLLAR_PX
    widths = rng.integers(lo, hi + 1, size=(4, sheets))  # top, bottom, left, right
    per_px = np.repeat(widths, np.diff(edges), axis=1)  # (4, n): width at each row/column
    idx = np.arange(n)
    rows, cols = idx[:, None], idx[None, :]
    valid = (
        (rows >= per_px[0][None, :])
        & (rows < n - per_px[1][None, :])
        & (cols >= per_px[2][:, None])
        & (cols < n - per_px[3][:, None])
    )
    return valid, edges
