"""BotaSP: the supervised baseline, BotaCLIP's adapter trained to predict species directly."""

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
from botaclip_core.models.heads import Adapter
from botaclip_core.regularizers import build_regularizer
from botaclip_core.seeding import seeded
from botaclip_core.training.adapter import feature_batches
from botaclip_core.training.data import TrainingData, feature_tensor, split_plots
from botaclip_core.training.loop import (
    cpu_state,
    fit_run,
    mean_loss,
    optimizer_step,
    save_atomic,
)
from botaclip_core.training.runtime import check_settings, resolve_device

logger = logging.getLogger(__name__)

MODEL = "botasp.pt"
STEM = "botasp_"
"""Prefix of BotaSP's checkpoint, history and curve, so it can share BotaCLIP's folder."""


class BotaSP(nn.Module):
    """Adapter over frozen DOFA features + a linear species-presence head.

    The same identity-initialised :class:`~botaclip_core.models.heads.Adapter` as BotaCLIP's
    adapter mode, trained with a multi-label binary cross-entropy over species presence instead
    of the contrastive loss; only the adapter is used downstream (the ``botasp`` features).
    """

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


class _BotaSPRun:
    """The tensors, model and optimiser of one BotaSP run, and its epoch callbacks."""

    def __init__(
        self,
        data: TrainingData,
        settings: FinetuneSettings,
        split: tuple[np.ndarray, np.ndarray],
        device: torch.device,
        out_dir: Path,
    ) -> None:
        self.settings, self.split, self.device = settings, split, device
        self.out_dir, self.species = out_dir, data.species
        self.train_idx, self.val_idx = split
        self.dim = data.features.shape[2]
        self.feats = feature_tensor(data.features, device)
        self.presence_np = (np.asarray(data.releves) > 0).astype(np.float32)
        self.presence = torch.from_numpy(self.presence_np).to(device)
        with seeded(settings.seed):
            self.model = BotaSP(self.dim, self.presence.shape[1]).to(device)
        self.regularizer = build_regularizer(settings.regularizer, module=self.model.adapter)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=settings.lr)
        self.batch = min(settings.batch_size, len(self.train_idx))
        self.val_t = torch.from_numpy(self.val_idx).to(device)

    def train_epoch(self, gen: np.random.Generator) -> float:
        model, reg_weight = self.model, self.settings.reg_weight
        losses = []
        for idx, frozen in feature_batches(gen, self.feats, self.train_idx, self.batch):
            adapted = model.encode_image(frozen)
            logits = model.species_head(adapted)
            loss = F.binary_cross_entropy_with_logits(logits, self.presence[idx])
            total = loss + reg_weight * self.regularizer(adapted, frozen)
            optimizer_step(self.optimizer, total)
            losses.append(total.detach())
        return mean_loss(losses)

    def validate(self) -> dict[str, float]:
        logits = self.model(self.feats[self.val_t, 0])
        loss = float(F.binary_cross_entropy_with_logits(logits, self.presence[self.val_t]))
        auc = mean_species_auc(self.presence_np[self.val_idx], logits.float().cpu().numpy())
        return {"val_loss": loss, "val_auc": auc}

    def save_best(self) -> None:
        best = {"model": cpu_state(self.model), "dim": self.dim, "species": self.species}
        save_atomic(best, self.out_dir / MODEL)

    def card(self) -> dict[str, Any]:
        return {
            "model": "BotaSP: identity-initialised adapter over frozen DOFA features, trained "
            "with a linear species head and binary cross-entropy on species presence",
            "embedding": "frozen DOFA features through the adapter of botasp.pt",
            "n_species": int(self.presence.shape[1]),
            "device": str(self.device),
            "regularizer": self.settings.regularizer,
            "reg_weight": self.settings.reg_weight,
            "validation_metric": "mean per-species ROC AUC on spatially held-out plots",
        }


def train_botasp(data: TrainingData, settings: FinetuneSettings, out_dir: Path) -> dict[str, Any]:
    """Train the BotaSP baseline; resumes from ``out_dir/botasp_last.pt``.

    Uses the same spatial split, Adam, regulariser (``finetune.regularizer``, L2-SP on the
    adapter by default), early stopping (on the validation loss) and deterministic, resumable
    epoch loop (:func:`~botaclip_core.training.loop.fit_epochs`) as
    :func:`~botaclip_core.training.adapter.train_adapter`, whatever ``finetune.mode`` is, so
    the two differ only in their objective. Each epoch uses one random cached view per plot;
    validation uses the un-augmented view 0.

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
    split = split_plots(data.coords, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.device)
    run = _BotaSPRun(data, settings, split, device, out_dir)
    return fit_run(
        run,
        settings=settings,
        out_dir=out_dir,
        model_name=MODEL,
        metric="val_auc",
        stem=STEM,
        label="botasp",
    )


def load_botasp(path: Path) -> BotaSP:
    """Load the model saved by :func:`train_botasp` (adapter and species head), in eval mode.

    Args:
        path: The ``botasp.pt`` written by :func:`train_botasp`.

    Returns:
        The model, in eval mode.

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

    Args:
        path: The ``botasp.pt`` written by :func:`train_botasp`.

    Returns:
        The adapter, in eval mode.

    Raises:
        WeightsError: If the file is not a BotaSP checkpoint.

    """
    return load_botasp(path).adapter.eval()
