"""Sampling an embedding map at survey points: ours (chunks that hold points) vs reading it all.

Writes a synthetic int8 map (``--cells`` × ``--cells`` cells, ``--dim`` features, chunks of
``--chunk`` cells, about 60 % covered) and samples ``--points`` points clustered in 40 survey
areas, given in EPSG:4326. Reference measured in the same run: xarray's vectorised nearest
selection on the lazy, dequantized map (``open_embeddings(...).sel(..., method="nearest")``),
and the floor of reading the whole map once. Prints one JSON line.

    python benchmarks/bench_sample.py
    python benchmarks/bench_sample.py --cells 1600 --points 100000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr
from pyproj import Transformer

from botaclip_core.embedding_store import EmbeddingStore, create_embedding_store, open_embeddings
from botaclip_core.grid import RegionGrid
from botaclip_core.query import sample_points


def write_map(path: Path, cells: int, dim: int, chunk: int) -> RegionGrid:
    grid = RegionGrid("EPSG:2154", 112.0, 900_000.0, 6_500_000.0, cells, cells)
    create_embedding_store(path, grid, dim, chunk=chunk, attrs={"tile_size_px": 224}, dtype="int8")
    store = EmbeddingStore(path, mode="r+")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:cells, 0:cells]
    inside = (yy - cells / 2) ** 2 + (xx - cells / 2) ** 2 < (0.44 * cells) ** 2  # a département
    for ys, xs in store.chunks():
        if inside[ys, xs].any():
            block = rng.normal(0, 1, (dim, ys.stop - ys.start, xs.stop - xs.start))
            block[:, ~inside[ys, xs]] = np.nan
            store.write(ys.start, xs.start, block.astype(np.float32))
    return grid


def survey_points(grid: RegionGrid, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    extent = grid.width * grid.resolution
    centres = rng.uniform(0.2, 0.8, (40, 2)) * extent
    which = rng.integers(0, 40, n)
    offsets = rng.normal(0, 1500.0, (n, 2))  # survey areas of a few km
    xs = grid.left + centres[which, 0] + offsets[:, 0]
    ys = grid.top - centres[which, 1] - offsets[:, 1]
    lon, lat = Transformer.from_crs("EPSG:2154", "EPSG:4326", always_xy=True).transform(xs, ys)
    return np.asarray(lon), np.asarray(lat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--points", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "map.zarr"
        grid = write_map(path, args.cells, args.dim, args.chunk)
        lon, lat = survey_points(grid, args.points)

        start = time.perf_counter()
        ours, status = sample_points(path, lon, lat, crs="EPSG:4326")
        ours_s = time.perf_counter() - start

        start = time.perf_counter()
        xs, ys = Transformer.from_crs("EPSG:4326", "EPSG:2154", always_xy=True).transform(lon, lat)
        lazy = open_embeddings(path)
        picked = lazy.sel(
            x=xr.DataArray(xs, dims="p"), y=xr.DataArray(ys, dims="p"), method="nearest"
        ).values
        xarray_s = time.perf_counter() - start

        start = time.perf_counter()
        whole = open_embeddings(path).values  # the whole map, once
        full_s = time.perf_counter() - start
        del whole

        ok = status == "ok"
        agree = bool(np.allclose(ours[ok], picked.T[ok], atol=1e-6))
        store = EmbeddingStore(path)
        c = store.chunk
        u = np.floor((xs - grid.left) / grid.resolution).astype(int) // c
        v = np.floor((grid.top - ys) / grid.resolution).astype(int) // c
        touched = len(set(zip(v[ok].tolist(), u[ok].tolist(), strict=True)))
        n_chunks = len(store.chunks())
    print(
        json.dumps(
            {
                "cells": args.cells,
                "dim": args.dim,
                "points": args.points,
                "status_ok": int(ok.sum()),
                "chunks_touched": touched,
                "chunks_in_map": n_chunks,
                "ours_s": round(ours_s, 2),
                "xarray_nearest_s": round(xarray_s, 2),
                "read_whole_map_s": round(full_s, 2),
                "ours_over_xarray": round(ours_s / xarray_s, 3),
                "same_values": agree,
            }
        )
    )


if __name__ == "__main__":
    main()
