"""Stage ``features``: frozen DOFA features of chips around the relevé plots (and their views)."""

from __future__ import annotations

import io
import logging
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from botaclip_core.errors import StageError
from botaclip_core.progress import track
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
from botaclip_core.store import atomic_save_npy, atomic_write_bytes

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


GROUPS_DIR = "groups"
# chips per group: bounds memory, and what a kill can lose (settings only: reruns agree)
CHIPS_PER_GROUP = 64


def build(settings: FeaturesSettings, inputs: StageInputs, out_dir: Path) -> FeaturesOutput:
    """Encode every view of every relevé plot that falls on valid orthophoto pixels.

    Plots are encoded in groups; each finished group is written atomically to
    ``out_dir/groups/`` and skipped by a rerun, so a killed run loses at most one group and
    resumes with features equal to an uninterrupted run's.
    """
    from botaclip_core.augment import draw_augmentations
    from botaclip_core.features import encode_tiles, load_backbone

    table = (
        inputs.output("rasterize", RasterizeOutput).sites(settings.releves).load(settings.releves)
    )
    backbone = settings.backbone
    reader = settings.chips.reader(inputs.files, backbone.tile_size)
    try:
        rows, cols = table.sites["row"].to_numpy(), table.sites["col"].to_numpy()
        plots = _plots_on_valid_pixels(reader, rows, cols, settings.releves)
        if _finished_earlier(out_dir, plots, settings.views):
            logger.info("features: all %d plots were encoded by an earlier run", len(plots))
            return _output(out_dir, len(plots), settings.views)
        from botaclip_core.training.runtime import resolve_device

        # embed.device (auto: CUDA where there is one), in fp32: the features train the adapters
        device = resolve_device(settings.inference.device, field="embed.device")
        model = load_backbone(backbone.size, weights_path(inputs.files), backbone.seed, device)
        views, dim = settings.views, int(model.embed_dim)
        mean, std = np.asarray(backbone.mean, np.float32), np.asarray(backbone.std, np.float32)
        group = max(1, CHIPS_PER_GROUP // views)
        starts = range(0, len(plots), group)
        groups = out_dir / GROUPS_DIR
        groups.mkdir(exist_ok=True)
        feats = np.zeros((len(plots), views, dim), dtype=np.float32)
        todo = []
        for start in starts:
            done = _load_group(groups, start, plots[start : start + group], (views, dim))
            if done is None:
                todo.append(start)
            else:
                feats[start : start + group] = done
        if len(todo) < len(starts):
            logger.info(
                "features: %d of %d groups of plots done earlier, %d to do",
                len(starts) - len(todo),
                len(starts),
                len(todo),
            )
        with track("features", total=len(plots), unit="plots") as progress:
            progress.advance(len(plots) - sum(len(plots[s : s + group]) for s in todo))
            for start in todo:
                members = plots[start : start + group]
                chips = [
                    reader.read(int(rows[idx]), int(cols[idx]), aug)
                    for idx in members
                    for aug in draw_augmentations(
                        views,
                        seed=settings.seed * 1_000_003 + int(idx),
                        max_shift=settings.max_shift,
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
                _save_group(groups, start, members, feats[start : start + group])
                progress.advance(len(members))
                logger.info(
                    "features: %d / %d plots encoded", min(start + group, len(plots)), len(plots)
                )
    finally:
        reader.close()
    atomic_save_npy(out_dir / "features.npy", feats)
    atomic_save_npy(out_dir / "plots.npy", plots)
    # the whole result is on disk (a rerun before the manifest is written reuses it)
    shutil.rmtree(groups, ignore_errors=True)
    return _output(out_dir, len(plots), views)


def _output(out_dir: Path, n_plots: int, views: int) -> FeaturesOutput:
    return FeaturesOutput(
        features=str(out_dir / "features.npy"),
        plots=str(out_dir / "plots.npy"),
        n_plots=n_plots,
        views=views,
    )


def _finished_earlier(out_dir: Path, plots: np.ndarray, views: int) -> bool:
    """Whether a killed run wrote the whole result (both files, atomically) before its manifest."""
    try:
        saved = np.load(out_dir / "plots.npy", allow_pickle=False)
        feats = np.load(out_dir / "features.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return np.array_equal(saved, plots) and feats.shape[:2] == (len(plots), views)


def _group_path(groups: Path, start: int) -> Path:
    return groups / f"plots-{start:07d}.npz"


def _save_group(groups: Path, start: int, plots: np.ndarray, features: np.ndarray) -> None:
    """Write one finished group (its plot indices and features) atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, plots=plots, features=features)
    atomic_write_bytes(_group_path(groups, start), buffer.getvalue())


def _load_group(
    groups: Path, start: int, plots: np.ndarray, shape: tuple[int, int]
) -> np.ndarray | None:
    """The features of a group finished by an earlier run, or None if it must be encoded.

    A group whose plots or feature shape differ (another relevé table under the same key cannot
    happen, but a file from another version can) is encoded again.
    """
    path = _group_path(groups, start)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            saved_plots, features = data["plots"], data["features"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        logger.warning("features: %s is unreadable (%s); encoding that group again", path, exc)
        return None
    if not np.array_equal(saved_plots, plots) or features.shape != (len(plots), *shape):
        logger.warning("features: %s holds other plots; encoding that group again", path)
        return None
    return np.asarray(features, dtype=np.float32)


def _plots_on_valid_pixels(
    reader: Any, rows: np.ndarray, cols: np.ndarray, releves: str
) -> np.ndarray:
    """Indices of the plots whose centre pixel is valid orthophoto data.

    Raises:
        StageError: if fewer than :data:`MIN_VALID_PLOTS` are.
    """
    keep = np.array(
        [
            reader.read_with_mask(int(r), int(c), 1)[1][0, 0]
            for r, c in zip(rows, cols, strict=True)
        ],
        dtype=bool,
    )
    if keep.sum() < MIN_VALID_PLOTS:
        raise StageError(
            f"datasets.{releves}: only {int(keep.sum())} of {len(rows)} relevé plots fall on "
            f"valid orthophoto pixels (the others on nodata or outside every sheet); BotaCLIP "
            f"needs at least {MIN_VALID_PLOTS}. Check datasets.{releves}.crs and that the "
            "orthophotos cover the plots."
        )
    if not keep.all():
        logger.warning(
            "features: %d of %d relevé plots of datasets.%s fall on orthophoto nodata and are "
            "dropped from training",
            int((~keep).sum()),
            len(keep),
            releves,
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
