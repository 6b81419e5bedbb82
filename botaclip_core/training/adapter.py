"""Mode ``adapter``: an adapter and the relevé encoder trained on cached frozen DOFA features."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from botaclip_core.catalog import FinetuneSettings
from botaclip_core.errors import CatalogError, StageError
from botaclip_core.losses import build_loss
from botaclip_core.models.heads import Adapter, ReleveEncoder
from botaclip_core.regularizers import build_regularizer
from botaclip_core.seeding import seeded
from botaclip_core.training.data import TrainingData, feature_tensor, releve_input, split_plots
from botaclip_core.training.loop import (
    BACKBONE,
    BEST,
    cpu_state,
    fit_run,
    mean_loss,
    n_trainable,
    optimizer_step,
    save_atomic,
)
from botaclip_core.training.metrics import contrastive_metrics
from botaclip_core.training.runtime import check_settings, resolve_device


class BotaClip(nn.Module):
    """Adapter over frozen DOFA features + relevé encoder + contrastive loss."""

    def __init__(self, dim: int, n_species: int, settings: FinetuneSettings) -> None:
        """Create the model.

        Args:
            dim: Feature width (the DOFA ``embed_dim``).
            n_species: Length of the relevé vectors.
            settings: Relevé encoder kind and loss.

        """
        super().__init__()
        self.adapter = Adapter(dim)
        self.releve_encoder = ReleveEncoder(n_species, dim, kind=settings.releve_encoder)
        self.loss = build_loss(settings.loss)

    def encode_image(self, features: Tensor, *, normalize: bool = False) -> Tensor:
        """Adapted embedding of frozen DOFA features."""
        z = self.adapter(features)
        return nn.functional.normalize(z, dim=-1) if normalize else z

    def encode_releve(self, releves: Tensor, *, normalize: bool = False) -> Tensor:
        """Embedding of relevé vectors."""
        z = self.releve_encoder(releves)
        return nn.functional.normalize(z, dim=-1) if normalize else z


def feature_batches(
    gen: np.random.Generator, feats: Tensor, train_idx: np.ndarray, batch: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Shuffled batches of (plot indices, one random cached view per plot); ragged tail dropped.

    Draws the order and the views from ``gen`` (seeded per epoch), so a resumed epoch sees the
    same batches as an uninterrupted one.

    Args:
        gen: The epoch's generator.
        feats: ``(n_plots, n_views, D)`` cached features.
        train_idx: Training plot indices.
        batch: Batch size.

    Yields:
        Plot indices ``(batch,)`` and their features ``(batch, D)``, on ``feats``' device.

    """
    n, n_views = feats.shape[:2]
    order = gen.permutation(train_idx)
    views = np.asarray(gen.integers(0, n_views, size=n))
    for s in range(0, len(order) - batch + 1, batch):
        rows = order[s : s + batch]
        idx = torch.from_numpy(rows).to(feats.device)
        yield idx, feats[idx, torch.from_numpy(views[rows]).to(feats.device)]


class _AdapterRun:
    """The tensors, model and optimiser of one adapter run, and its epoch callbacks."""

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
        self.train_idx, val_idx = split
        _, self.n_views, self.dim = data.features.shape
        self.feats = feature_tensor(data.features, device)
        self.rels = torch.from_numpy(releve_input(data.releves, settings.releve_input)).to(device)
        with seeded(settings.seed):
            self.model = BotaClip(self.dim, self.rels.shape[1], settings).to(device)
        self.regularizer = build_regularizer(settings.regularizer, module=self.model.adapter)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=settings.lr)
        self.batch = min(settings.batch_size, len(self.train_idx))
        self.val_t = torch.from_numpy(val_idx).to(device)

    def train_epoch(self, gen: np.random.Generator) -> float:
        model, reg_weight = self.model, self.settings.reg_weight
        losses = []
        for idx, frozen in feature_batches(gen, self.feats, self.train_idx, self.batch):
            img = model.encode_image(frozen)
            rel = model.encode_releve(self.rels[idx])
            total = model.loss(img, rel) + reg_weight * self.regularizer(img, frozen)
            optimizer_step(self.optimizer, total)
            losses.append(total.detach())
        return mean_loss(losses)

    def validate(self) -> dict[str, float]:
        vimg = self.model.encode_image(self.feats[self.val_t, 0])
        vrel = self.model.encode_releve(self.rels[self.val_t])
        return contrastive_metrics(self.model.loss, vimg, vrel)

    def save_best(self) -> None:
        best = {"model": cpu_state(self.model), "dim": self.dim, "species": self.species}
        save_atomic(best, self.out_dir / BEST)

    def card(self) -> dict[str, Any]:
        settings = self.settings
        return {
            "model": "BotaCLIP: identity-initialised adapter over frozen DOFA features",
            "mode": "adapter",
            "embedding": "frozen DOFA features through the adapter of model.pt",
            "trainable": "adapter, relevé encoder, loss temperature",
            "trainable_parameters": n_trainable(self.model),
            "device": str(self.device),
            "precision": "fp32",
            "loss": settings.loss,
            "regularizer": settings.regularizer,
            "reg_weight": settings.reg_weight,
            "augmentation": f"{self.n_views} cached views per plot (view 0 plain)",
        }


def train_adapter(data: TrainingData, settings: FinetuneSettings, out_dir: Path) -> dict[str, Any]:
    """Train BotaCLIP's adapter + relevé encoder; resumes from ``out_dir/last.pt``.

    DOFA stays frozen: an identity-initialised adapter and the relevé encoder train on the
    cached features, one random cached view per plot and epoch, in the deterministic,
    resumable loop of :func:`~botaclip_core.training.loop.fit_epochs`. Validation uses the
    un-augmented view 0 of the spatially held-out plots. The region is then embedded once with
    the frozen DOFA and the adapter is applied to the embeddings.

    Args:
        data: Cached frozen features and relevés.
        settings: ``mode`` must be ``"adapter"``.
        out_dir: Output folder (``model.pt``, ``last.pt``, ``history.json``,
            ``training_curve.png``).

    Returns:
        Summary with best epoch, metrics, the path of the best model and model-card fields.

    Raises:
        CatalogError: If the settings are invalid or not for mode ``adapter``.
        StageError: If there are too few plots for a spatial hold-out.

    """
    settings = check_settings(settings)
    if settings.mode != "adapter":
        raise CatalogError(
            f"train_adapter trains finetune.mode 'adapter', got {settings.mode!r}; modes "
            "'partial' and 'full' train DOFA on pixel chips with train_backbone"
        )
    split = split_plots(data.coords, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.device)
    run = _AdapterRun(data, settings, split, device, out_dir)
    return fit_run(run, settings=settings, out_dir=out_dir)


def load_adapter(path: Path) -> BotaClip:
    """Load the model saved by :func:`train_adapter` (weights only, no pickled objects).

    Args:
        path: The ``model.pt`` written by :func:`train_adapter`.

    Returns:
        The model, in eval mode.

    Raises:
        StageError: If ``path`` was written by
            :func:`~botaclip_core.training.backbone.train_backbone` (no adapter).

    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    model_state = state["model"]
    if "adapter.weight" not in model_state:
        raise StageError(
            f"{path} holds no adapter: it was trained with finetune.mode "
            f"{state.get('mode', 'partial/full')!r}; embed the region with the fine-tuned DOFA "
            f"({state.get('backbone', BACKBONE)} next to it) instead"
        )
    n_species = model_state["releve_encoder." + _first_linear_key(model_state)].shape[1]
    settings = FinetuneSettings.model_validate(
        {
            "releve_encoder": "mlp" if _is_mlp(model_state) else "linear",
            "loss": "sigmoid" if "loss.logit_bias" in model_state else "infonce",
        }
    )
    model = BotaClip(int(state["dim"]), int(n_species), settings)
    model.load_state_dict(model_state)
    model.eval()
    return model


def _first_linear_key(state: dict[str, Tensor]) -> str:
    keys = sorted(
        k.removeprefix("releve_encoder.")
        for k in state
        if k.startswith("releve_encoder.") and k.endswith("weight")
    )
    return keys[0]


def _is_mlp(state: dict[str, Tensor]) -> bool:
    return sum(1 for k in state if k.startswith("releve_encoder.") and k.endswith("weight")) > 1
