"""Embedding on CUDA (marked ``gpu``, skipped without a GPU), and the GPU check's import path.

The GPU machines have torch and numpy but neither Prefect, rasterio nor pydantic: this module
imports only what ``benchmarks/gpu_check.sh`` carries, and its stores come from the benchmark's
synthetic image writer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from botaclip_core.embed import BackboneSpec, embed_region
from botaclip_core.embedding_store import EmbeddingStore

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
from bench_embed import write_image_store  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SPEC = BackboneSpec(
    size="tiny",
    weights=None,
    seed=0,
    wavelengths_um=(0.665, 0.56, 0.49, 0.842),
    mean=(110.0, 105.0, 95.0, 120.0),
    std=(50.0, 45.0, 45.0, 55.0),
    batch_size=None,
)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return write_image_store(tmp_path_factory.mktemp("gpu") / "image.zarr", 6, 10)


def embed(image: Path, out: Path, spec: BackboneSpec, size: str = "tiny") -> np.ndarray:
    dim = {"tiny": 64, "base": 768}[size]
    embed_region(image, out, spec=spec, dim=dim, tile_size=224, block_tiles=4)
    return EmbeddingStore(out).read(slice(None), slice(None))


@pytest.mark.gpu
@cuda
def test_cuda_fp32_map_equals_the_cpu_map(image, tmp_path):
    cpu = embed(image, tmp_path / "cpu.zarr", dataclasses.replace(SPEC, batch_size=8))
    gpu = embed(image, tmp_path / "gpu.zarr", dataclasses.replace(SPEC, device="cuda"))
    assert not np.isnan(cpu).any()
    # cuDNN convolutions may use TF32: a few 1e-3 on features of unit scale
    np.testing.assert_allclose(gpu, cpu, rtol=0, atol=2e-2)


@pytest.mark.gpu
@cuda
def test_bf16_map_is_close_to_fp32_and_says_so(image, tmp_path):
    cpu = embed(image, tmp_path / "cpu.zarr", dataclasses.replace(SPEC, batch_size=8))
    spec = dataclasses.replace(SPEC, device="cuda", precision="bf16")
    gpu = embed(image, tmp_path / "bf16.zarr", spec)
    a, b = cpu.reshape(64, -1), gpu.reshape(64, -1)
    cosine = (a * b).sum(0) / np.linalg.norm(a, axis=0) / np.linalg.norm(b, axis=0)
    assert cosine.min() > 0.99
    assert EmbeddingStore(tmp_path / "bf16.zarr").attrs["precision"] == "bf16"
    records = list((tmp_path / "bf16.zarr.blocks").iterdir())
    assert records and {r.read_text() for r in records} == {"bf16"}


@pytest.mark.gpu
@cuda
def test_backbone_is_built_once_and_stays_on_its_device():
    from botaclip_core.features import default_batch_size, load_backbone

    first = load_backbone("tiny", None, 0, "cuda")
    assert load_backbone("tiny", None, 0, torch.device("cuda")) is first
    assert {p.device.type for p in first.parameters()} == {"cuda"}
    assert default_batch_size(torch.device("cuda"), "base") == 256


@pytest.mark.gpu
@cuda
def test_base_pipeline_keeps_pace_with_the_model_on_cuda(tmp_path):
    """A short DOFA-Base run in bf16: the pipeline reaches most of the model-only rate."""
    import time

    from bench_embed import model_only, warm_up

    device = torch.device("cuda")
    image = write_image_store(tmp_path / "image.zarr", 32, 32)
    spec = dataclasses.replace(SPEC, size="base", device="cuda", precision="bf16", batch_size=256)
    warm_up(device, "base", 256, "bf16")
    tiles, seconds = model_only(device, "base", 256, "bf16", 8)
    start = time.perf_counter()
    info = embed_region(
        image, tmp_path / "map.zarr", spec=spec, dim=768, tile_size=224, block_tiles=8
    )
    rate = info["tiles_embedded"] / (time.perf_counter() - start)
    assert info["tiles_embedded"] == 1024
    assert rate > 0.5 * tiles / seconds  # 1,024 tiles include the start-up: the bench says more


def _blocked_imports(root: Path) -> Path:
    """Packages that raise on import, as if they were missing (the GPU machines lack them)."""
    for name in (
        "rasterio",
        "prefect",
        "pyproj",
        "rioxarray",
        "pydantic",
        "distributed",
        "geopandas",
    ):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError('{name} is not here')\n"
        )
    return root


def test_gpu_check_path_needs_no_prefect_gdal_or_pydantic(tmp_path):
    """bench_embed.py (and this module) run where only torch, numpy and the Zarr stack exist."""
    blocked = _blocked_imports(tmp_path / "blocked")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), str(BENCH.parent)])}
    cmd = [sys.executable, "-W", "ignore", str(BENCH / "bench_embed.py"), "--device", "cpu"]
    cmd += ["--dofa-size", "tiny", "--tiles", "16", "--workdir", str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1  # exactly one JSON line
    result = json.loads(lines[0])
    assert list(result) == [
        "device",
        "dofa_size",
        "batch_size",
        "precision",
        "threads",
        "tiles",
        "model_only_tiles_per_s",
        "pipeline_tiles_per_s",
        "ratio",
        "adapter_only_s",
        "dofa_pass_s",
        "peak_rss_mb_1x",
        "peak_rss_mb_4x",
    ]
    assert result["tiles"] == 16 and result["precision"] == "fp32" and result["batch_size"] == 8
    assert result["pipeline_tiles_per_s"] > 0 and result["peak_rss_mb_4x"] > 0
    probe = "import sys; sys.argv = ['x']; import test_gpu"  # this module's own imports
    env["PYTHONPATH"] += os.pathsep + str(Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_bench_store_is_an_image_store_tiling_would_recognise(image):
    from botaclip_core.tiling import covered_blocks

    valid = zarr.open_array(str(image / "valid"), mode="r")
    assert valid.shape == (6 * 224, 10 * 224)
    assert len(covered_blocks(image)) == 60  # every chunk stored, shards read like tiling's


def test_bench_train_gpu_part_needs_no_gdal_or_prefect(tmp_path):
    """gpu_check.sh's bench_train.py step imports the training code without rasterio or Prefect
    (pydantic, for the settings, is installed from the carried wheels)."""
    blocked = _blocked_imports(tmp_path / "blocked")
    (blocked / "pydantic").rename(tmp_path / "pydantic-allowed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), str(BENCH.parent)])}
    probe = "import botaclip_core.finetune, botaclip_core.training.backbone"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
