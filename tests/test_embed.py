"""Wall-to-wall embedding: values equal a direct forward pass, georeferencing, resume, Dask."""

from __future__ import annotations

import dataclasses
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


def test_two_dask_workers_equal_one_process_and_cpu_tasks_need_no_resources(image, tmp_path):
    from distributed import Client, LocalCluster

    from botaclip_core.errors import InputDataError

    reference = tmp_path / "ref.zarr"
    embed_region(image.path, reference, spec=SPEC, dim=64, tile_size=224, block_tiles=1)
    expected = xr.open_zarr(reference)["embedding"].values
    out = tmp_path / "two.zarr"
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):  # workers offer no resources: CPU tasks ask none
        info = embed_region(
            image.path, out, spec=SPEC, dim=64, tile_size=224, block_tiles=1, client=client
        )

        def backbones_built() -> int:
            from botaclip_core.features import _cached_backbone

            return _cached_backbone.cache_info().currsize

        assert sorted(client.run(backbones_built).values()) == [1, 1]  # both workers embedded
        gpu_spec = dataclasses.replace(SPEC, device="cuda")
        with pytest.raises(InputDataError, match="--resources GPU=1"):
            embed_region(
                image.path,
                tmp_path / "gpu.zarr",
                spec=gpu_spec,
                dim=64,
                tile_size=224,
                block_tiles=1,
                client=client,
            )
    assert info["blocks_run"] == info["blocks"] > 4
    np.testing.assert_allclose(
        xr.open_zarr(out)["embedding"].values, expected, rtol=1e-5, atol=1e-6
    )


def test_resumed_run_refuses_blocks_of_another_precision(image, tmp_path):
    from botaclip_core.embedding_store import EmbeddingStore
    from botaclip_core.errors import InputDataError

    out = tmp_path / "dofa.zarr"
    embed_region(image.path, out, spec=SPEC, dim=64, tile_size=224, block_tiles=2)
    assert EmbeddingStore(out).attrs["precision"] == "fp32"
    record = next((tmp_path / "dofa.zarr.blocks").iterdir())
    assert record.read_text() == "fp32"
    record.unlink()  # a block left to do, as after a crash
    bf16 = dataclasses.replace(SPEC, precision="bf16")
    with pytest.raises(InputDataError, match="computed in fp32 but this run computes in bf16"):
        embed_region(image.path, out, spec=bf16, dim=64, tile_size=224, block_tiles=2)
    assert not record.exists()  # nothing was computed at the other precision


def test_stored_chunks_without_rasterio_equal_tilings_covered_blocks(image):
    from botaclip_core.embed import stored_valid_chunks
    from botaclip_core.tiling import covered_blocks

    blocks = stored_valid_chunks(image.path)
    assert blocks == covered_blocks(image.path) and len(blocks) > 1


def test_maps_georeferenced_from_the_image_store_equal_maps_from_the_crs(image, tmp_path):
    from botaclip_core.embedding_store import create_embedding_store

    grid = embedding_grid(image.grid, 224)
    create_embedding_store(tmp_path / "crs.zarr", grid, 8, chunk=2, attrs={"a": 1})
    create_embedding_store(
        tmp_path / "like.zarr", grid, 8, chunk=2, attrs={"a": 1}, like=image.path
    )
    a, b = xr.open_zarr(tmp_path / "crs.zarr"), xr.open_zarr(tmp_path / "like.zarr")
    assert a.attrs == b.attrs
    assert a["spatial_ref"].attrs == b["spatial_ref"].attrs
    assert b.rio.crs == a.rio.crs and b.rio.transform() == a.rio.transform() == grid.transform
    np.testing.assert_array_equal(a["x"].values, b["x"].values)
    np.testing.assert_array_equal(a["y"].values, b["y"].values)


KILLED_RUN = """
import dataclasses
import sys
sys.path.insert(0, {bench!r})
from pathlib import Path
from botaclip_core.embed import BackboneSpec, embed_region
spec = BackboneSpec("tiny", None, 0, (0.665, 0.56, 0.49, 0.842), (110.0,) * 4, (50.0,) * 4, 1)
embed_region(Path({image!r}), Path({out!r}), spec=spec, dim=64, tile_size=224, block_tiles=1)
"""


def test_run_killed_mid_way_resumes_only_missing_blocks_and_equals_uninterrupted(tmp_path):
    import os
    import signal
    import subprocess
    import time

    bench = Path(__file__).parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    from bench_embed import write_image_store

    image = write_image_store(tmp_path / "image.zarr", 12, 12)
    spec = BackboneSpec("tiny", None, 0, (0.665, 0.56, 0.49, 0.842), (110.0,) * 4, (50.0,) * 4, 1)
    reference = tmp_path / "ref.zarr"
    full = embed_region(image, reference, spec=spec, dim=64, tile_size=224, block_tiles=1)
    out = tmp_path / "killed.zarr"
    records = tmp_path / "killed.zarr.blocks"
    script = KILLED_RUN.format(bench=str(bench), image=str(image), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if records.is_dir() and len(os.listdir(records)) >= 5:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    done_before = len(os.listdir(records))
    assert 5 <= done_before < full["blocks"], "the run was not killed mid-way"
    again = embed_region(image, out, spec=spec, dim=64, tile_size=224, block_tiles=1)
    assert again["blocks_run"] == full["blocks"] - done_before
    np.testing.assert_allclose(
        xr.open_zarr(out)["embedding"].values,
        xr.open_zarr(reference)["embedding"].values,
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("stride", [32, 16])
def test_every_full_cell_of_a_real_orthophoto_map_equals_a_forward_where_its_georeferencing_says(
    realdata, tmp_path, stride
):
    """Each cell's window is found from the map's own transform, then read from the GeoTIFF."""
    import rasterio
    from rasterio.windows import Window, from_bounds

    from botaclip_core.grid import RegionGrid

    source = realdata / "naip" / "m_4709963_se_14_1_20200831.tif"
    tile = 32
    with rasterio.open(source) as ds:  # a 256 × 224 px crop on the sheet's own pixel lattice
        t, res = ds.transform, ds.res[0]
        grid = RegionGrid(str(ds.crs), res, t.c + 400 * res, t.f - 300 * res, 224, 256)
    waves = (0.665, 0.56, 0.49, 0.842)
    image = tile_orthophotos(
        [source],
        tmp_path / "image.zarr",
        grid=grid,
        bands=["r", "g", "b", "n"],
        wavelengths_um=list(waves),
        tile_size=tile,
    )
    spec = BackboneSpec("tiny", None, 3, waves, (110.0, 100.0, 90.0, 120.0), (50.0,) * 4, 16)
    out = tmp_path / "map.zarr"
    embed_region(image.path, out, spec=spec, dim=64, tile_size=tile, block_tiles=4, stride=stride)
    emb = xr.open_zarr(out)["embedding"]
    mt = emb.rio.transform()
    half = (tile - stride) / 2 * res  # a cell's window reaches this far beyond the cell
    model = build_dofa("tiny", seed=3).eval()
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    std = np.asarray(spec.std, np.float32)[:, None, None]
    checked = 0
    with rasterio.open(source) as ds:
        for r in range(emb.shape[1]):
            for c in range(emb.shape[2]):
                left, top = mt * (c, r)
                right, bottom = mt * (c + 1, r + 1)
                bounds = (left - half, bottom - half, right + half, top + half)
                inside = (
                    bounds[0] >= grid.left
                    and bounds[2] <= grid.left + grid.width * res
                    and bounds[3] <= grid.top
                    and bounds[1] >= grid.top - grid.height * res
                )
                win = from_bounds(*bounds, transform=ds.transform).round_offsets().round_lengths()
                assert (win.width, win.height) == (tile, tile)
                pixels = ds.read(
                    window=Window(win.col_off, win.row_off, tile, tile), boundless=True
                )
                if not inside or not (pixels != 0).any(axis=0).all():
                    continue  # not a full cell: its window leaves the region or holds nodata
                x = torch.from_numpy(((pixels.astype(np.float32) - mean) / std)[None])
                with torch.inference_mode():
                    expected = model.forward_features(x, list(waves))[0].numpy()
                np.testing.assert_allclose(emb.values[:, r, c], expected, rtol=0, atol=1e-3)
                checked += 1
    assert checked >= 0.5 * emb.shape[1] * emb.shape[2]
