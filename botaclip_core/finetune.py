"""BotaCLIP contrastive training of an adapter (and relevé encoder) on cached DOFA features."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from botaclip_core.catalog import FinetuneSettings
from botaclip_core.errors import StageError
from botaclip_core.losses import build_loss
from botaclip_core.models.heads import Adapter, ReleveEncoder
from botaclip_core.regularizers import build_regularizer

logger = logging.getLogger(__name__)

CHECKPOINT = "last.pt"
BEST = "model.pt"


@dataclass
class TrainingData:
    """Cached frozen features and the matching relevés.

    Attributes:
        features: ``(n_plots, n_views, D)`` frozen DOFA features, view 0 un-augmented.
        releves: ``(n_plots, n_species)`` cover or presence.
        coords: ``(n_plots, 2)`` map coordinates, for the spatial validation split.
        species: vocabulary.
    """

    features: np.ndarray
    releves: np.ndarray
    coords: np.ndarray
    species: list[str]


def spatial_split(coords: np.ndarray, val_fraction: float, *, seed: int) -> np.ndarray:
    """Boolean validation mask holding out whole spatial blocks (about 25 blocks in all)."""
    n = len(coords)
    span = np.ptp(coords, axis=0).max() or 1.0
    block = span / 5.0
    keys = np.floor((coords - coords.min(axis=0)) / block).astype(np.int64)
    block_id = keys[:, 0] * 1000 + keys[:, 1]
    blocks = np.unique(block_id)
    rng = np.random.default_rng(seed)
    rng.shuffle(blocks)
    val = np.zeros(n, dtype=bool)
    for b in blocks:
        if val.sum() >= val_fraction * n:
            break
        val |= block_id == b
    if val.all() or not val.any():
        raise StageError(
            f"cannot hold out {val_fraction:.0%} of {n} plots spatially; add relevés or change "
            "finetune.val_fraction"
        )
    return val


def releve_input(releves: np.ndarray, kind: str) -> np.ndarray:
    """Relevé encoder input: presence/absence, or cover as a fraction (0–1)."""
    if kind == "presence":
        return (releves > 0).astype(np.float32)
    top = float(releves.max()) or 1.0
    return (releves / (100.0 if top > 1.0 else 1.0)).astype(np.float32)


class BotaClip(nn.Module):
    """Adapter over frozen DOFA features + relevé encoder + contrastive loss."""

    def __init__(self, dim: int, n_species: int, settings: FinetuneSettings) -> None:
        super().__init__()
        self.adapter = Adapter(dim)
        self.releve_encoder = ReleveEncoder(n_species, dim, kind=settings.releve_encoder)
        self.loss = build_loss(settings.loss)

    def encode_image(self, features: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
        """Adapted embedding of frozen DOFA features."""
        z = self.adapter(features)
        return nn.functional.normalize(z, dim=-1) if normalize else z

    def encode_releve(self, releves: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
        """Embedding of relevé vectors."""
        z = self.releve_encoder(releves)
        return nn.functional.normalize(z, dim=-1) if normalize else z


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _retrieval_recall(img: torch.Tensor, rel: torch.Tensor, k: int = 5) -> float:
    """Share of images whose own relevé is among the k most similar relevés."""
    sims = nn.functional.normalize(img, dim=-1) @ nn.functional.normalize(rel, dim=-1).T
    topk = sims.topk(min(k, sims.shape[1]), dim=1).indices
    return float((topk == torch.arange(len(img)).unsqueeze(1)).any(dim=1).float().mean())


def train_adapter(data: TrainingData, settings: FinetuneSettings, out_dir: Path) -> dict[str, Any]:
    """Train BotaCLIP's adapter + relevé encoder; resumes from ``out_dir/last.pt``.

    Each epoch draws its shuffling and views from a generator seeded by (seed, epoch), and the
    checkpoint written after every epoch holds all trainable state, so a run killed at any
    point and resumed ends with the same weights as an uninterrupted run.

    Returns:
        Summary with best epoch, metrics and the path of the best model.
    """
    n, n_views, dim = data.features.shape
    if n < 8:
        raise StageError(f"only {n} relevés with image chips; BotaCLIP needs at least 8 to train")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    val_mask = spatial_split(data.coords, settings.val_fraction, seed=settings.seed)
    train_idx, val_idx = np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
    feats = torch.from_numpy(np.ascontiguousarray(data.features, dtype=np.float32))
    rels = torch.from_numpy(releve_input(data.releves, settings.releve_input))

    model = BotaClip(dim, rels.shape[1], settings)
    regularizer = build_regularizer(settings.regularizer, module=model.adapter)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    history: list[dict[str, float]] = []
    best = {"val_loss": math.inf, "epoch": -1}
    stale = 0
    start_epoch = 0
    ckpt_path = out_dir / CHECKPOINT
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, best, stale = state["history"], state["best"], state["stale"]
        start_epoch = state["epoch"] + 1
        logger.info("finetune: resuming after epoch %d from %s", state["epoch"], ckpt_path)

    batch = min(settings.batch_size, len(train_idx))
    for epoch in range(start_epoch, settings.epochs):
        if stale >= settings.patience:
            break
        gen = np.random.default_rng([settings.seed, epoch])
        order = gen.permutation(train_idx)
        views = gen.integers(0, n_views, size=n)
        model.train()
        losses = []
        for s in range(0, len(order) - batch + 1, batch):  # drop the ragged last batch
            idx = torch.from_numpy(order[s : s + batch])
            frozen = feats[idx, torch.from_numpy(views[order[s : s + batch]])]
            img = model.encode_image(frozen)
            rel = model.encode_releve(rels[idx])
            loss = model.loss(img, rel)
            total = loss + settings.reg_weight * regularizer(img, frozen)
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            losses.append(float(total))
        model.eval()
        with torch.no_grad():
            vfrozen = feats[torch.from_numpy(val_idx), 0]
            vimg = model.encode_image(vfrozen)
            vrel = model.encode_releve(rels[torch.from_numpy(val_idx)])
            val_loss = float(model.loss(vimg, vrel))
            recall = _retrieval_recall(vimg, vrel)
        history.append(
            {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss, "val_recall_at_5": recall}
        )
        logger.info("finetune epoch %d: train %.4f val %.4f R@5 %.3f", epoch, history[-1]["train_loss"], val_loss, recall)
        if val_loss < best["val_loss"] - 1e-6:
            best, stale = {"val_loss": val_loss, "epoch": epoch, "val_recall_at_5": recall}, 0
            _save_atomic({"model": model.state_dict(), "dim": dim, "species": data.species}, out_dir / BEST)
        else:
            stale += 1
        _save_atomic(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "history": history,
                "best": best,
                "stale": stale,
            },
            ckpt_path,
        )
    summary = {
        "best_epoch": best["epoch"],
        "best_val_loss": best["val_loss"],
        "val_recall_at_5": best.get("val_recall_at_5"),
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
        "epochs_run": len(history),
        "history": history,
        "model": str(out_dir / BEST),
    }
    (out_dir / "history.json").write_text(json.dumps(history, indent=1))
    plot_history(history, out_dir / "training_curve.png")
    return summary


def plot_history(history: list[dict[str, float]], path: Path) -> None:
    """Training and validation loss per epoch as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], label="validation (spatial hold-out)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def load_adapter(path: Path) -> BotaClip:
    """The trained model saved by :func:`train_adapter` (weights only, no pickled objects)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model_state = state["model"]
    n_species = model_state["releve_encoder." + _first_linear_key(model_state)].shape[1]
    settings = FinetuneSettings(releve_encoder="mlp" if _is_mlp(model_state) else "linear")
    loss_name = "sigmoid" if "loss.logit_bias" in model_state else "infonce"
    settings = settings.model_copy(update={"loss": loss_name})
    model = BotaClip(int(state["dim"]), int(n_species), settings)
    model.load_state_dict(model_state)
    model.eval()
    return model


def _first_linear_key(state: dict[str, torch.Tensor]) -> str:
    keys = sorted(k.removeprefix("releve_encoder.") for k in state if k.startswith("releve_encoder.") and k.endswith("weight"))
    return keys[0]


def _is_mlp(state: dict[str, torch.Tensor]) -> bool:
    return sum(1 for k in state if k.startswith("releve_encoder.") and k.endswith("weight")) > 1
