"""Summaries of every pipeline output of a run, for comparing runs value for value.

Used by ``tests/data/record_pipeline_outputs.py`` (which records the reference) and by
``tests/test_recorded_outputs.py`` (which compares a fresh run with it). Only public entry
points are used (the demo writer, the catalog, ``run_region`` and the report), and output
files are found by their stage folders, so the reference survives refactors of the code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from botaclip_core.catalog import load_catalog
from botaclip_core.demo import write_demo_region
from botaclip_core.pipeline import run_region

SAMPLE = 512

# the variants the stages refactor must not change (issue 8)
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "no-releves": {"regions": {"demo": {"releves": None}}},
    "no-targets": {"regions": {"demo": {"targets": []}}},
    "partial": {
        "finetune": {"mode": "partial", "trainable_blocks": 1, "epochs": 2, "botasp": False}
    },
    "lora": {"finetune": {"mode": "partial", "lora_rank": 4, "epochs": 2}},
}


def run_variant(root: Path, name: str) -> dict[str, Any]:
    """Write the tiny demo under ``root`` with a variant's overrides and run it in-process."""
    catalog = write_demo_region(root, size="tiny", catalog_overrides=VARIANTS[name])
    return run_region(load_catalog(catalog), "demo", catalog_path=catalog)


def _store_digest(path: Path, root: Path) -> str:
    """sha256 over every file of a store (relative path and bytes, ``root`` made neutral)."""
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        digest.update(rel.encode())
        digest.update(f.read_bytes().replace(str(root.resolve()).encode(), b"<root>"))
    return digest.hexdigest()


def _one(workdir: Path, pattern: str) -> Path | None:
    found = sorted(workdir.glob(pattern))
    if len(found) > 1:
        raise AssertionError(f"{len(found)} outputs match {pattern} in {workdir}: {found}")
    return found[0] if found else None


def cpu_kind() -> str:
    """``avx512`` or ``avx2``: the vector units that decide float rounding in BLAS and oneDNN.

    The tiny demo's map has 2 × 2 cells, so its sites share four feature vectors and their
    scores nearly tie: rounding differences of 1e-7 between CPU kinds reorder them and move an
    AUC by up to 0.09. Metric rows are therefore recorded per CPU kind.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return "avx512" if " avx512f" in flags else "avx2"


def summarize(
    workdir: Path, report: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """What a run produced: exact digests and metrics (JSON) and arrays (for ``np.allclose``)."""
    info: dict[str, Any] = {
        "stages": sorted(report["stages"]),
        "embeddings": sorted(report["embeddings"]),
        "downstream": sorted(
            (r["task"], r["features"], r["model"], r["validation"], r["metric"], r["value"])
            for r in report["downstream"]
        ),
    }
    arrays: dict[str, np.ndarray] = {}
    image = _one(workdir, "tile/*/image.zarr")
    if image is not None:
        info["image_sha256"] = _store_digest(image, workdir)
    for name in ("features", "plots"):
        f = _one(workdir, f"features/*/{name}.npy")
        if f is not None:
            arrays[f"features/{name}"] = np.load(f)
    for name in ("model.pt", "botasp.pt", "backbone.pt"):
        f = _one(workdir, f"finetune/*/{name}")
        if f is None:
            continue
        state = torch.load(f, map_location="cpu", weights_only=True)
        for key, value in _tensors(state, name):
            arrays[f"finetune/{key}"] = value
    for source, path in report["embeddings"].items():
        arrays[f"embedding/{source}"] = np.asarray(
            zarr.open_array(f"{path}/embedding", mode="r")[:]
        )
    return info, {k: _reduce(v) for k, v in arrays.items()}


def _reduce(a: np.ndarray) -> np.ndarray:
    """Small arrays whole; large ones as [sum, sum of |x|, 512 values at seeded positions]."""
    if a.size <= SAMPLE:
        return a
    flat = a.astype(np.float64).ravel()
    picks = np.random.default_rng(a.size).choice(a.size, SAMPLE, replace=False)
    return np.concatenate([[flat.sum(), np.abs(flat).sum()], flat[np.sort(picks)]])


def _tensors(state: Any, prefix: str):
    if isinstance(state, torch.Tensor):
        yield prefix, state.detach().float().numpy()
    elif isinstance(state, dict):
        for k in sorted(state, key=str):
            yield from _tensors(state[k], f"{prefix}/{k}")
