import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
from rasterio.warp import Resampling, reproject
from scipy.ndimage import binary_erosion

from botaclip_core.errors import CRSMismatchError, InputDataError
from botaclip_core.grid import RegionGrid
from botaclip_core.tiling import (
    TilingResult,
    covered_blocks,
    open_image,
    records_dir,
    region_grid_for_sources,
    tile_orthophotos,
)
from botaclip_core.tiling import tasks as tiling

sys.path.insert(0, str(Path(__file__).parent / "data"))
from make_orthophotos import make_orthophotos, write_sheet  # noqa: E402

BANDS = ["blue", "green", "red", "nir"]
WAVELENGTHS = [0.49, 0.56, 0.665, 0.842]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ortho(tmp_path_factory):
    return make_orthophotos(tmp_path_factory.mktemp("ortho"))


def _tile(sources, out, grid, **kwargs):
    kwargs.setdefault("tile_size", 64)
    bands = kwargs.pop("bands", BANDS)
    wl = kwargs.pop("wavelengths_um", WAVELENGTHS[: len(bands)])
    return tile_orthophotos(sources, out, grid=grid, bands=bands, wavelengths_um=wl, **kwargs)


def _read(path):
    with rasterio.open(path) as ds:
        return ds.read(), ds.nodata


def _rasterio_warp(src: Path, grid: RegionGrid, resampling: str = "bilinear") -> np.ndarray:
    """The reference: ``rasterio.warp.reproject`` of the whole source, nodata 0."""
    with rasterio.open(src) as s:
        ref = np.zeros((s.count, *grid.shape), dtype=s.dtypes[0])
        reproject(
            rasterio.band(s, list(range(1, s.count + 1))),
            ref,
            dst_transform=grid.transform,
            dst_crs=grid.crs,
            resampling=Resampling[resampling],
            src_nodata=0,
            dst_nodata=0,
        )
    return ref


def _store_snapshot(store: Path) -> dict:
    """Every array's values and every metadata document of a store."""
    snap = {}
    for meta in sorted(store.rglob("zarr.json")):
        snap[str(meta.relative_to(store))] = json.loads(meta.read_text())
    ds = open_image(store)
    for name in ds.variables:
        snap["values:" + str(name)] = ds[name].values
    return snap


def _assert_same_store(a: Path, b: Path) -> None:
    sa, sb = _store_snapshot(a), _store_snapshot(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        if key.startswith("values:"):
            np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)
        else:
            assert sa[key] == sb[key], key
    chunks_a = sorted(str(p.relative_to(a)) for p in a.rglob("c/*/*") if p.is_file())
    chunks_b = sorted(str(p.relative_to(b)) for p in b.rglob("c/*/*") if p.is_file())
    assert chunks_a == chunks_b
    for name in chunks_a:  # byte for byte: same chunks (or shards, index included)
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# --- grid ------------------------------------------------------------------------------------


def test_region_grid_for_sources_covers_union(ortho):
    sources = ortho["aligned"]
    grid = region_grid_for_sources(sources, crs="EPSG:2154", resolution=0.5)
    lefts, tops, rights, bottoms = [], [], [], []
    for p in sources:
        with rasterio.open(p) as ds:
            lefts.append(ds.bounds.left)
            bottoms.append(ds.bounds.bottom)
            rights.append(ds.bounds.right)
            tops.append(ds.bounds.top)
    assert grid.bounds == (min(lefts), min(bottoms), max(rights), max(tops))
    explicit = region_grid_for_sources(
        sources, crs="EPSG:2154", resolution=0.5, bounds=(0, 0, 10, 10)
    )
    assert explicit == RegionGrid("EPSG:2154", 0.5, 0.0, 10.0, 20, 20)


# --- exact copy, layout, georeferencing --------------------------------------------------------


def test_aligned_source_is_copied_exactly(ortho, tmp_path):
    src = ortho["aligned"][1]
    grid = region_grid_for_sources(ortho["aligned"], crs="EPSG:2154", resolution=0.5)
    result = _tile([src], tmp_path / "image.zarr", grid=grid)
    ds = open_image(result.path)
    data, nodata = _read(src)
    with rasterio.open(src) as s:
        row, col = grid.rowcol(np.array([s.bounds.left + 0.1]), np.array([s.bounds.top - 0.1]))
    r0, c0 = int(row[0]), int(col[0])
    h, w = data.shape[1:]
    image = ds["image"].values
    valid = ds["valid"].values
    expected_valid = (data != nodata).any(axis=0)
    np.testing.assert_array_equal(valid[r0 : r0 + h, c0 : c0 + w], expected_valid)
    window = image[:, r0 : r0 + h, c0 : c0 + w]
    np.testing.assert_array_equal(window[:, expected_valid], data[:, expected_valid])
    # nothing outside the source
    outside = np.ones(grid.shape, dtype=bool)
    outside[r0 : r0 + h, c0 : c0 + w] = False
    assert not valid[outside].any() and not image[:, outside].any()
    assert result.dtype == "uint8" and result.n_written > 0


def test_store_layout_and_georeferencing(ortho, tmp_path):
    grid = region_grid_for_sources(ortho["aligned"], crs="EPSG:2154", resolution=0.5)
    out = tmp_path / "stage" / "image.zarr"
    _tile(ortho["aligned"], out, grid=grid, tile_size=64)
    ds = xr.open_zarr(out)
    assert ds.rio.crs == grid.crs_obj
    assert ds.rio.transform() == grid.transform
    assert ds["image"].rio.crs == grid.crs_obj
    assert ds["image"].rio.transform() == grid.transform
    assert ds["image"].dims == ("band", "y", "x")
    assert ds["image"].shape == (4, grid.height, grid.width)
    assert ds["image"].dtype == np.uint8 and ds["valid"].dtype == np.uint8
    assert ds["image"].encoding["chunks"] == (4, 64, 64)
    assert ds["valid"].encoding["chunks"] == (64, 64)
    assert list(ds["band"].values) == BANDS
    assert ds["image"].attrs["wavelengths_um"] == WAVELENGTHS
    assert ds["image"].attrs["bands"] == BANDS
    for key in ("tile_size", "bands", "wavelengths_um", "sources"):
        assert key in ds.attrs
    assert ds.attrs["sources"] == [str(p) for p in ortho["aligned"]]
    assert ds.attrs["proj:code"] == "EPSG:2154"
    assert ds.attrs["spatial:transform"] == list(grid.transform)[:6]
    assert ds.attrs["spatial:shape"] == [grid.height, grid.width]
    root = json.loads((out / "zarr.json").read_text())
    assert root["zarr_format"] == 3
    assert root["consolidated_metadata"] is not None
    # sharded by default: 8 × 8 tile-sized chunks per file, zstd inside, crc32c on the index
    assert ds["image"].encoding["shards"] == (4, 512, 512)
    assert ds["valid"].encoding["shards"] == (512, 512)
    for name, inner in (("image", [4, 64, 64]), ("valid", [64, 64])):
        meta = json.loads((out / name / "zarr.json").read_text())
        assert meta["fill_value"] == 0
        assert [c["name"] for c in meta["codecs"]] == ["sharding_indexed"]
        conf = meta["codecs"][0]["configuration"]
        assert conf["chunk_shape"] == inner
        assert [c["name"] for c in conf["codecs"]] == ["bytes", "zstd"]
        assert [c["name"] for c in conf["index_codecs"]] == ["bytes", "crc32c"]
    assert records_dir(out) == out.parent / "image.zarr.blocks"


def test_unsharded_layout_has_one_file_per_chunk(ortho, tmp_path):
    grid = region_grid_for_sources(ortho["aligned"], crs="EPSG:2154", resolution=0.5)
    out = _tile(ortho["aligned"], tmp_path / "image.zarr", grid=grid, shard_blocks=1).path
    meta = json.loads((out / "image" / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "zstd"]
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [4, 64, 64]
    n_files = len([p for p in (out / "image" / "c").rglob("*") if p.is_file()])
    assert n_files == len(covered_blocks(out))


@pytest.mark.parametrize("shard_blocks", [3, 8])
def test_sharded_store_equals_unsharded_and_zarr_reads_it(ortho, tmp_path, shard_blocks):
    import zarr

    sources = ortho["aligned"] + ortho["reprojected"]
    grid = region_grid_for_sources(sources, crs="EPSG:2154", resolution=0.5)
    plain = _tile(sources, tmp_path / "plain.zarr", grid=grid, shard_blocks=1).path
    sharded = _tile(sources, tmp_path / "sharded.zarr", grid=grid, shard_blocks=shard_blocks).path
    a, b = open_image(plain), open_image(sharded)
    np.testing.assert_array_equal(a["image"].values, b["image"].values)
    np.testing.assert_array_equal(a["valid"].values, b["valid"].values)
    assert covered_blocks(sharded) == covered_blocks(plain)
    # one file per shard holding a written block, per array
    shards = {(r // shard_blocks, c // shard_blocks) for r, c in covered_blocks(plain)}
    files = sorted(p for p in (sharded / "valid" / "c").rglob("*") if p.is_file())
    assert len(files) == len(shards)
    # zarr-python reads single inner chunks through the index (and checks its crc32c)
    arr = zarr.open_array(str(sharded / "image"), mode="r")
    assert arr.shards == (4, 64 * shard_blocks, 64 * shard_blocks) and arr.chunks == (4, 64, 64)
    r, c = covered_blocks(plain)[-1]
    np.testing.assert_array_equal(
        arr[:, r * 64 : (r + 1) * 64, c * 64 : (c + 1) * 64],
        a["image"].values[:, r * 64 : (r + 1) * 64, c * 64 : (c + 1) * 64],
    )


def test_reprojected_source_matches_rasterio_warp(ortho, tmp_path):
    src = ortho["reprojected"][0]
    grid = region_grid_for_sources([src], crs="EPSG:2154", resolution=0.5)
    ds = open_image(_tile([src], tmp_path / "image.zarr", grid=grid).path)
    ref = _rasterio_warp(src, grid)
    valid = ds["valid"].values.astype(bool)
    ref_valid = ref.any(axis=0)
    both = valid & ref_valid
    assert both.sum() > 0.95 * max(valid.sum(), ref_valid.sum())
    diff = np.abs(ds["image"].values[:, both].astype(int) - ref[:, both].astype(int))
    assert diff.mean() <= 1.0


@pytest.mark.parametrize(
    ("resampling", "resolution"),
    [(m, r) for m in ("nearest", "bilinear", "cubic", "average") for r in (0.5, 0.7)]
    + [("average", 2.0)],
)
def test_resamplings_match_rasterio_warp_across_shards(ortho, tmp_path, resampling, resolution):
    # the UTM sheet onto Lambert-93 at its own 0.5 m, at 0.7 m and (average, which spans the
    # source pixels under a grid pixel) at 2 m, in shards of 2 × 2 blocks of 32: each 64 px
    # shard warps its own padded source window, the reference warps the whole sheet at once
    src = ortho["reprojected"][0]
    grid = region_grid_for_sources([src], crs="EPSG:2154", resolution=resolution)
    out = tmp_path / "image.zarr"
    ds = open_image(
        _tile([src], out, grid=grid, resampling=resampling, tile_size=32, shard_blocks=2).path
    )
    ref = _rasterio_warp(src, grid, resampling)
    valid, ref_valid = ds["valid"].values.astype(bool), ref.any(axis=0)
    assert (valid ^ ref_valid).sum() <= 0.001 * ref_valid.sum()
    image = ds["image"].values.astype(int)
    both = valid & ref_valid
    assert np.abs(image[:, both] - ref[:, both].astype(int)).mean() <= 0.25
    # away from the nodata collar (the cubic kernel reaches 2 pixels), within 1 grey level: GDAL
    # approximates the transform per window, so a shard's warp can round the other way (measured:
    # nearest exact; bilinear and cubic at 0.7 m 1 level off in about 3,200 of 34,600 pixels,
    # every other case in under 60)
    interior = binary_erosion(both, iterations=2)
    assert interior.sum() > 0.8 * both.sum()
    diff = np.abs(image[:, interior] - ref[:, interior].astype(int))
    assert diff.max() <= 1 and diff.mean() <= 0.05
    if resampling == "nearest":
        assert (diff == 0).mean() >= 0.999


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_warp_with_nodata_holes_matches_rasterio_warp(tmp_path, dtype):
    # a UTM sheet with nodata blobs inside and a ragged collar: the fast warp (mask as a plain
    # band) plus the masked re-warp of the kernel-straddling pixels must agree with GDAL's masked
    # warp of the whole sheet
    rng = np.random.default_rng(11)
    size = 600
    yy, xx = np.mgrid[0:size, 0:size]
    scale = 1 if dtype == "uint8" else 200
    data = np.stack(
        [
            (60 + 40 * np.sin(xx / (9 + 4 * b)) + 30 * np.cos(yy / 13) + b * 10) * scale
            for b in range(4)
        ]
    )
    data = np.clip(data + rng.integers(0, 3, data.shape), 1, None).astype(dtype)
    holes = np.zeros((size, size), dtype=bool)
    for cy, cx, r in rng.integers([50, 50, 8], [550, 550, 40], size=(12, 3)):
        holes |= (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    holes |= xx + rng.integers(0, 6, size)[:, None] < 20  # a ragged left collar
    data[:, holes] = 0
    src = write_sheet(
        tmp_path / "utm.tif", data, left=448_000, top=5_413_000, crs="EPSG:32631", blocksize=256
    )
    grid = region_grid_for_sources([src], crs="EPSG:2154", resolution=0.5)
    ds = open_image(_tile([src], tmp_path / "image.zarr", grid=grid).path)
    ref = _rasterio_warp(src, grid)
    valid, ref_valid = ds["valid"].values.astype(bool), ref.any(axis=0)
    assert (valid ^ ref_valid).sum() <= 0.002 * ref_valid.sum()
    both = valid & ref_valid
    diff = np.abs(ds["image"].values[:, both].astype(int) - ref[:, both].astype(int))
    assert diff.mean() <= 0.05 * scale
    assert np.quantile(diff, 0.999) <= scale


def test_precedence_catalog_order(ortho, tmp_path):
    a, b = ortho["aligned"][0], ortho["aligned"][1]
    grid = region_grid_for_sources([a, b], crs="EPSG:2154", resolution=0.5)
    first_a = open_image(_tile([a, b], tmp_path / "ab.zarr", grid=grid).path)["image"].values
    first_b = open_image(_tile([b, a], tmp_path / "ba.zarr", grid=grid).path)["image"].values
    da_, _ = _read(a)
    db_, _ = _read(b)
    va, vb = da_.any(axis=0), db_.any(axis=0)
    # a is at (0, 0) of the grid; b is offset by the fixture's (157, 103) pixels
    with rasterio.open(b) as s:
        rb, cb = (
            int(v[0])
            for v in grid.rowcol(np.array([s.bounds.left + 0.1]), np.array([s.bounds.top - 0.1]))
        )
    h, w = va.shape
    overlap_b = vb[: h - rb, : w - cb] & va[rb:, cb:]
    assert overlap_b.sum() > 1000
    ys, xs = np.nonzero(overlap_b)
    np.testing.assert_array_equal(first_a[:, ys + rb, xs + cb], da_[:, ys + rb, xs + cb])
    np.testing.assert_array_equal(first_b[:, ys + rb, xs + cb], db_[:, ys, xs])
    # where only the later source is valid, it fills in
    only_b = vb[: h - rb, : w - cb] & ~va[rb:, cb:]
    ys, xs = np.nonzero(only_b)
    np.testing.assert_array_equal(first_a[:, ys + rb, xs + cb], db_[:, ys, xs])


def test_precedence_newest_first(ortho, tmp_path):
    a, _, c = ortho["aligned"]  # c has the latest TIFFTAG_DATETIME
    grid = region_grid_for_sources([a, c], crs="EPSG:2154", resolution=0.5)
    ac = open_image(_tile([a, c], tmp_path / "ac.zarr", grid=grid, precedence="newest_first").path)
    ca = open_image(_tile([c, a], tmp_path / "ca.zarr", grid=grid, precedence="catalog_order").path)
    np.testing.assert_array_equal(ac["image"].values, ca["image"].values)
    ca_by_date = _tile([c, a], tmp_path / "ca2.zarr", grid=grid, precedence="catalog_order").path
    ac_catalog = open_image(_tile([a, c], tmp_path / "ac2.zarr", grid=grid).path)
    assert not np.array_equal(ac_catalog["image"].values, open_image(ca_by_date)["image"].values)


def test_newest_first_falls_back_to_mtime(tmp_path):
    rng = np.random.default_rng(3)
    data_old = rng.integers(1, 255, size=(3, 64, 64), dtype=np.uint8)
    data_new = rng.integers(1, 255, size=(3, 64, 64), dtype=np.uint8)
    old = write_sheet(tmp_path / "old.tif", data_old, left=0, top=64, resolution=1.0)
    new = write_sheet(tmp_path / "new.tif", data_new, left=0, top=64, resolution=1.0)
    os.utime(old, (1_000_000_000, 1_000_000_000))
    os.utime(new, (1_600_000_000, 1_600_000_000))
    grid = RegionGrid("EPSG:2154", 1.0, 0.0, 64.0, 64, 64)
    ds = open_image(
        _tile(
            [old, new], tmp_path / "i.zarr", grid=grid, bands=BANDS[:3], precedence="newest_first"
        ).path
    )
    np.testing.assert_array_equal(ds["image"].values, data_new)


# --- sparse ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shard_blocks", [1, 4])
def test_sparse_bbox_writes_only_covered_blocks(ortho, tmp_path, shard_blocks):
    a = ortho["aligned"][0]
    with rasterio.open(a) as s:
        left, bottom, right, top = s.bounds
    # ~40× the source's area
    grid = RegionGrid.from_bounds(
        "EPSG:2154", 0.5, (left - 400, bottom - 400, right + 400, top + 400)
    )
    out = tmp_path / "image.zarr"
    result = _tile([a], out, grid=grid, tile_size=64, shard_blocks=shard_blocks)
    assert result.n_blocks == (-(-grid.height // 64)) * (-(-grid.width // 64))
    blocks = covered_blocks(out)
    image_files = sorted(
        (int(p.parent.name), int(p.name)) for p in (out / "image" / "c" / "0").glob("*/*")
    )
    valid_files = sorted(
        (int(p.parent.name), int(p.name)) for p in (out / "valid" / "c").glob("*/*")
    )
    shards = sorted({(r // shard_blocks, c // shard_blocks) for r, c in blocks})
    assert image_files == valid_files == shards
    assert len(blocks) == result.n_written
    assert 0 < len(blocks) <= 36  # the 300 px sheet spans at most 6×6 blocks of 64 px
    # the covered blocks are exactly those where valid has pixels
    valid = open_image(out)["valid"].values
    rows, cols = np.nonzero(valid)
    assert sorted(set(zip((rows // 64).tolist(), (cols // 64).tolist(), strict=True))) == blocks


def test_all_nodata_block_not_written(tmp_path):
    data = np.zeros((4, 128, 128), dtype=np.uint8)
    data[:, :64, :64] = 7  # only block (0, 0) has valid pixels
    src = write_sheet(tmp_path / "s.tif", data, left=0, top=128, resolution=1.0)
    grid = RegionGrid("EPSG:2154", 1.0, 0.0, 128.0, 128, 128)
    result = _tile([src], tmp_path / "i.zarr", grid=grid)
    assert (result.n_written, result.n_empty) == (1, 3)
    assert covered_blocks(result.path) == [(0, 0)]


def test_uint16_and_nodata_override_and_no_nodata(tmp_path):
    rng = np.random.default_rng(5)
    data = rng.integers(0, 4000, size=(3, 64, 64), dtype=np.uint16)
    data[:, :10] = 9
    src = write_sheet(tmp_path / "u16.tif", data, left=0, top=64, resolution=1.0, nodata=None)
    grid = RegionGrid("EPSG:2154", 1.0, 0.0, 64.0, 64, 64)
    plain = _tile([src], tmp_path / "a.zarr", grid=grid, bands=BANDS[:3])
    ds = open_image(plain.path)
    assert plain.dtype == "uint16" and ds["image"].dtype == np.uint16
    np.testing.assert_array_equal(ds["image"].values, data)
    assert ds["valid"].values.all()  # no nodata, no mask: the whole footprint is valid
    over = open_image(_tile([src], tmp_path / "b.zarr", grid=grid, bands=BANDS[:3], nodata=9).path)
    assert not over["valid"].values[:10].any() and over["valid"].values[10:].all()


# --- resume ----------------------------------------------------------------------------------


def test_partial_run_then_rerun_equals_uninterrupted(ortho, tmp_path, monkeypatch):
    sources = ortho["aligned"] + ortho["reprojected"]
    grid = region_grid_for_sources(sources, crs="EPSG:2154", resolution=0.5)
    full = _tile(sources, tmp_path / "full" / "image.zarr", grid=grid, tile_size=32)

    calls = {"n": 0}
    original = tiling._process_task

    def crashing(job, block_ids, src_lists, srcs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("simulated crash")
        return original(job, block_ids, src_lists, srcs)

    monkeypatch.setattr(tiling, "_process_task", crashing)
    out = tmp_path / "partial" / "image.zarr"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _tile(sources, out, grid=grid, tile_size=32, workers=1)
    monkeypatch.setattr(tiling, "_process_task", original)
    resumed = _tile(sources, out, grid=grid, tile_size=32)
    assert resumed.n_skipped_resumed > 0
    assert resumed.n_written + resumed.n_empty + resumed.n_skipped_resumed == (
        full.n_written + full.n_empty
    )
    _assert_same_store(full.path, out)
    again = _tile(sources, out, grid=grid, tile_size=32)
    assert again.n_written == 0 and again.n_skipped_resumed == full.n_written + full.n_empty


def test_changed_settings_rewrite_store(ortho, tmp_path):
    grid = region_grid_for_sources(ortho["aligned"], crs="EPSG:2154", resolution=0.5)
    out = tmp_path / "image.zarr"
    _tile(ortho["aligned"][:1], out, grid=grid)
    second = _tile(ortho["aligned"][1:2], out, grid=grid)
    assert second.n_skipped_resumed == 0
    _assert_same_store(out, _tile(ortho["aligned"][1:2], tmp_path / "ref.zarr", grid=grid).path)


# The child kills itself from inside the run, after exactly ``kill_after`` block records (or just
# before the write that would reach them): no race with a parent polling the records, whatever
# the machine's speed. The hook sees the records through the descriptors that tasks.py opens
# with _open_log; if tiling stops writing records that way, the child finishes and the test fails.
_KILL_SCRIPT = """
import json, os, signal, sys
from pathlib import Path
from botaclip_core.grid import RegionGrid
from botaclip_core.tiling import tasks, tile_orthophotos

args = json.loads(sys.argv[1])
record_fds, n_records = set(), 0
open_log, write = tasks._open_log, os.write

def open_log_hooked(records):
    fd = open_log(records)
    record_fds.add(fd)
    return fd

def write_hooked(fd, data):
    global n_records
    if fd not in record_fds:
        return write(fd, data)
    lines = bytes(data).count(b"\\n")
    if args["when"] == "before_record" and n_records + lines >= args["kill_after"]:
        os.kill(os.getpid(), signal.SIGKILL)  # blocks written, their records not
    n = write(fd, data)
    n_records += lines
    if n_records >= args["kill_after"]:
        os.kill(os.getpid(), signal.SIGKILL)  # records written, nothing after them
    return n

tasks._open_log, os.write = open_log_hooked, write_hooked
tile_orthophotos([Path(p) for p in args["sources"]], Path(args["out"]),
                 grid=RegionGrid.from_dict(args["grid"]), bands=args["bands"],
                 wavelengths_um=args["wl"], tile_size=32, workers=1,
                 shard_blocks=args["shard_blocks"])
"""


def _recorded_blocks(records: Path) -> int:
    """Complete block records (newline-terminated lines) in a records folder's logs."""
    return sum(p.read_text().count("\n") for p in records.glob("*.log"))


@pytest.fixture(scope="module")
def uninterrupted(ortho, tmp_path_factory):
    """Uninterrupted runs (tile_size 32) by shard_blocks, made once per module; read only."""
    sources = ortho["aligned"] + ortho["reprojected"]
    grid = region_grid_for_sources(sources, crs="EPSG:2154", resolution=0.5)
    runs: dict[int, TilingResult] = {}

    def run(shard_blocks: int) -> TilingResult:
        if shard_blocks not in runs:
            out = tmp_path_factory.mktemp(f"uninterrupted{shard_blocks}") / "image.zarr"
            runs[shard_blocks] = _tile(
                sources, out, grid=grid, tile_size=32, shard_blocks=shard_blocks
            )
        return runs[shard_blocks]

    return run


@pytest.mark.parametrize(
    ("shard_blocks", "when"),
    # killed right after a record (unsharded: mid-task; sharded: after a shard's records), and
    # between a shard's write and its records
    [(1, "after_record"), (2, "after_record"), (2, "before_record")],
)
def test_sigkill_then_rerun_equals_uninterrupted(
    ortho, tmp_path, uninterrupted, shard_blocks, when
):
    sources = ortho["aligned"] + ortho["reprojected"]
    grid = region_grid_for_sources(sources, crs="EPSG:2154", resolution=0.5)
    ref = uninterrupted(shard_blocks)
    total = ref.n_written + ref.n_empty
    kill_after = total // 3 + 1  # 71 of 211: past the first task (≤ 64 blocks) when unsharded
    out = tmp_path / "killed" / "image.zarr"
    args = {
        "sources": [str(p) for p in sources],
        "out": str(out),
        "grid": grid.to_dict(),
        "bands": BANDS,
        "wl": WAVELENGTHS,
        "shard_blocks": shard_blocks,
        "when": when,
        "kill_after": kill_after,
    }
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, json.dumps(args)], cwd=REPO, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, "the child was to kill itself mid-run"
    recorded = _recorded_blocks(records_dir(out))
    if when == "after_record":
        # a shard's records are one write: up to shard_blocks² of them land together
        assert kill_after <= recorded < kill_after + shard_blocks**2
    else:
        assert kill_after - shard_blocks**2 <= recorded < kill_after
    assert 0 < recorded < total
    assert (
        not (out / "zarr.json").exists()
        or json.loads((out / "zarr.json").read_text()).get("consolidated_metadata") is None
    )
    resumed = _tile(sources, out, grid=grid, tile_size=32, shard_blocks=shard_blocks)
    assert resumed.n_skipped_resumed == recorded
    assert resumed.n_written + resumed.n_empty == total - recorded
    _assert_same_store(ref.path, out)


def test_half_written_shard_with_some_blocks_recorded_is_redone_whole(ortho, tmp_path):
    sources = ortho["aligned"] + ortho["reprojected"]
    grid = region_grid_for_sources(sources, crs="EPSG:2154", resolution=0.5)
    ref = _tile(sources, tmp_path / "ref.zarr", grid=grid, tile_size=32, shard_blocks=4)
    out = _tile(sources, tmp_path / "out.zarr", grid=grid, tile_size=32, shard_blocks=4).path
    # a kill while writing shard (0, 0): its file cut short, only some of its blocks recorded
    shard = out / "image" / "c" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    n_bcols = -(-grid.width // 32)
    dropped = 0
    for log in records_dir(out).glob("*.log"):
        lines = log.read_text().splitlines(keepends=True)
        keep = []
        for line in lines:
            r, c, _ = line.split()
            in_shard = int(r) < 4 and int(c) < 4
            if in_shard and (int(r) * n_bcols + int(c)) % 2:
                dropped += 1
                continue
            keep.append(line)
        log.write_text("".join(keep))
    assert dropped > 0
    resumed = _tile(sources, out, grid=grid, tile_size=32, shard_blocks=4)
    assert resumed.n_written + resumed.n_empty == 16  # the whole shard, not just the dropped
    _assert_same_store(ref.path, out)


# --- parallel back-ends ----------------------------------------------------------------------


def test_distributed_client_gives_same_store(ortho, tmp_path):
    distributed = pytest.importorskip("distributed")
    grid = region_grid_for_sources(ortho["aligned"], crs="EPSG:2154", resolution=0.5)
    ref = _tile(ortho["aligned"], tmp_path / "ref.zarr", grid=grid)
    with distributed.Client(
        processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None
    ) as client:
        got = _tile(ortho["aligned"], tmp_path / "dist.zarr", grid=grid, dask_client=client)
    np.testing.assert_array_equal(
        open_image(ref.path)["image"].values, open_image(got.path)["image"].values
    )
    np.testing.assert_array_equal(
        open_image(ref.path)["valid"].values, open_image(got.path)["valid"].values
    )


def test_worker_processes_give_the_same_store_byte_for_byte(ortho, tmp_path):
    # two worker processes, each writing whole shards and its own records log
    distributed = pytest.importorskip("distributed")
    sources = ortho["aligned"] + ortho["reprojected"]
    grid = region_grid_for_sources(sources, crs="EPSG:2154", resolution=0.5)
    ref = _tile(sources, tmp_path / "ref.zarr", grid=grid, tile_size=32, shard_blocks=2)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        got = _tile(
            sources,
            tmp_path / "proc.zarr",
            grid=grid,
            tile_size=32,
            shard_blocks=2,
            dask_client=client,
        )
    assert len(list(records_dir(got.path).glob("*.log"))) == 2
    _assert_same_store(ref.path, got.path)


# --- errors ----------------------------------------------------------------------------------


def test_unreadable_source_names_file(ortho, tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_text("not a raster")
    grid = region_grid_for_sources(ortho["aligned"], crs="EPSG:2154", resolution=0.5)
    with pytest.raises(InputDataError, match="broken.tif"):
        _tile([ortho["aligned"][0], bad], tmp_path / "i.zarr", grid=grid)


def test_source_without_crs_names_file_and_fix(tmp_path):
    data = np.ones((4, 32, 32), dtype=np.uint8)
    path = tmp_path / "nocrs.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=32, height=32, count=4, dtype="uint8"
    ) as dst:
        dst.write(data)
    grid = RegionGrid("EPSG:2154", 1.0, 0.0, 32.0, 32, 32)
    with pytest.raises(CRSMismatchError, match=r"nocrs\.tif.*no CRS.*-a_srs"):
        _tile([path], tmp_path / "i.zarr", grid=grid)


def test_band_count_mismatch_names_file_and_bands(ortho, tmp_path):
    grid = region_grid_for_sources(ortho["aligned"], crs="EPSG:2154", resolution=0.5)
    with pytest.raises(
        InputDataError, match=r"sheet_0\.tif: has 4 bands.*3 bands \['nir', 'red', 'green'\]"
    ):
        _tile(ortho["aligned"][:1], tmp_path / "i.zarr", grid=grid, bands=["nir", "red", "green"])


def test_non_intersecting_source_warns_and_none_raises(ortho, tmp_path, caplog):
    a = ortho["aligned"][0]
    far = RegionGrid("EPSG:2154", 0.5, 100_000.0, 6_000_000.0, 64, 64)
    with pytest.raises(InputDataError, match="none of the 1 orthophotos"):
        _tile([a], tmp_path / "i.zarr", grid=far)
    grid = region_grid_for_sources([ortho["aligned"][1]], crs="EPSG:2154", resolution=0.5)
    with rasterio.open(a) as s:
        corner = s.bounds.left
    assert corner < grid.left
    with caplog.at_level(logging.WARNING, logger="botaclip_core.tiling"):
        far_data = np.full((4, 16, 16), 5, dtype=np.uint8)
        far_src = write_sheet(tmp_path / "far.tif", far_data, left=100_000.0, top=6_000_000.0)
        _tile([ortho["aligned"][1], far_src], tmp_path / "j.zarr", grid=grid)
    assert any(
        "far.tif" in r.getMessage() and "does not intersect" in r.getMessage()
        for r in caplog.records
    )


def test_bad_settings_rejected(ortho, tmp_path):
    grid = region_grid_for_sources(ortho["aligned"], crs="EPSG:2154", resolution=0.5)
    with pytest.raises(InputDataError, match="resampling"):
        _tile(ortho["aligned"], tmp_path / "i.zarr", grid=grid, resampling="spline")
    with pytest.raises(InputDataError, match="precedence"):
        _tile(ortho["aligned"], tmp_path / "i.zarr", grid=grid, precedence="random")
    with pytest.raises(InputDataError, match="wavelengths_um"):
        _tile(ortho["aligned"], tmp_path / "i.zarr", grid=grid, wavelengths_um=[0.5])
    with pytest.raises(InputDataError, match="shard_blocks: 0"):
        _tile(ortho["aligned"], tmp_path / "i.zarr", grid=grid, shard_blocks=0)
    with pytest.raises(InputDataError, match="zstd_level: 30 .* -7 to 22"):
        _tile(ortho["aligned"], tmp_path / "i.zarr", grid=grid, zstd_level=30)
    assert not (tmp_path / "i.zarr").exists()


def test_zstd_level_is_recorded_and_trades_size(ortho, tmp_path):
    grid = region_grid_for_sources(ortho["aligned"], crs="EPSG:2154", resolution=0.5)
    sizes = {}
    for level in (-5, 1):
        out = _tile(ortho["aligned"], tmp_path / f"l{level}.zarr", grid=grid, zstd_level=level).path
        meta = json.loads((out / "image" / "zarr.json").read_text())
        inner = meta["codecs"][0]["configuration"]["codecs"]
        assert inner[1] == {"name": "zstd", "configuration": {"level": level, "checksum": False}}
        sizes[level] = sum(
            p.stat().st_size for p in (out / "image" / "c").rglob("*") if p.is_file()
        )
        if level == 1:
            np.testing.assert_array_equal(
                open_image(out)["image"].values, open_image(tmp_path / "l-5.zarr")["image"].values
            )
    assert sizes[1] < sizes[-5]


# --- real data -------------------------------------------------------------------------------


def test_naip_on_own_grid_is_exact(tmp_path, realdata):
    src = sorted((realdata / "naip").glob("*.tif"))[0]
    with rasterio.open(src) as s:
        # the file's own lattice (its top, 5209247, is not a multiple of 5 m)
        grid = RegionGrid(s.crs.to_string(), 5.0, s.bounds.left, s.bounds.top, s.width, s.height)
        data = s.read()
    ds = open_image(_tile([src], tmp_path / "naip.zarr", grid=grid, tile_size=224).path)
    assert ds.rio.crs == grid.crs_obj and ds.rio.transform() == grid.transform
    valid = (data != 0).any(axis=0)
    np.testing.assert_array_equal(ds["valid"].values.astype(bool), valid)
    np.testing.assert_array_equal(ds["image"].values[:, valid], data[:, valid])


def test_naip_reprojected_matches_rasterio_warp(tmp_path, realdata):
    src = sorted((realdata / "naip").glob("*.tif"))[0]
    grid = region_grid_for_sources([src], crs="EPSG:32614", resolution=5.0)
    ds = open_image(_tile([src], tmp_path / "naip.zarr", grid=grid, tile_size=224).path)
    ref = _rasterio_warp(src, grid)
    valid = ds["valid"].values.astype(bool)
    both = valid & ref.any(axis=0)
    assert both.sum() > 0.95 * valid.sum()
    diff = np.abs(ds["image"].values[:, both].astype(int) - ref[:, both].astype(int))
    assert diff.mean() <= 1.0


def test_neon_sjer_crops_on_own_grid_are_exact_and_sparse(tmp_path, realdata):
    plots = realdata / "neon" / "plots"
    sources = [plots / "SJER_015.tif", plots / "SJER_022.tif"]
    grid = region_grid_for_sources(sources, crs="EPSG:32611", resolution=0.1)
    result = _tile(
        sources, tmp_path / "sjer.zarr", grid=grid, bands=["red", "green", "blue"], tile_size=224
    )
    ds = open_image(result.path)
    assert ds.rio.crs == grid.crs_obj and ds.rio.transform() == grid.transform
    assert result.n_written < result.n_blocks / 10  # two 40 m crops in a ~340 m × 250 m box
    for src in sources:
        with rasterio.open(src) as s:
            data, nodata = s.read(), s.nodata
            rows, cols = grid.rowcol(
                np.array([s.bounds.left + 0.05]), np.array([s.bounds.top - 0.05])
            )
        r0, c0 = int(rows[0]), int(cols[0])
        valid = (data != nodata).any(axis=0)
        h, w = valid.shape
        np.testing.assert_array_equal(
            ds["valid"].values[r0 : r0 + h, c0 : c0 + w].astype(bool), valid
        )
        window = ds["image"][:, r0 : r0 + h, c0 : c0 + w].values
        np.testing.assert_array_equal(window[:, valid], data[:, valid])
