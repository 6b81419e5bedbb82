"""Wall-to-wall embedding: values equal a direct forward pass, georeferencing, resume, Dask."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import rioxarray  # noqa: F401
import xarray as xr
import zarr

from botaclip_core.embed import (
    BackboneSpec,
    embed_region,
    embedding_grid,
    sample_embeddings,
    transform_embeddings,
)
from botaclip_core.features import encode_tiles, load_backbone
from botaclip_core.tiling import region_grid_for_sources, tile_orthophotos

sys.path.insert(0, str(Path(__file__).parent / "data"))
from make_orthophotos import make_orthophotos  # noqa: E402

SPEC = BackboneSpec(
    size="tiny",
    weights=None,
    seed=0,
    wavelengths_um=(0.665, 0.56, 0.49, 0.842),
    mean=(127.5,) * 4,
    std=(64.0,) * 4,
    batch_size=4,
)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    sources = make_orthophotos(root / "src", size=300)["aligned"]
    grid = region_grid_for_sources(sources, crs="EPSG:2154", resolution=0.5)
    # pad the region so that some blocks hold no source pixel at all
    grid = type(grid)(
        grid.crs, grid.resolution, grid.left - 448, grid.top, grid.width + 448, grid.height
    )
    result = tile_orthophotos(
        sources,
        root / "image.zarr",
        grid=grid,
        bands=["r", "g", "b", "n"],
        wavelengths_um=list(SPEC.wavelengths_um),
    )
    return result


def test_embeddings_equal_direct_forward_and_are_georeferenced(image, tmp_path):
    out = tmp_path / "dofa.zarr"
    info = embed_region(image.path, out, spec=SPEC, dim=64, tile_size=224, block_tiles=2)
    ds = xr.open_zarr(out)
    grid = embedding_grid(image.grid, 224)
    assert ds.rio.crs.to_epsg() == 2154 and ds.rio.transform() == grid.transform
    emb = ds["embedding"].values
    assert emb.shape == (64, grid.height, grid.width)
    covered = ~np.isnan(emb[0])
    assert covered.any() and not covered.all()  # the padded strip on the left holds no data
    assert info["tiles_embedded"] == int(covered.sum())
    # one covered tile, recomputed directly
    ty, tx = np.argwhere(covered)[0]
    pixels = zarr.open_group(str(image.path), mode="r")["image"]
    tile = np.zeros((4, 224, 224), dtype=np.uint8)
    part = pixels[:, ty * 224 : (ty + 1) * 224, tx * 224 : (tx + 1) * 224]
    tile[:, : part.shape[1], : part.shape[2]] = part
    model = load_backbone("tiny", None, 0)
    direct = encode_tiles(
        model, tile[None], SPEC.wavelengths_um, np.float32(SPEC.mean), np.float32(SPEC.std)
    )
    np.testing.assert_allclose(emb[:, ty, tx], direct[0], rtol=1e-4, atol=1e-5)
    # sampling at pixel positions reads the right cell
    sampled = sample_embeddings(out, np.array([ty * 224 + 5]), np.array([tx * 224 + 100]), 224)
    np.testing.assert_array_equal(sampled[0], emb[:, ty, tx])


def test_resume_and_dask_client_give_identical_store(image, tmp_path):
    from distributed import Client, LocalCluster

    reference = tmp_path / "ref.zarr"
    embed_region(image.path, reference, spec=SPEC, dim=64, tile_size=224, block_tiles=1)
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        with Client(cluster) as client:
            # an interrupted run: half of the block records are dropped, their chunks kept or not
            out = tmp_path / "dask.zarr"
            first = embed_region(
                image.path, out, spec=SPEC, dim=64, tile_size=224, block_tiles=1, client=client
            )
            records = sorted((tmp_path / "dask.zarr.blocks").iterdir())
            for r in records[::2]:
                r.unlink()
            again = embed_region(
                image.path, out, spec=SPEC, dim=64, tile_size=224, block_tiles=1, client=client
            )
    assert again["blocks_run"] == len(records[::2]) < first["blocks_run"]
    # float sums differ in the last bits with torch's thread count (1 in the worker, 2 here)
    np.testing.assert_allclose(
        xr.open_zarr(out)["embedding"].values,
        xr.open_zarr(reference)["embedding"].values,
        rtol=1e-5,
        atol=1e-6,
    )


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
