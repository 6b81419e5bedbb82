"""Stage ``embed-dofa``: frozen DOFA features of every covered tile (the costly forward pass)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from botaclip_core.stages.base import Stage, StageInputs, StageOutput, StageSettings
from botaclip_core.stages.common import (
    BackboneSettings,
    InferenceRuntime,
    inference_field,
    inference_runtime,
    weights_path,
)
from botaclip_core.stages.context import PlanContext
from botaclip_core.stages.tile import TileOutput


class EmbedDofaSettings(StageSettings):
    """The backbone and the block size of the embedding map."""

    backbone: BackboneSettings
    block_tiles: int
    inference: InferenceRuntime = inference_field()


class EmbedDofaOutput(StageOutput):
    """The DOFA embedding map (feature, ty, tx)."""

    zarr: str
    blocks: int
    blocks_run: int
    tiles_embedded: int


def settings(ctx: PlanContext) -> EmbedDofaSettings:
    """The catalog's backbone and embedding settings."""
    return EmbedDofaSettings(
        backbone=BackboneSettings.of(ctx),
        block_tiles=ctx.catalog.embed.block_tiles,
        inference=inference_runtime(ctx),
    )


def inputs(ctx: PlanContext) -> dict[str, Any]:
    """The DOFA checkpoint."""
    return {"weights": ctx.weights_input()}


def embed_image(
    image_zarr: Path,
    out: Path,
    *,
    backbone: BackboneSettings,
    weights: str | None,
    block_tiles: int,
    inference: InferenceRuntime,
    attrs: dict[str, Any],
) -> dict[str, Any]:
    """Backbone features of every covered tile (Dask or in-process, resumable by block)."""
    from botaclip_core.cluster import compute_client, local_workers
    from botaclip_core.embed import BackboneSpec, embed_region
    from botaclip_core.models.dofa import DOFA_SIZES

    # torch threads per local worker: the cores shared among them (Dask sets 1 by default)
    threads = None
    if not inference.dask.address:
        threads = max(1, (os.cpu_count() or 1) // local_workers(inference.dask))
    spec = BackboneSpec(
        size=backbone.size,
        weights=weights,
        seed=backbone.seed,
        wavelengths_um=tuple(backbone.wavelengths_um),
        mean=tuple(backbone.mean),
        std=tuple(backbone.std),
        batch_size=inference.batch_size,
        torch_threads=threads,
    )
    with compute_client(inference.dask) as client:
        return embed_region(
            image_zarr,
            out,
            spec=spec,
            dim=DOFA_SIZES[backbone.size].embed_dim,
            tile_size=backbone.tile_size,
            block_tiles=block_tiles,
            client=client,
            attrs={**attrs, "dofa_size": backbone.size},
        )


def build(settings: EmbedDofaSettings, inputs: StageInputs, out_dir: Path) -> EmbedDofaOutput:
    """Embed the image store with the frozen backbone."""
    weights = weights_path(inputs.files)
    result = embed_image(
        Path(inputs.output("tile", TileOutput).zarr),
        out_dir / "dofa.zarr",
        backbone=settings.backbone,
        weights=weights,
        block_tiles=settings.block_tiles,
        inference=settings.inference,
        attrs={
            "source": "dofa",
            "dofa_size": settings.backbone.size,
            "dofa_weights": weights or "random",
        },
    )
    return EmbedDofaOutput.model_validate(result)


def report(output: EmbedDofaOutput) -> dict[str, Any]:
    """The DOFA embedding map."""
    return {"embeddings": {"dofa": output.zarr}}


STAGE = Stage(
    name="embed-dofa",
    version="2",  # 2: keyed on the image store's content, not its storage settings
    needs=("tile",),
    settings_type=EmbedDofaSettings,
    settings=settings,
    build=build,
    output=EmbedDofaOutput,
    inputs=inputs,
    report=report,
    description="image.zarr → dofa.zarr: frozen DOFA features of every covered tile (Dask)",
)
