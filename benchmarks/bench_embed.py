"""Embedding throughput: the embed pipeline (image Zarr → map) against the model's own limit.

``model_only`` is the same DOFA, batch size, precision and thread count on in-memory random
tensors, in this process (the compute limit; timed half before and half after the pipeline, so
that a change in the machine's load hits both alike). ``pipeline`` is
:func:`botaclip_core.embed.embed_region` end to end, as the embed-dofa stage runs it: an image
Zarr (sharded, zstd, as tiling writes it) to a written, consolidated map, resumable block records
included. The backbone is built once per process (as a Dask worker builds it) before both.
``adapter_only_s`` regenerates a BotaCLIP map (a D × D linear adapter) from the cached DOFA
cube; ``dofa_pass_s`` is the pipeline's time. ``peak_rss_mb_1x`` / ``_4x`` are the peak RSS of
the same pipeline run in a fresh process on the region and on one 4× larger (2× per side).

Needs torch, numpy and the Zarr stack (zarr, numcodecs, xarray, dask) only: no Prefect, rasterio
or GDAL; it writes its own synthetic image store. Prints one JSON line.

    python benchmarks/bench_embed.py                         # CPU: DOFA-Base fp32, batch 8
    python benchmarks/bench_embed.py --tiles 32 --dofa-size tiny   # a quick check
    python benchmarks/bench_embed.py --device cuda           # GPU: bf16, batch 256, 20,736 tiles
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from botaclip_core.embed import BackboneSpec, embed_region, transform_embeddings  # noqa: E402
from botaclip_core.features import (  # noqa: E402
    default_batch_size,
    load_backbone,
    plan_precision,
    precision_context,
)
from botaclip_core.models.dofa import DOFA_SIZES  # noqa: E402
from botaclip_core.training.runtime import resolve_device  # noqa: E402

logger = logging.getLogger("bench_embed")

TILE = 224
BANDS = 4
WAVES = (0.665, 0.56, 0.49, 0.842)
MEAN = (110.0, 105.0, 95.0, 120.0)
STD = (50.0, 45.0, 45.0, 55.0)
SHARD_BLOCKS = 8  # tiling's default
CRS = "EPSG:2154"
# the CRS description copied into the maps; the benchmark never parses it (no PROJ here)
CRS_WKT = 'PROJCS["RGF93 v1 / Lambert-93",AUTHORITY["EPSG","2154"]]'
CPU_TILES = 384
CUDA_TILES = 20_736  # 144 × 144 tiles: enough batches of 256 to reach the steady state


def region_shape(tiles: int, block: int) -> tuple[int, int]:
    """Rows and columns of tiles: about ``tiles``, nearly square, whole blocks."""
    rows = max(block, round(math.sqrt(tiles) / block) * block)
    cols = max(block, round(tiles / rows / block) * block)
    return rows, cols


def write_image_store(path: Path, rows: int, cols: int, *, seed: int = 0) -> Path:
    """A synthetic 4-band uint8 image store laid out as tiling writes it (sharded, zstd level 1).

    Pixels are a smooth field plus noise (zstd compresses them about 2×, as it does aerial
    imagery), every pixel valid; the grid attributes are botaclip's.
    """
    height, width = rows * TILE, cols * TILE
    res = 0.2
    grid = {"crs": CRS, "resolution": res, "left": 700_000.0, "top": 6_600_000.0}
    grid.update(width=width, height=height)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.attrs.update(
        {
            "botaclip:grid": grid,
            "proj:code": CRS,
            "proj:wkt2": CRS_WKT,
            "tile_size": TILE,
            "bands": ["r", "g", "b", "n"],
            "wavelengths_um": list(WAVES),
        }
    )
    side = SHARD_BLOCKS * TILE
    codec = [ZstdCodec(level=1)]
    image = group.create_array(
        "image",
        shape=(BANDS, height, width),
        chunks=(BANDS, TILE, TILE),
        shards=(BANDS, side, side),
        dtype="uint8",
        fill_value=0,
        compressors=codec,
        dimension_names=("band", "y", "x"),
    )
    valid = group.create_array(
        "valid",
        shape=(height, width),
        chunks=(TILE, TILE),
        shards=(side, side),
        dtype="uint8",
        fill_value=0,
        compressors=codec,
        dimension_names=("y", "x"),
    )
    ref = group.create_array("spatial_ref", shape=(), dtype="int32", fill_value=0)
    ref.attrs.update({"crs_wkt": CRS_WKT, "spatial_ref": CRS_WKT})
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    pool = []  # a few distinct shards, written in turn: generating every pixel would dominate
    for _ in range(4):
        phase = rng.uniform(0, 2 * np.pi, size=(BANDS, 1, 1)).astype(np.float32)
        field = 80 + 40 * np.sin(yy / 97.0 + xx / 61.0 + phase)
        noise = rng.integers(0, 24, size=(BANDS, side, side), dtype=np.uint8)
        pool.append((field + noise).astype(np.uint8))
    ones = np.ones((side, side), dtype=np.uint8)

    def write_shard(at: tuple[int, int]) -> None:
        r0, c0 = at
        h, w = min(side, height - r0), min(side, width - c0)
        image[:, r0 : r0 + h, c0 : c0 + w] = pool[(r0 // side + c0 // side) % 4][:, :h, :w]
        valid[r0 : r0 + h, c0 : c0 + w] = ones[:h, :w]

    shards = [(r0, c0) for r0 in range(0, height, side) for c0 in range(0, width, side)]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as threads:
        list(threads.map(write_shard, shards))
    return path


def spec_for(args: argparse.Namespace, precision: str, batch: int) -> BackboneSpec:
    return BackboneSpec(
        size=args.dofa_size,
        weights=None,
        seed=0,
        wavelengths_um=WAVES,
        mean=MEAN,
        std=STD,
        batch_size=batch,
        device=args.device,
        precision=precision,
    )


def model_only(
    device: torch.device, size: str, batch: int, precision: str, batches: int
) -> tuple[int, float]:
    """Tiles and seconds of ``batches`` forwards on random tensors already on the device."""
    model = load_backbone(size, None, 0, device)
    autocast = precision_context(device, precision)
    waves = torch.tensor(WAVES, device=device)
    x = torch.randn(batch, BANDS, TILE, TILE, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(batches):
            with autocast():
                out = model.forward_features(x, waves)
            out.float().cpu()  # the features leave the device, as the pipeline's do
        sync()
        return batch * batches, time.perf_counter() - start


def warm_up(device: torch.device, size: str, batch: int, precision: str) -> None:
    model_only(device, size, batch, precision, 2 if device.type == "cuda" else 1)


def run_pipeline(image: Path, out: Path, spec: BackboneSpec, block: int) -> tuple[int, float]:
    start = time.perf_counter()
    info = embed_region(
        image,
        out,
        spec=spec,
        dim=DOFA_SIZES[spec.size].embed_dim,
        tile_size=TILE,
        block_tiles=block,
        attrs={"source": "bench"},
    )
    return int(info["tiles_embedded"]), time.perf_counter() - start


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_run(args: argparse.Namespace) -> None:
    """The pipeline alone in this fresh process; prints its peak RSS (MiB)."""
    spec = spec_for(args, args.precision, args.batch_size)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        run_pipeline(Path(args.rss_run), Path(tmp) / "dofa.zarr", spec, args.block_tiles)
    print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1)}))


def rss_in_subprocess(
    args: argparse.Namespace, image: Path, precision: str, batch: int, threads: int
) -> float:
    cmd = [
        sys.executable,
        __file__,
        "--rss-run",
        str(image),
        "--device",
        args.device,
        "--dofa-size",
        args.dofa_size,
        "--batch-size",
        str(batch),
        "--precision",
        precision,
        "--threads",
        str(threads),
        "--block-tiles",
        str(args.block_tiles),
        "--workdir",
        str(args.workdir),
    ]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def adapter_only(dofa: Path, out: Path, dim: int) -> float:
    """Seconds to regenerate a BotaCLIP map (x @ W + b, as the embed stage's adapter) from ``dofa``."""
    rng = np.random.default_rng(0)
    weight = (np.eye(dim) + 0.01 * rng.standard_normal((dim, dim))).astype(np.float32)
    bias = (0.01 * rng.standard_normal(dim)).astype(np.float32)
    start = time.perf_counter()
    transform_embeddings(
        dofa, out, lambda x: x @ weight + bias, out_dim=dim, attrs={"source": "botaclip"}
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dofa-size", default="base", choices=sorted(DOFA_SIZES))
    parser.add_argument("--tiles", type=int, default=None, help="default 384 CPU, 20,736 CUDA")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 CPU, 256 CUDA")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on CUDA), fp32, bf16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--block-tiles", type=int, default=None, help="default 4 CPU, 8 CUDA")
    parser.add_argument("--skip-rss", action="store_true", help="leave out the two RSS runs")
    parser.add_argument("--workdir", default=None, help="where the stores go (default: /tmp)")
    parser.add_argument("--rss-run", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("botaclip_core.models.checkpoints").setLevel(logging.ERROR)  # random weights
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device, field="--device")
    cuda = device.type == "cuda"
    args.block_tiles = args.block_tiles or (8 if cuda else 4)
    args.precision = plan_precision(str(device), args.precision)
    args.batch_size = args.batch_size or default_batch_size(device, args.dofa_size)
    if args.rss_run:
        rss_run(args)
        return
    batch, precision, threads = args.batch_size, args.precision, torch.get_num_threads()
    tiles = args.tiles or (CUDA_TILES if cuda else CPU_TILES)
    rows, cols = region_shape(tiles, args.block_tiles)
    spec = spec_for(args, precision, batch)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        args.workdir = root
        image = write_image_store(root / "image.zarr", rows, cols)
        dim = DOFA_SIZES[args.dofa_size].embed_dim
        warm_up(device, args.dofa_size, batch, precision)
        n_tiles = rows * cols
        batches = max(2, math.ceil(n_tiles / batch) // 2)
        cpu = [time.process_time()]
        t1, s1 = model_only(device, args.dofa_size, batch, precision, batches)
        cpu.append(time.process_time())
        done, pipeline_s = run_pipeline(image, root / "dofa.zarr", spec, args.block_tiles)
        cpu.append(time.process_time())
        t2, s2 = model_only(device, args.dofa_size, batch, precision, batches)
        cpu.append(time.process_time())
        # CPU seconds per tile: steadier than wall time on a shared machine (stderr only)
        model_cpu = (cpu[1] - cpu[0] + cpu[3] - cpu[2]) / (t1 + t2)
        logger.warning(
            "CPU s/tile: model-only %.3f (walls %.1f s, %.1f s), pipeline %.3f (wall %.1f s)",
            model_cpu,
            s1,
            s2,
            (cpu[2] - cpu[1]) / max(done, 1),
            pipeline_s,
        )
        model_rate = (t1 + t2) / (s1 + s2)
        pipeline_rate = done / pipeline_s
        adapter_s = adapter_only(root / "dofa.zarr", root / "botaclip.zarr", dim)
        rss_1x = rss_4x = None
        if not args.skip_rss:
            big = write_image_store(root / "image4x.zarr", 2 * rows, 2 * cols, seed=1)
            rss_1x = rss_in_subprocess(args, image, precision, batch, threads)
            rss_4x = rss_in_subprocess(args, big, precision, batch, threads)
    name = f"{device} ({torch.cuda.get_device_name(device)})" if cuda else "cpu"
    print(
        json.dumps(
            {
                "device": name,
                "dofa_size": args.dofa_size,
                "batch_size": batch,
                "precision": precision,
                "threads": threads,
                "tiles": done,
                "model_only_tiles_per_s": round(model_rate, 2),
                "pipeline_tiles_per_s": round(pipeline_rate, 2),
                "ratio": round(pipeline_rate / model_rate, 3),
                "adapter_only_s": round(adapter_s, 2),
                "dofa_pass_s": round(pipeline_s, 2),
                "peak_rss_mb_1x": rss_1x,
                "peak_rss_mb_4x": rss_4x,
            }
        )
    )


if __name__ == "__main__":
    main()
