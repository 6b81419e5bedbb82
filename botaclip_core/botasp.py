"""BotaSP: the supervised baseline, BotaCLIP's adapter trained to predict species directly.

The same identity-initialised :class:`~botaclip_core.models.heads.Adapter` on cached frozen DOFA
features as BotaCLIP's adapter mode, followed by a linear species head and trained with a
multi-label binary cross-entropy over species presence instead of the contrastive loss. The
split, optimiser, regulariser (``finetune.regularizer``, L2-SP on the adapter by default), early
stopping and per-epoch checkpoint are BotaCLIP's (:func:`botaclip_core.finetune.fit_epochs`),
so the two differ only in their objective. Only the adapter is used downstream: its embeddings
are the ``botasp`` feature source.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from botaclip_core.catalog import FinetuneSettings
from botaclip_core.errors import WeightsError
from botaclip_core.finetune import (
    TrainingData,
    check_settings,
    cpu_state,
    feature_batches,
    fit_epochs,
    optimizer_step,
    resolve_device,
    save_atomic,
    seeded,
    split_plots,
)
from botaclip_core.models.heads import Adapter
from botaclip_core.regularizers import build_regularizer

logger = logging.getLogger(__name__)

MODEL = "botasp.pt"
STEM = "botasp_"
"""Prefix of BotaSP's checkpoint, history and curve, so it can share BotaCLIP's folder."""


class BotaSP(nn.Module):
    """Adapter over frozen DOFA features + a linear species-presence head."""

    def __init__(self, dim: int, n_species: int) -> None:
        """Create the model.

        Args:
            dim: Feature width (the DOFA ``embed_dim``).
            n_species: Number of species predicted.

        """
        super().__init__()
        self.adapter = Adapter(dim)
        self.species_head = nn.Linear(dim, n_species)

    def encode_image(self, features: Tensor, *, normalize: bool = False) -> Tensor:
        """Adapted embedding of frozen DOFA features."""
        z = self.adapter(features)
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, features: Tensor) -> Tensor:
        """Species presence logits ``(B, n_species)`` of frozen DOFA features ``(B, D)``."""
        out: Tensor = self.species_head(self.adapter(features))
        return out


def mean_species_auc(presence: np.ndarray, scores: np.ndarray) -> float:
    """Mean ROC AUC over the species (columns) that have both presences and absences.

    Args:
        presence: ``(n_plots, n_species)`` 0/1 labels.
        scores: ``(n_plots, n_species)`` predicted scores.

    Returns:
        The mean AUC, or NaN when no species has both classes.

    """
    from sklearn.metrics import roc_auc_score

    n_present = presence.sum(axis=0)
    both = np.flatnonzero((n_present > 0) & (n_present < len(presence)))
    if not len(both):
        return math.nan
    return float(np.mean([roc_auc_score(presence[:, j], scores[:, j]) for j in both]))


def train_botasp(data: TrainingData, settings: FinetuneSettings, out_dir: Path) -> dict[str, Any]:
    """Train the BotaSP baseline; resumes from ``out_dir/botasp_last.pt``.

    Uses the same spatial split, Adam, regulariser, early stopping (on the validation loss) and
    deterministic, resumable epoch loop as :func:`botaclip_core.finetune.train_adapter`, whatever
    ``finetune.mode`` is. Each epoch uses one random cached view per plot; validation uses the
    un-augmented view 0.

    Args:
        data: Cached frozen features and relevés (any cover is turned into presence).
        settings: Fine-tuning settings (``lr``, ``batch_size``, ``epochs``, ``patience``,
            ``val_fraction``, ``regularizer``, ``reg_weight``, ``seed``, ``device``).
        out_dir: Output folder: ``botasp.pt`` (best model), ``botasp_last.pt``,
            ``botasp_history.json``, ``botasp_training_curve.png``; it may be BotaCLIP's.

    Returns:
        Summary: best epoch, ``best_val_loss``, ``val_auc`` (mean per-species AUC on the held-out
        plots at the best epoch), sizes, history, ``model`` (path of ``botasp.pt``),
        ``training_curve`` and model-card fields under ``card``.

    Raises:
        CatalogError: If the settings are invalid.
        StageError: If there are too few plots for a spatial hold-out.

    """
    settings = check_settings(settings)
    dim = data.features.shape[2]
    train_idx, val_idx = split_plots(data.coords, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.device)
    feats = torch.from_numpy(np.ascontiguousarray(data.features, dtype=np.float32)).to(device)
    presence_np = (np.asarray(data.releves) > 0).astype(np.float32)
    presence = torch.from_numpy(presence_np).to(device)

    with seeded(settings.seed):
        model = BotaSP(dim, presence.shape[1]).to(device)
    regularizer = build_regularizer(settings.regularizer, module=model.adapter)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    batch = min(settings.batch_size, len(train_idx))
    val_t = torch.from_numpy(val_idx).to(device)

    def train_epoch(gen: np.random.Generator) -> float:
        losses = []
        for idx, frozen in feature_batches(gen, feats, train_idx, batch):
            adapted = model.encode_image(frozen)
            logits = model.species_head(adapted)
            loss = F.binary_cross_entropy_with_logits(logits, presence[idx])
            total = loss + settings.reg_weight * regularizer(adapted, frozen)
            optimizer_step(optimizer, total)
            losses.append(total.detach())
        return float(torch.stack(losses).mean()) if losses else math.nan

    def validate() -> dict[str, float]:
        logits = model(feats[val_t, 0])
        loss = float(F.binary_cross_entropy_with_logits(logits, presence[val_t]))
        auc = mean_species_auc(presence_np[val_idx], logits.float().cpu().numpy())
        return {"val_loss": loss, "val_auc": auc}

    def save_best() -> None:
        save_atomic(
            {"model": cpu_state(model), "dim": dim, "species": data.species}, out_dir / MODEL
        )

    history, best = fit_epochs(
        model,
        optimizer,
        settings=settings,
        out_dir=out_dir,
        train_epoch=train_epoch,
        validate=validate,
        save_best=save_best,
        stem=STEM,
        label="botasp",
    )
    return {
        "best_epoch": best["epoch"],
        "best_val_loss": best["val_loss"],
        "val_auc": best.get("val_auc"),
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
        "epochs_run": len(history),
        "history": history,
        "model": str(out_dir / MODEL),
        "training_curve": str(out_dir / f"{STEM}training_curve.png"),
        "card": {
            "model": "BotaSP: identity-initialised adapter over frozen DOFA features, trained "
            "with a linear species head and binary cross-entropy on species presence",
            "embedding": "frozen DOFA features through the adapter of botasp.pt",
            "n_species": int(presence.shape[1]),
            "device": str(device),
            "regularizer": settings.regularizer,
            "reg_weight": settings.reg_weight,
            "validation_metric": "mean per-species ROC AUC on spatially held-out plots",
        },
    }


def load_botasp(path: Path) -> BotaSP:
    """Load the model saved by :func:`train_botasp` (adapter and species head), in eval mode.

    Raises:
        WeightsError: If the file is not a BotaSP checkpoint.

    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    model_state = state.get("model", {}) if isinstance(state, dict) else {}
    if "species_head.weight" not in model_state or "adapter.weight" not in model_state:
        raise WeightsError(
            f"{path} is not a BotaSP checkpoint (no adapter.* and species_head.* under 'model'); "
            "pass the botasp.pt written by train_botasp"
        )
    model = BotaSP(int(state["dim"]), int(model_state["species_head.weight"].shape[0]))
    model.load_state_dict(model_state)
    model.eval()
    return model


def load_botasp_adapter(path: Path) -> Adapter:
    """Load the adapter of a BotaSP checkpoint, in eval mode (for the ``botasp`` embeddings).

    Raises:
        WeightsError: If the file is not a BotaSP checkpoint.

    """
    return load_botasp(path).adapter.eval()
