"""The epoch loop every training path shares: early stopping and resumable checkpoints."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from botaclip_core.catalog import FinetuneSettings
from botaclip_core.errors import StageError
from botaclip_core.store import replace_durably, temporary_path
from botaclip_core.training.curves import CURVE, write_history

logger = logging.getLogger(__name__)

CHECKPOINT = "last.pt"
BEST = "model.pt"
BACKBONE = "backbone.pt"

# settings that may change between a crash and the resume without invalidating the checkpoint
_RESUMABLE_CHANGES = frozenset({"epochs", "patience", "device", "botasp"})


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, flush it to disk, then rename it over ``path``.

    Args:
        obj: What to save.
        path: Destination; never left half-written.

    """
    tmp = temporary_path(path)
    try:
        torch.save(obj, tmp)
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def cpu_state(module: nn.Module) -> dict[str, Tensor]:
    """Copy a module's state dict to CPU, detached (portable checkpoints).

    Args:
        module: The module.

    Returns:
        Its state dict, on CPU.

    """
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def optimizer_step(optimizer: torch.optim.Optimizer, loss: Tensor) -> None:
    """One gradient step on ``loss``.

    Args:
        optimizer: The optimiser over the trainable parameters.
        loss: Scalar loss of the batch.

    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def mean_loss(losses: list[Tensor]) -> float:
    """Mean of an epoch's detached batch losses (NaN for an epoch without batches).

    Args:
        losses: Scalar batch losses.

    Returns:
        Their mean.

    """
    return float(torch.stack(losses).mean()) if losses else math.nan


def n_trainable(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``.

    Args:
        module: The module.

    Returns:
        The count of parameters with ``requires_grad``.

    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@dataclass
class _Progress:
    """What the checkpoint carries besides the weights: history and early-stopping state."""

    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=lambda: {"val_loss": math.inf, "epoch": -1})
    stale: int = 0
    next_epoch: int = 0

    def record(self, epoch: int, train_loss: float, metrics: dict[str, float]) -> bool:
        """Append an epoch to the history and update early stopping; True if it is the best."""
        self.history.append({"epoch": epoch, "train_loss": train_loss, **metrics})
        if metrics["val_loss"] < self.best["val_loss"] - 1e-6:
            self.best, self.stale = {"epoch": epoch, **metrics}, 0
            return True
        self.stale += 1
        return False


def _settings_changes(saved: dict[str, Any], settings: FinetuneSettings) -> list[str]:
    now = settings.model_dump(mode="json")
    return sorted(
        k
        for k in set(saved) | set(now)
        if k not in _RESUMABLE_CHANGES and saved.get(k) != now.get(k)
    )


def _resume(
    ckpt_path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    settings: FinetuneSettings,
    label: str,
) -> _Progress:
    """Load ``ckpt_path`` into ``model`` and ``optimizer`` if it exists; return its progress."""
    if not ckpt_path.is_file():
        return _Progress()
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    changed = _settings_changes(state["settings"], settings) if "settings" in state else []
    if changed:
        raise StageError(
            f"{ckpt_path} was written with other finetune settings ({', '.join(changed)} "
            "differ); delete it to start over, or train into a new folder"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    logger.info("%s: resuming after epoch %d from %s", label, state["epoch"], ckpt_path)
    return _Progress(state["history"], state["best"], state["stale"], state["epoch"] + 1)


def _run_epoch(
    model: nn.Module,
    gen: np.random.Generator,
    train_epoch: Callable[[np.random.Generator], float],
    validate: Callable[[], dict[str, float]],
) -> tuple[float, dict[str, float]]:
    """Train one epoch, then validate; return the training loss and the validation metrics."""
    model.train()
    train_loss = train_epoch(gen)
    model.eval()
    with torch.no_grad():
        metrics = validate()
    return train_loss, metrics


def _log_epoch(label: str, record: dict[str, float]) -> None:
    values = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "epoch")
    logger.info("%s epoch %d: %s", label, record["epoch"], values)


def _save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    progress: _Progress,
    settings: FinetuneSettings,
) -> None:
    save_atomic(
        {
            "model": cpu_state(model),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "history": progress.history,
            "best": progress.best,
            "stale": progress.stale,
            "settings": settings.model_dump(mode="json"),
        },
        path,
    )


def fit_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    settings: FinetuneSettings,
    out_dir: Path,
    train_epoch: Callable[[np.random.Generator], float],
    validate: Callable[[], dict[str, float]],
    save_best: Callable[[], None],
    stem: str = "",
    label: str = "finetune",
) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Run epochs with early stopping and a resumable per-epoch checkpoint.

    Each epoch's shuffling and augmentation come from a generator seeded by (seed, epoch). The
    checkpoint ``out_dir/{stem}last.pt``, written atomically after every epoch, holds
    ``model``'s and ``optimizer``'s state, the history, the best epoch and the early-stopping
    counter; if it exists the run continues after its epoch. Build ``model`` and ``optimizer``
    the same way on every run (same seed), so that a run killed at any point resumes to the
    same weights as an uninterrupted run (on CPU). The history is written to
    ``{stem}history.json`` and plotted to ``{stem}training_curve.png``.

    Args:
        model: Every trainable module of the run (its state is checkpointed).
        optimizer: The optimiser over ``model``'s trainable parameters.
        settings: ``seed``, ``epochs`` and ``patience`` are used.
        out_dir: Output folder.
        train_epoch: Trains one epoch with the given generator and returns the mean training
            loss; called with ``model`` in training mode.
        validate: Returns validation metrics including ``val_loss`` (lower is better); called in
            eval mode under ``torch.no_grad``.
        save_best: Writes the best model; called when ``val_loss`` improves.
        stem: Prefix of the checkpoint, history and curve file names.
        label: Name used in log messages.

    Returns:
        The history (one dict per epoch) and the best epoch's metrics (``epoch`` -1 if none).

    Raises:
        StageError: If the checkpoint was written with different settings, or no epoch had a
            finite validation loss.

    """
    ckpt_path = out_dir / f"{stem}{CHECKPOINT}"
    progress = _resume(ckpt_path, model, optimizer, settings, label)
    for epoch in range(progress.next_epoch, settings.epochs):
        if progress.stale >= settings.patience:
            break
        gen = np.random.default_rng([settings.seed, epoch])
        train_loss, metrics = _run_epoch(model, gen, train_epoch, validate)
        improved = progress.record(epoch, train_loss, metrics)
        _log_epoch(label, progress.history[-1])
        if improved:
            save_best()
        _save_checkpoint(ckpt_path, model, optimizer, epoch, progress, settings)
    write_history(progress.history, out_dir, stem=stem)
    if progress.best["epoch"] < 0:
        raise StageError(
            f"{label}: the validation loss was never finite "
            f"({[h['val_loss'] for h in progress.history]}); no model was saved. Lower "
            f"finetune.lr (now {settings.lr}) or check the inputs for NaN, then delete "
            f"{ckpt_path} and rerun"
        )
    return progress.history, progress.best


class EpochRun(Protocol):
    """One training path as :func:`fit_run` drives it: model, optimiser, split and callbacks."""

    @property
    def model(self) -> nn.Module:
        """Every trainable module of the run."""
        ...

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimiser over the model's trainable parameters."""
        ...

    @property
    def split(self) -> tuple[np.ndarray, np.ndarray]:
        """The training and validation plot indices."""
        ...

    def train_epoch(self, gen: np.random.Generator) -> float:
        """Train one epoch with the epoch's generator; return the mean training loss."""
        ...

    def validate(self) -> dict[str, float]:
        """Validation metrics, including ``val_loss``."""
        ...

    def save_best(self) -> None:
        """Write the best model."""
        ...

    def card(self) -> dict[str, Any]:
        """Model-card fields of the trained run."""
        ...


def fit_run(
    run: EpochRun,
    *,
    settings: FinetuneSettings,
    out_dir: Path,
    model_name: str = BEST,
    metric: str = "val_recall_at_5",
    stem: str = "",
    label: str = "finetune",
) -> dict[str, Any]:
    """Train ``run`` with :func:`fit_epochs` and summarise it as the training functions return.

    Args:
        run: The training path.
        settings: ``seed``, ``epochs`` and ``patience`` are used.
        out_dir: Output folder.
        model_name: File name of the best model that ``run.save_best`` writes.
        metric: The validation metric reported next to the loss (its value at the best epoch).
        stem: Prefix of the checkpoint, history and curve file names.
        label: Name used in log messages.

    Returns:
        ``best_epoch``, ``best_val_loss``, ``metric``, ``n_train``, ``n_val``, ``epochs_run``,
        ``history``, ``model`` (path of the best model), ``training_curve`` and ``card``.

    Raises:
        StageError: As :func:`fit_epochs`.

    """
    history, best = fit_epochs(
        run.model,
        run.optimizer,
        settings=settings,
        out_dir=out_dir,
        train_epoch=run.train_epoch,
        validate=run.validate,
        save_best=run.save_best,
        stem=stem,
        label=label,
    )
    train_idx, val_idx = run.split
    return {
        "best_epoch": best["epoch"],
        "best_val_loss": best["val_loss"],
        metric: best.get(metric),
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
        "epochs_run": len(history),
        "history": history,
        "model": str(out_dir / model_name),
        "training_curve": str(out_dir / f"{stem}{CURVE}"),
        "card": run.card(),
    }
