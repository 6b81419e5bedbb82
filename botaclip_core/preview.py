"""A quick look at an embedding map: its first three principal components as an RGB PNG."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from botaclip_core.embed import read_cells
from botaclip_core.embedding_store import EmbeddingStore

logger = logging.getLogger(__name__)

MAX_FIT_CELLS = 100_000
MAX_SIDE = 2048


def write_preview(
    store_path: str | Path,
    out: str | Path,
    *,
    max_cells: int = MAX_FIT_CELLS,
    max_side: int = MAX_SIDE,
    seed: int = 0,
) -> Path | None:
    """Write the map's first three principal components as RGB, transparent where empty.

    The PCA is fitted once, on at most ``max_cells`` covered cells drawn at random (seeded);
    each component is stretched between its 2nd and 98th percentiles. Maps wider than
    ``max_side`` cells are shown every ``ceil(side / max_side)``-th cell.

    Returns:
        ``out``, or None when nothing was embedded.
    """
    from PIL import Image
    from sklearn.decomposition import PCA

    store = EmbeddingStore(store_path)
    coverage = store.covered(slice(None), slice(None))  # one plane: (y, x), small
    covered = np.argwhere(coverage)
    if not len(covered):
        logger.warning("preview: %s holds no embedding; no preview written", store_path)
        return None
    rng = np.random.default_rng(seed)
    pick = covered[rng.choice(len(covered), min(max_cells, len(covered)), replace=False)]
    sample = read_cells(store, pick[:, 0], pick[:, 1]).astype(np.float64)
    pca = PCA(n_components=min(3, store.dim, len(sample)), random_state=seed).fit(sample)
    projected = pca.transform(sample)
    low, high = np.percentile(projected, [2, 98], axis=0)
    step = max(1, math.ceil(max(store.height, store.width) / max_side))
    rows, cols = np.arange(0, store.height, step), np.arange(0, store.width, step)
    rgba = np.zeros((len(rows), len(cols), 4), dtype=np.uint8)
    for ys, xs in store.chunks():
        keep_r = rows[(rows >= ys.start) & (rows < ys.stop)]
        keep_c = cols[(cols >= xs.start) & (cols < xs.stop)]
        if not (len(keep_r) and len(keep_c)) or not coverage[ys, xs].any():
            continue
        block = store.read(ys, xs)[:, keep_r - ys.start][:, :, keep_c - xs.start]
        flat = block.reshape(store.dim, -1).T
        ok = ~np.isnan(flat).any(axis=1)
        colour = np.zeros((flat.shape[0], 4), dtype=np.uint8)
        if ok.any():
            z = (pca.transform(flat[ok].astype(np.float64)) - low) / np.maximum(high - low, 1e-12)
            colour[ok, : z.shape[1]] = np.clip(np.rint(z * 255), 0, 255).astype(np.uint8)
            colour[ok, 3] = 255
        r_at, c_at = np.searchsorted(rows, keep_r), np.searchsorted(cols, keep_c)
        rgba[np.ix_(r_at, c_at)] = colour.reshape(len(keep_r), len(keep_c), 4)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    Image.fromarray(rgba, mode="RGBA").save(tmp)
    tmp.replace(out)
    return out
