"""Benchmark: tile_orthophotos vs a naive rioxarray pipeline vs the read floor, plus peak RSS.

Generates (seeded) a mosaic of 4-band uint8 DEFLATE GeoTIFF sheets on the EPSG:2154 0.5 m
lattice (≈ 270 Mpx, ≈ 1.07 GB of pixels at --scale 1; sheets overlap by 64 px), then times:

- ``ours_s``: ``tile_orthophotos`` onto the region grid (subprocess, ``--workers`` threads);
- ``naive_rioxarray_s``: ``rioxarray.open_rasterio`` of each sheet, ``reproject_match`` onto the
  grid, merge (first valid wins, like ours), ``to_zarr`` with the same chunks and codec;
- ``read_limit_s``: reading every source pixel with rasterio, block-windowed, same thread count;
- peak RSS of ours on the region (1×) and on a 2×2 mosaic of it (4×: the same sheets plus
  three VRT copies shifted by the mosaic's size), each in its own subprocess (``os.wait4``).

With ``--sources aligned`` (the default) the grid is the sheets' own EPSG:2154 lattice, so every
sheet is copied exactly; with ``--sources reprojected`` the grid is EPSG:32631 (UTM 31N) at the same
resolution, so every sheet is warped (bilinear), by ours and by the naive pipeline alike. With ``--repeat N`` the read floor and ours (1×) are timed N times,
alternating, and the fastest of each is reported, so that load from other jobs on the machine
weighs on both alike. Before each timing the page cache is flushed (``os.sync``) and no output
is deleted until the end: otherwise one contender's write-back and freed blocks slow down the
file creation of the next (ext4 here: from 0.1 to 1 ms per chunk file). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.transform import from_origin

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RES = 0.5
GRID_CRS = {"aligned": "EPSG:2154", "reprojected": "EPSG:32631"}
ORIGIN = (652_000.0, 6_862_000.0)
BANDS = ["red", "green", "blue", "nir"]
WAVELENGTHS = [0.665, 0.56, 0.49, 0.842]
OVERLAP = 64


def make_sheets(workdir: Path, scale: float, seed: int = 0) -> list[Path]:
    """4×4 sheets totalling ≈ 270·scale Mpx, tiled 512, DEFLATE, nodata 0 margins."""
    side = max(256, int(round(4096 * math.sqrt(scale) / 16)) * 16)
    rng = np.random.default_rng(seed)
    paths = []
    step = side - OVERLAP
    for i in range(4):
        for j in range(4):
            path = workdir / f"sheet_{i}_{j}.tif"
            paths.append(path)
            if path.exists():
                continue
            profile = {
                "driver": "GTiff",
                "width": side,
                "height": side,
                "count": 4,
                "dtype": "uint8",
                "crs": "EPSG:2154",
                "transform": from_origin(
                    ORIGIN[0] + j * step * RES, ORIGIN[1] - i * step * RES, RES, RES
                ),
                "nodata": 0,
                "tiled": True,
                "blockxsize": 512,
                "blockysize": 512,
                "compress": "deflate",
                "zlevel": 1,
                "predictor": 2,
            }
            base = rng.uniform(30, 200, size=4)
            yy = np.arange(side, dtype=np.float32)[:, None]
            with rasterio.open(path.with_suffix(".tmp.tif"), "w", **profile) as dst:
                for r0 in range(0, side, 512):
                    h = min(512, side - r0)
                    xx = np.arange(side, dtype=np.float32)[None, :]
                    wave = 25 * np.sin((yy[r0 : r0 + h] + xx) / 37.0) * np.cos(xx / 53.0)
                    noise = rng.integers(-6, 7, size=(4, h, side), dtype=np.int16)
                    data = np.clip(base[:, None, None] + wave[None] + noise, 1, 255).astype(
                        np.uint8
                    )
                    if r0 == 0:
                        data[:, :8] = 0  # a nodata margin along the top
                    dst.write(data, window=rasterio.windows.Window(0, r0, side, h))
            os.replace(path.with_suffix(".tmp.tif"), path)
    return paths


def shifted_vrt(src: Path, dst: Path, dx: float, dy: float) -> Path:
    """A VRT of ``src`` moved by (dx, dy) map units (for the 4× region without more disk)."""
    with rasterio.open(src) as ds:
        t = ds.transform
        bands = "".join(
            f'<VRTRasterBand dataType="Byte" band="{b}"><NoDataValue>0</NoDataValue>'
            f'<SimpleSource><SourceFilename relativeToVRT="0">{src}</SourceFilename>'
            f"<SourceBand>{b}</SourceBand>"
            f'<SrcRect xOff="0" yOff="0" xSize="{ds.width}" ySize="{ds.height}"/>'
            f'<DstRect xOff="0" yOff="0" xSize="{ds.width}" ySize="{ds.height}"/>'
            "</SimpleSource></VRTRasterBand>"
            for b in range(1, ds.count + 1)
        )
        xml = (
            f'<VRTDataset rasterXSize="{ds.width}" rasterYSize="{ds.height}">'
            f"<SRS>{ds.crs.to_wkt()}</SRS>"
            f"<GeoTransform>{t.c + dx}, {t.a}, 0, {t.f + dy}, 0, {t.e}</GeoTransform>"
            f"{bands}</VRTDataset>"
        )
    dst.write_text(xml)
    return dst


def read_limit(paths: list[Path], workers: int) -> float:
    os.sync()

    def read_all(path: Path) -> int:
        n = 0
        with rasterio.open(path) as ds:
            for _, window in ds.block_windows(1):
                n += ds.read(window=window).size
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(read_all, paths))
    return time.perf_counter() - t0


def import_libraries() -> None:
    """Import what the contenders use before timing them, as the read floor's rasterio is.

    Timings then cover the work, not a process's first import of dask, distributed (which dask's
    scheduler lookup imports), zarr and xarray's writers (about 1 s here).
    """
    import dask.array  # noqa: F401
    import distributed  # noqa: F401
    import numcodecs.zstd  # noqa: F401
    import rioxarray  # noqa: F401
    import xarray.backends.zarr  # noqa: F401
    import zarr.codecs  # noqa: F401


def child_ours(args: argparse.Namespace) -> None:
    from botaclip_core.tiling import region_grid_for_sources, tile_orthophotos

    import_libraries()
    sources = [Path(p) for p in json.loads(args.sources)]
    grid = region_grid_for_sources(sources, crs=args.crs, resolution=RES)
    t0 = time.perf_counter()
    tile_orthophotos(
        sources,
        Path(args.out),
        grid=grid,
        bands=BANDS,
        wavelengths_um=WAVELENGTHS,
        tile_size=args.tile_size,
        zstd_level=args.zstd_level,
        workers=args.workers,
    )
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def child_naive(args: argparse.Namespace) -> None:
    import dask
    import rioxarray
    import xarray as xr
    from zarr.codecs import ZstdCodec

    from botaclip_core.georef import grid_coords
    from botaclip_core.tiling import region_grid_for_sources

    import_libraries()
    sources = [Path(p) for p in json.loads(args.sources)]
    grid = region_grid_for_sources(sources, crs=args.crs, resolution=RES)
    t0 = time.perf_counter()
    coords = grid_coords(grid)
    template = (
        xr.DataArray(
            dask.array.zeros((grid.height, grid.width), dtype=np.uint8, chunks=4096),
            dims=("y", "x"),
            coords={"y": coords["y"][1], "x": coords["x"][1]},
        )
        .rio.write_crs(grid.crs)
        .rio.write_transform(grid.transform)
    )
    # the same resampling as ours: bilinear where sheets are warped, a plain copy where aligned
    resampling = Resampling.nearest if args.crs == GRID_CRS["aligned"] else Resampling.bilinear
    merged = None
    for path in sources:
        da = rioxarray.open_rasterio(path).rio.reproject_match(
            template, nodata=0, resampling=resampling
        )
        merged = da if merged is None else merged.where(merged.any("band"), da)
        merged = merged.compute()
    assert merged is not None
    ds = (
        merged.rename("image")
        .to_dataset()
        .chunk({"band": 4, "y": args.tile_size, "x": args.tile_size})
    )
    ds["valid"] = (
        (merged.any("band")).astype(np.uint8).chunk({"y": args.tile_size, "x": args.tile_size})
    )
    codec = ZstdCodec(level=args.zstd_level)
    ds.to_zarr(
        args.out,
        mode="w",
        zarr_format=3,
        consolidated=True,
        encoding={"image": {"compressors": [codec]}, "valid": {"compressors": [codec]}},
    )
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def run_child(kind: str, sources: list[Path], out: Path, args: argparse.Namespace) -> dict:
    for stale in (out, out.parent / (out.name + ".blocks")):
        shutil.rmtree(stale, ignore_errors=True)  # a leftover store would be resumed, not redone
    os.sync()
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--source-list",
        json.dumps([str(p) for p in sources]),
        "--out",
        str(out),
        "--tile-size",
        str(args.tile_size),
        "--workers",
        str(args.workers),
        "--crs",
        GRID_CRS[args.layout],
        "--zstd-level",
        str(args.zstd_level),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child failed with exit code {proc.returncode}")
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the ≈270 Mpx set")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--tile-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="timings of floor and ours (min)")
    parser.add_argument(
        "--sources",
        dest="layout",
        choices=sorted(GRID_CRS),
        default="aligned",
        help="aligned: copy sheets on their own lattice; reprojected: warp them to UTM 31N",
    )
    parser.add_argument("--zstd-level", type=int, default=1, help="chunk codec level (both)")
    parser.add_argument("--child", choices=["ours", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--crs", default=GRID_CRS["aligned"], help=argparse.SUPPRESS)
    parser.add_argument("--source-list", dest="sources", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "ours":
        return child_ours(args)
    if args.child == "naive":
        return child_naive(args)

    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_tiling_")
        args.workdir = Path(tmp.name)
    work = Path(args.workdir)
    (work / "src").mkdir(parents=True, exist_ok=True)
    sheets = make_sheets(work / "src", args.scale)
    with rasterio.open(sheets[0]) as ds:
        side = ds.width
    extent = (4 * (side - OVERLAP) + OVERLAP) * RES
    quad = list(sheets)
    for k, (dx, dy) in enumerate([(extent, 0.0), (0.0, -extent), (extent, -extent)]):
        quad += [shifted_vrt(p, work / "src" / f"q{k}_{p.stem}.vrt", dx, dy) for p in sheets]
    megapixels = sum(rasterio.open(p).width * rasterio.open(p).height for p in sheets) / 1e6

    read_limit(sheets, args.workers)  # warm the page cache for every contender
    read_s, ours = math.inf, {"seconds": math.inf, "peak_rss_mb": 0.0}
    for k in range(max(args.repeat, 1)):
        read_s = min(read_s, read_limit(sheets, args.workers))
        run = run_child("ours", sheets, work / "out" / f"ours_1x_{k}.zarr", args)
        ours = {
            "seconds": min(ours["seconds"], run["seconds"]),
            "peak_rss_mb": max(ours["peak_rss_mb"], run["peak_rss_mb"]),
        }
    store_mb = (
        sum(p.stat().st_size for p in (work / "out" / "ours_1x_0.zarr").rglob("*") if p.is_file())
        / 2**20
    )
    ours4 = run_child("ours", quad, work / "out" / "ours_4x.zarr", args)
    naive_s = None
    if not args.skip_naive:
        naive_s = run_child("naive", sheets, work / "out" / "naive.zarr", args)["seconds"]
    print(
        json.dumps(
            {
                "megapixels": round(megapixels, 1),
                "sources": args.layout,
                "zstd_level": args.zstd_level,
                "store_mb": round(store_mb, 1),
                "ours_s": round(ours["seconds"], 2),
                "naive_rioxarray_s": None if naive_s is None else round(naive_s, 2),
                "read_limit_s": round(read_s, 2),
                "ours_mpx_per_s": round(megapixels / ours["seconds"], 1),
                "peak_rss_mb_1x": round(ours["peak_rss_mb"], 1),
                "peak_rss_mb_4x": round(ours4["peak_rss_mb"], 1),
                "ours_over_read_limit": round(ours["seconds"] / read_s, 2),
                "ours_over_naive": None if naive_s is None else round(ours["seconds"] / naive_s, 2),
            }
        )
    )
    shutil.rmtree(work / "out", ignore_errors=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
