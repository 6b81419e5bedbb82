"""Stage ``features``: frozen DOFA features of chips around the relevé plots (and their views)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from botaclip_core.errors import StageError
from botaclip_core.stages.base import Stage, StageInputs, StageOutput, StageSettings
from botaclip_core.stages.common import (
    BackboneSettings,
    ChipSource,
    InferenceRuntime,
    inference_field,
    inference_runtime,
    weights_path,
)
from botaclip_core.stages.context import PlanContext
from botaclip_core.stages.rasterize import RasterizeOutput

logger = logging.getLogger(__name__)

MIN_VALID_PLOTS = 8


class FeaturesSettings(StageSettings):
    """Chips around the relevé plots, their augmented views and the frozen backbone."""

    releves: str
    chips: ChipSource
    backbone: BackboneSettings
    views: int
    max_shift: int
    seed: int
    inference: InferenceRuntime = inference_field()


class FeaturesOutput(StageOutput):
    """Features ``(plots, views, D)`` and the indices of the plots they belong to."""

    features: str
    plots: str
    n_plots: int
    views: int


def applies(ctx: PlanContext) -> str | None:
    """Only regions with relevés."""
    return None if ctx.region.releves else "needs the region's 'releves' dataset in the catalog"


def settings(ctx: PlanContext) -> FeaturesSettings:
    """The relevés, chip source, backbone and augmentation settings of the region."""
    finetune = ctx.catalog.finetune
    return FeaturesSettings(
        releves=str(ctx.region.releves),
        chips=ChipSource.of(ctx),
        backbone=BackboneSettings.of(ctx),
        views=finetune.augment_views,
        max_shift=finetune.max_shift,
        seed=finetune.seed,
        inference=inference_runtime(ctx),
    )


def inputs(ctx: PlanContext) -> dict[str, Any]:
    """The orthophotos (chips are read from them, no tiling needed) and the DOFA checkpoint."""
    return {"orthophotos": ctx.orthophoto_inputs(), "weights": ctx.weights_input()}


def build(settings: FeaturesSettings, inputs: StageInputs, out_dir: Path) -> FeaturesOutput:
    """Encode every view of every relevé plot that falls on valid orthophoto pixels."""
    from botaclip_core.chips import draw_augmentations
    from botaclip_core.features import encode_tiles, load_backbone

    table = (
        inputs.output("rasterize", RasterizeOutput).sites(settings.releves).load(settings.releves)
    )
    backbone = settings.backbone
    reader = settings.chips.reader(inputs.files, backbone.tile_size)
    rows, cols = table.sites["row"].to_numpy(), table.sites["col"].to_numpy()
    plots = _plots_on_valid_pixels(reader, rows, cols)
    model = load_backbone(backbone.size, weights_path(inputs.files), backbone.seed)
    views = settings.views
    feats = np.zeros((len(plots), views, int(model.embed_dim)), dtype=np.float32)
    mean, std = np.asarray(backbone.mean, np.float32), np.asarray(backbone.std, np.float32)
    group = max(1, 64 // views)  # plots per forward group: bounded memory, progress in the log
    for start in range(0, len(plots), group):
        chips = [
            reader.read(int(rows[idx]), int(cols[idx]), aug)
            for idx in plots[start : start + group]
            for aug in draw_augmentations(
                views, seed=settings.seed * 1_000_003 + int(idx), max_shift=settings.max_shift
            )
        ]
        out = encode_tiles(
            model,
            np.stack(chips),
            backbone.wavelengths_um,
            mean,
            std,
            batch_size=settings.inference.batch_size,
        )
        feats[start : start + group] = out.reshape(-1, views, out.shape[1])
        logger.info("features: %d / %d plots encoded", min(start + group, len(plots)), len(plots))
    reader.close()
    np.save(out_dir / "features.npy", feats)
    np.save(out_dir / "plots.npy", plots)
    return FeaturesOutput(
        features=str(out_dir / "features.npy"),
        plots=str(out_dir / "plots.npy"),
        n_plots=len(plots),
        views=views,
    )


def _plots_on_valid_pixels(reader: Any, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Indices of the plots whose centre pixel is valid orthophoto data.

    Raises:
        StageError: if fewer than :data:`MIN_VALID_PLOTS` are.
    """
    keep = np.array(
        [reader.read_with_mask(int(r), int(c), 1)[1][0, 0] for r, c in zip(rows, cols, strict=True)]
    )
    if keep.sum() < MIN_VALID_PLOTS:
        raise StageError(
            f"only {int(keep.sum())} of {len(rows)} relevé plots fall on valid orthophoto pixels; "
            f"BotaCLIP needs at least {MIN_VALID_PLOTS}. Check the relevés' CRS and the "
            "orthophoto coverage."
        )
    return np.flatnonzero(keep)


STAGE = Stage(
    name="features",
    version="2",  # 2: keyed on the orthophotos, not on the image store (chips come from files)
    needs=("rasterize",),
    settings_type=FeaturesSettings,
    settings=settings,
    build=build,
    output=FeaturesOutput,
    applies=applies,
    inputs=inputs,
    description="chips around relevé plots → frozen DOFA features (plots × views × D)",
)
