"""BotaCLIP training API, re-exported from :mod:`botaclip_core.training` for existing imports."""

from __future__ import annotations

from botaclip_core.seeding import seeded
from botaclip_core.training.adapter import BotaClip, feature_batches, load_adapter, train_adapter
from botaclip_core.training.backbone import (
    LORA_TARGET,
    BotaClipBackbone,
    precision_context,
    train_backbone,
)
from botaclip_core.training.curves import CURVE, HISTORY, plot_history
from botaclip_core.training.data import (
    MIN_PLOTS,
    TrainingData,
    releve_input,
    spatial_split,
    split_plots,
)
from botaclip_core.training.loop import (
    BACKBONE,
    BEST,
    CHECKPOINT,
    cpu_state,
    fit_epochs,
    optimizer_step,
    save_atomic,
)
from botaclip_core.training.pixels import (
    BRIGHTNESS_RANGE,
    PixelBatches,
    crop_chip,
    draw_epoch_augmentations,
)
from botaclip_core.training.runtime import check_settings, resolve_device

__all__ = [
    "BACKBONE",
    "BEST",
    "BRIGHTNESS_RANGE",
    "CHECKPOINT",
    "CURVE",
    "HISTORY",
    "LORA_TARGET",
    "MIN_PLOTS",
    "BotaClip",
    "BotaClipBackbone",
    "PixelBatches",
    "TrainingData",
    "check_settings",
    "cpu_state",
    "crop_chip",
    "draw_epoch_augmentations",
    "feature_batches",
    "fit_epochs",
    "load_adapter",
    "optimizer_step",
    "plot_history",
    "precision_context",
    "releve_input",
    "resolve_device",
    "save_atomic",
    "seeded",
    "spatial_split",
    "split_plots",
    "train_adapter",
    "train_backbone",
]
