"""Wall-to-wall embedding: values equal a direct forward pass, georeferencing, resume, Dask."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import rioxarray  # noqa: F401
import torch
import xarray as xr
import zarr

from botaclip_core.embed import (
    BackboneSpec,
    embed_region,
    embedding_grid,
    sample_embeddings,
    transform_embeddings,
)
from botaclip_core.models import build_dofa
from botaclip_core.tiling import region_grid_for_sources, tile_orthophotos

sys.path.insert(0, str(Path(__file__).parent / "data"))
from make_orthophotos import make_orthophotos  # noqa: E402

SPEC = BackboneSpec(
    size="tiny",
    weights=None,
    seed=0,
    wavelengths_um=(0.665, 0.56, 0.49, 0.842),
    mean=(120.0, 118.0, 110.0, 130.0),
    std=(60.0, 58.0, 62.0, 64.0),
    batch_size=4,
)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    sources = make_orthophotos(root / "src", size=300)["aligned"]
    grid = region_grid_for_sources(sources, crs="EPSG:2154", resolution=0.5)
    # pad the region by two empty tiles on the left, so that some blocks hold no source pixel
    pad = 2 * 224
    grid = type(grid)(
        grid.crs,
        grid.resolution,
        grid.left - pad * grid.resolution,
        grid.top,
        grid.width + pad,
        grid.height,
    )
    result = tile_orthophotos(
        sources,
        root / "image.zarr",
        grid=grid,
        bands=["r", "g", "b", "n"],
        wavelengths_um=list(SPEC.wavelengths_um),
    )
    return result


def direct_embeddings(image_zarr: Path, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Every tile of the image through a freshly built DOFA, written out without embed.py.

    Returns the ``(ty, tx)`` covered mask (a tile with at least one valid pixel) and the
    ``(D, ty, tx)`` features, NaN where not covered.
    """
    group = zarr.open_group(str(image_zarr), mode="r")
    pixels, valid = np.asarray(group["image"]), np.asarray(group["valid"]) > 0
    n_ty, n_tx = -(-pixels.shape[1] // tile), -(-pixels.shape[2] // tile)
    padded = np.zeros((pixels.shape[0], n_ty * tile, n_tx * tile), dtype=np.float32)
    padded[:, : pixels.shape[1], : pixels.shape[2]] = pixels
    covered = np.zeros((n_ty, n_tx), dtype=bool)
    for ty in range(n_ty):
        for tx in range(n_tx):
            covered[ty, tx] = valid[ty * tile : (ty + 1) * tile, tx * tile : (tx + 1) * tile].any()
    cells = np.argwhere(covered)
    tiles = np.stack(
        [padded[:, ty * tile : (ty + 1) * tile, tx * tile : (tx + 1) * tile] for ty, tx in cells]
    )
    mean = np.asarray(SPEC.mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(SPEC.std, dtype=np.float32)[None, :, None, None]
    model = build_dofa("tiny", weights=None, seed=SPEC.seed).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.from_numpy((tiles - mean) / std), SPEC.wavelengths_um)
    expected = np.full((model.embed_dim, n_ty, n_tx), np.nan, dtype=np.float32)
    expected[:, cells[:, 0], cells[:, 1]] = feats.numpy().T
    return covered, expected


def test_embeddings_equal_direct_forward_and_are_georeferenced(image, tmp_path):
    out = tmp_path / "dofa.zarr"
    info = embed_region(image.path, out, spec=SPEC, dim=64, tile_size=224, block_tiles=2)
    ds = xr.open_zarr(out)
    grid = embedding_grid(image.grid, 224)
    assert ds.rio.crs.to_epsg() == 2154 and ds.rio.transform() == grid.transform
    emb = ds["embedding"].values
    assert emb.shape == (64, grid.height, grid.width)
    covered, expected = direct_embeddings(image.path, 224)
    assert not covered[:, :2].any()  # the padded strip on the left holds no data
    assert covered[:2, 2:].all()  # whole 2 x 2 blocks of tiles hold data (block (0, 1))
    np.testing.assert_array_equal(~np.isnan(emb).any(axis=0), covered)
    assert np.isnan(emb[:, ~covered]).all()
    assert info["tiles_embedded"] == int(covered.sum())
    np.testing.assert_allclose(emb, expected, rtol=1e-4, atol=1e-5)
    # sampling at pixel positions reads the right cell
    for ty, tx in np.argwhere(covered):
        sampled = sample_embeddings(out, np.array([ty * 224 + 5]), np.array([tx * 224 + 100]), 224)
        np.testing.assert_array_equal(sampled[0], emb[:, ty, tx])


def test_resume_and_dask_client_give_identical_store(image, tmp_path):
    from distributed import Client, LocalCluster

    reference = tmp_path / "ref.zarr"
    embed_region(image.path, reference, spec=SPEC, dim=64, tile_size=224, block_tiles=1)
    expected = xr.open_zarr(reference)["embedding"].values
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        with Client(cluster) as client:
            out = tmp_path / "dask.zarr"
            first = embed_region(
                image.path, out, spec=SPEC, dim=64, tile_size=224, block_tiles=1, client=client
            )
            # an interrupted run: half of the block records are missing, and their chunks hold
            # garbage (a block is recorded after its chunk is written, so it may be half-written)
            records = sorted((tmp_path / "dask.zarr.blocks").iterdir())
            assert len(records) == first["blocks"] == first["blocks_run"]
            dropped = records[::2]
            chunks = zarr.open_array(str(out / "embedding"), mode="r+")
            for r in dropped:
                by, bx = map(int, r.name.split("_"))  # block_tiles=1: one cell per block
                assert not np.isnan(expected[:, by, bx]).all()  # only covered blocks have records
                chunks[:, by, bx] = 0.0
                r.unlink()
            again = embed_region(
                image.path, out, spec=SPEC, dim=64, tile_size=224, block_tiles=1, client=client
            )
    assert again["blocks_run"] == len(dropped) < first["blocks_run"]
    assert sorted((tmp_path / "dask.zarr.blocks").iterdir()) == records
    # float sums differ in the last bits with torch's thread count (1 in the worker, 2 here)
    resumed = xr.open_zarr(out)["embedding"].values
    np.testing.assert_allclose(resumed, expected, rtol=1e-5, atol=1e-6)


def test_transform_embeddings_applies_function_and_keeps_nan(image, tmp_path):
    src = tmp_path / "dofa.zarr"
    embed_region(image.path, src, spec=SPEC, dim=64, tile_size=224, block_tiles=2)
    weight = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    transform_embeddings(
        src, tmp_path / "proj.zarr", lambda x: x @ weight, out_dim=8, attrs={"source": "test"}
    )
    a = xr.open_zarr(src)["embedding"].values
    b = xr.open_zarr(tmp_path / "proj.zarr")
    assert b.rio.crs.to_epsg() == 2154 and b.attrs["source"] == "test"
    expected = np.einsum("dyx,de->eyx", a, weight)
    np.testing.assert_allclose(b["embedding"].values, expected, rtol=1e-4, atol=1e-4)
    assert np.array_equal(np.isnan(b["embedding"].values[0]), np.isnan(a[0]))
