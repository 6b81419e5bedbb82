"""Training throughput: BotaCLIP adapter steps on cached features vs DOFA fine-tuning on pixels.

Both measurements run the same step as the library: adapter mode (``train_adapter``'s step on
random cached features, D = 768, batch 64, InfoNCE + L2-SP) and full mode (``train_backbone``'s
step on random 4-band uint8 chips with margin, augmentation on the fly, InfoNCE + L2-SP, bf16
autocast on CUDA, fp32 on CPU). On CUDA the first full-mode step (allocations, Adam state,
cuBLAS heuristics) is an untimed warm-up; on CPU, where one DOFA-Base step at batch 8 takes
10-30 s and the warm-up costs little in comparison, it is skipped to stay under a minute.
Prints one JSON line.

    python benchmarks/bench_train.py                       # DOFA-Base, CPU: batch 8, 2 steps
    python benchmarks/bench_train.py --size large --steps 20 --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np
import torch

from botaclip_core.catalog import FinetuneSettings
from botaclip_core.finetune import (
    BotaClip,
    BotaClipBackbone,
    PixelBatches,
    draw_epoch_augmentations,
    optimizer_step,
    precision_context,
    resolve_device,
)
from botaclip_core.models import build_dofa
from botaclip_core.regularizers import build_regularizer

WAVES = [0.49, 0.56, 0.665, 0.842]  # RGB + NIR
MEAN = [120.0] * 4
STD = [60.0] * 4
N_SPECIES = 500
ADAPTER_DIM = 768
ADAPTER_BATCH = 64
MARGIN = 16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_adapter(device: torch.device, steps: int) -> float:
    settings = FinetuneSettings()
    torch.manual_seed(0)
    model = BotaClip(ADAPTER_DIM, N_SPECIES, settings).to(device)
    regularizer = build_regularizer("l2sp", module=model.adapter)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    n = ADAPTER_BATCH * 16
    feats = torch.randn(n, ADAPTER_DIM, device=device)
    rels = (torch.rand(n, N_SPECIES, device=device) < 0.05).float()
    rng = np.random.default_rng(0)

    def step() -> None:
        idx = torch.from_numpy(rng.choice(n, ADAPTER_BATCH, replace=False)).to(device)
        img = model.encode_image(feats[idx])
        loss = model.loss(img, model.encode_releve(rels[idx]))
        optimizer_step(optimizer, loss + settings.reg_weight * regularizer(img, feats[idx]))

    for _ in range(10):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return ADAPTER_BATCH * steps / (time.perf_counter() - start)


def bench_full(
    device: torch.device, size: str, steps: int, batch: int, *, warmup: bool
) -> tuple[float, str]:
    settings = FinetuneSettings(mode="full", batch_size=batch)
    autocast, precision = precision_context(device)
    torch.manual_seed(0)
    dofa = build_dofa(size, seed=0)
    model = BotaClipBackbone(dofa, N_SPECIES, settings, WAVES).to(device)
    regularizer = build_regularizer("l2sp", module=model.dofa)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    rng = np.random.default_rng(0)
    n = 2 * batch
    side = 224 + 2 * MARGIN
    chips = rng.integers(1, 256, size=(n, len(WAVES), side, side), dtype=np.uint8)
    rels = (torch.rand(n, N_SPECIES, device=device) < 0.05).float()
    pixels = PixelBatches(chips, margin=MARGIN, mean=MEAN, std=STD, device=device)

    def step() -> None:
        rows = rng.choice(n, batch, replace=False)
        x = pixels(rows, draw_epoch_augmentations(rng, n, MARGIN))
        with autocast():
            img = model.encode_image(x)
        img = img.float()
        loss = model.loss(img, model.encode_releve(rels[torch.from_numpy(rows).to(device)]))
        optimizer_step(optimizer, loss + settings.reg_weight * regularizer(img, None))

    if warmup:
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - start), precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="base", help="DOFA size for full mode (default base)")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed full-mode steps (default: 1 CPU, 20 CUDA)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="full-mode batch (default: 8 CPU, 64 CUDA)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # random weights are the point here: no warning
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    steps = args.steps or (20 if cuda else 1)
    batch = args.batch_size or (64 if cuda else 8)
    adapter = bench_adapter(device, 500 if cuda else 100)
    full, precision = bench_full(device, args.size, steps, batch, warmup=cuda)
    name = (
        torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    )
    print(
        json.dumps(
            {
                "device": name,
                "adapter_samples_per_s": round(adapter, 1),
                "full_samples_per_s": round(full, 2),
                "dofa_size": args.size,
                "batch_size": batch,
                "precision": precision,
                "full_steps_timed": steps,
            }
        )
    )


if __name__ == "__main__":
    main()
