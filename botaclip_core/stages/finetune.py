"""Stage ``finetune``: BotaCLIP (adapter or backbone) trained on relevés, plus BotaSP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from botaclip_core.catalog import FinetuneSettings
from botaclip_core.stages.base import Stage, StageInputs, StageOutput, StageSettings, TableArtifact
from botaclip_core.stages.common import BackboneSettings, ChipSource, weights_path
from botaclip_core.stages.context import PlanContext
from botaclip_core.stages.features import FeaturesOutput
from botaclip_core.stages.features import applies as _needs_releves
from botaclip_core.stages.rasterize import RasterizeOutput, SiteFiles
from botaclip_core.store import atomic_write_json


class FinetuneStageSettings(StageSettings):
    """The training method, the backbone, and for pixel modes where chips are read."""

    releves: str
    training: FinetuneSettings
    backbone: BackboneSettings
    pixels: ChipSource | None = None


class FinetuneOutput(StageOutput):
    """The trained models, their model card and training curve."""

    mode: str
    model: str
    backbone: str | None
    model_card: str
    training_curve: str
    history: str
    best_val_loss: float
    val_recall_at_5: float
    botasp: str | None = None
    botasp_val_auc: float | None = None


def settings(ctx: PlanContext) -> FinetuneStageSettings:
    """The catalog's fine-tuning settings; pixel modes also read chips from the orthophotos."""
    training = ctx.catalog.finetune
    return FinetuneStageSettings(
        releves=str(ctx.region.releves),
        training=training,
        backbone=BackboneSettings.of(ctx),
        pixels=None if training.mode == "adapter" else ChipSource.of(ctx),
    )


def inputs(ctx: PlanContext) -> dict[str, Any]:
    """The DOFA checkpoint, and the orthophotos for pixel modes."""
    files: dict[str, Any] = {"weights": ctx.weights_input()}
    if ctx.catalog.finetune.mode != "adapter":
        files["orthophotos"] = ctx.orthophoto_inputs()
    return files


def build(settings: FinetuneStageSettings, inputs: StageInputs, out_dir: Path) -> FinetuneOutput:
    """Train BotaCLIP (and BotaSP) and write the model card."""
    from botaclip_core.training.data import TrainingData

    sites = inputs.output("rasterize", RasterizeOutput).sites(settings.releves)
    table = sites.load(settings.releves)
    features = inputs.output("features", FeaturesOutput)
    keep = np.load(features.plots)
    train = TrainingData(
        features=np.load(features.features),
        releves=table.values[keep],
        coords=table.sites[["x", "y"]].to_numpy()[keep],
        species=table.species,
    )
    summary = _train_botaclip(settings, inputs, train, table, keep, out_dir)
    metrics = {k: v for k, v in summary.items() if k not in ("history", "card")}
    botasp: dict[str, Any] = {}
    if settings.training.botasp:
        from botaclip_core.botasp import train_botasp

        botasp = train_botasp(train, settings.training, out_dir)
        metrics["botasp"] = {k: v for k, v in botasp.items() if k not in ("history", "card")}
    card = _model_card(settings, inputs, summary, metrics, sites, len(keep), table.species)
    atomic_write_json(out_dir / "model_card.json", card)
    return FinetuneOutput(
        mode=settings.training.mode,
        model=summary["model"],
        backbone=summary.get("backbone"),
        model_card=str(out_dir / "model_card.json"),
        training_curve=str(out_dir / "training_curve.png"),
        history=str(out_dir / "history.json"),
        best_val_loss=summary["best_val_loss"],
        val_recall_at_5=summary["val_recall_at_5"],
        botasp=botasp.get("model"),
        botasp_val_auc=botasp.get("val_auc"),
    )


def _train_botaclip(
    settings: FinetuneStageSettings,
    inputs: StageInputs,
    train: Any,
    table: Any,
    keep: np.ndarray,
    out_dir: Path,
) -> dict[str, Any]:
    """The adapter on cached features, or DOFA itself on chips read around the plots."""
    from botaclip_core.training.adapter import train_adapter
    from botaclip_core.training.backbone import train_backbone

    training, backbone = settings.training, settings.backbone
    if settings.pixels is None:
        return train_adapter(train, training, out_dir)
    return train_backbone(
        _plot_chips(
            settings.pixels, inputs.files, table, keep, backbone.tile_size, training.max_shift
        ),
        train.releves,
        train.coords,
        train.species,
        size=backbone.size,
        weights=weights_path(inputs.files),
        wavelengths_um=tuple(backbone.wavelengths_um),
        mean=tuple(backbone.mean),
        std=tuple(backbone.std),
        settings=training,
        out_dir=out_dir,
    )


def _plot_chips(
    source: ChipSource,
    files: dict[str, Any],
    table: Any,
    keep: np.ndarray,
    tile_size: int,
    margin: int,
) -> np.ndarray:
    """Plain chips with a margin for shifts, around the kept plots (pixel training modes)."""
    reader = source.reader(files, tile_size + 2 * margin)
    rows, cols = table.sites["row"].to_numpy(), table.sites["col"].to_numpy()
    try:
        return np.stack([reader.read(int(rows[i]), int(cols[i])) for i in keep])
    finally:
        reader.close()


def _model_card(
    settings: FinetuneStageSettings,
    inputs: StageInputs,
    summary: dict[str, Any],
    metrics: dict[str, Any],
    sites: SiteFiles,
    n_plots: int,
    species: list[str],
) -> dict[str, Any]:
    """What was trained, on which data, with which result."""
    weights = weights_path(inputs.files)
    return {
        **summary.get("card", {}),
        "dofa": {
            "size": settings.backbone.size,
            "weights": weights or "random initialisation (no pretrained weights)",
        },
        "settings": settings.training.model_dump(mode="json"),
        "data": {
            "rasterize_key": inputs.keys.get("rasterize"),
            "features_key": inputs.keys.get("features"),
            "releves_file": sites.file,
            "n_plots": int(n_plots),
            "n_species": len(species),
        },
        "metrics": metrics,
        "species": species,
    }


def report(output: FinetuneOutput) -> dict[str, Any]:
    """The model card's path."""
    return {"model_card": output.model_card}


def artifacts(region: str, output: FinetuneOutput, status: str) -> list[TableArtifact]:
    """The training curve, once per training (not again when cached)."""
    import json

    if status != "completed":
        return []
    history = json.loads(Path(output.history).read_text())
    return [
        TableArtifact(
            key=f"botaclip-training-{region}",
            rows=[
                {k: round(v, 4) if isinstance(v, float) else v for k, v in h.items()}
                for h in history
            ],
            description=f"BotaCLIP training curve, region {region} "
            "(validation: spatially held-out plots)",
        )
    ]


STAGE = Stage(
    name="finetune",
    version="2",  # 2: keyed on the chip features, not on the image store
    needs=("rasterize", "features"),
    settings_type=FinetuneStageSettings,
    settings=settings,
    build=build,
    output=FinetuneOutput,
    applies=_needs_releves,
    inputs=inputs,
    report=report,
    artifacts=artifacts,
    description="features + relevés → BotaCLIP checkpoint, BotaSP baseline, model card",
)
