"""Stage ``embed-dofa``: frozen DOFA features of every covered tile (the costly forward pass)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from botaclip_core.stages.base import Stage, StageInputs, StageOutput, StageSettings
from botaclip_core.stages.common import (
    BackboneSettings,
    InferenceRuntime,
    MapSettings,
    embed_precision,
    inference_field,
    inference_runtime,
    preview_path,
    weights_path,
)
from botaclip_core.stages.context import PlanContext
from botaclip_core.stages.tile import TileOutput


class EmbedDofaSettings(StageSettings):
    """The backbone, its precision, and the layout and storage of the embedding map."""

    backbone: BackboneSettings
    map: MapSettings
    precision: str = "fp32"
    inference: InferenceRuntime = inference_field()


class EmbedDofaOutput(StageOutput):
    """The DOFA embedding map (feature, y, x), its preview, and the adapters' float32 input.

    With ``embed.dtype`` float16 or int8, ``zarr`` is the published map in that type and
    ``features`` the float32 map the adapters read, so BotaCLIP and BotaSP maps are computed
    from exact DOFA features (and stay within half a quantization step of float32 maps).
    """

    zarr: str
    blocks: int
    blocks_run: int
    tiles_embedded: int
    precision: str = "fp32"
    preview: str | None = None
    features: str | None = None

    @property
    def float32(self) -> str:
        """The float32 DOFA map (the adapters' input)."""
        return self.features or self.zarr


def settings(ctx: PlanContext) -> EmbedDofaSettings:
    """The catalog's backbone and embedding settings."""
    return EmbedDofaSettings(
        backbone=BackboneSettings.of(ctx),
        map=MapSettings.of(ctx),
        precision=embed_precision(ctx),
        inference=inference_runtime(ctx),
    )


def inputs(ctx: PlanContext) -> dict[str, Any]:
    """The DOFA checkpoint."""
    return {"weights": ctx.weights_input()}


def float32_path(published: Path) -> Path:
    """Where the float32 features of a float16/int8 map are kept: ``<name>.float32.zarr``."""
    return published.with_name(published.name.removesuffix(".zarr") + ".float32.zarr")


def embed_image(
    image_zarr: Path,
    out: Path,
    *,
    backbone: BackboneSettings,
    weights: str | None,
    layout: MapSettings,
    inference: InferenceRuntime,
    attrs: dict[str, Any],
    precision: str = "fp32",
) -> tuple[dict[str, Any], Path]:
    """Backbone features of every covered window, then the map ``out`` in ``layout.dtype``.

    The forward pass always writes float32 (Dask or in-process, resumable by block); a
    float16/int8 map is then converted from it (seconds, rewritten whole on a resumed run),
    and the float32 map is kept beside it for the adapters.

    Returns:
        The forward pass's counts, and the float32 map (``out`` itself for float32 maps).
    """
    from botaclip_core.cluster import compute_client, local_workers
    from botaclip_core.embed import BackboneSpec, embed_region, transform_embeddings
    from botaclip_core.models.dofa import DOFA_SIZES

    spec = BackboneSpec(
        size=backbone.size,
        weights=weights,
        seed=backbone.seed,
        wavelengths_um=tuple(backbone.wavelengths_um),
        mean=tuple(backbone.mean),
        std=tuple(backbone.std),
        batch_size=inference.batch_size,
        device=inference.device,
        precision=precision,
    )
    # torch threads per local worker: the cores shared among them (Dask sets 1 by default)
    if not inference.dask.address and not spec.wants_gpu:
        threads = max(1, (os.cpu_count() or 1) // local_workers(inference.dask))
        spec = dataclasses.replace(spec, torch_threads=threads)
    attrs = {**attrs, "dofa_size": backbone.size}
    features = out if layout.dtype == "float32" else float32_path(out)
    with compute_client(inference.dask, gpu=spec.wants_gpu) as client:
        result = embed_region(
            image_zarr,
            features,
            spec=spec,
            dim=DOFA_SIZES[backbone.size].embed_dim,
            tile_size=backbone.tile_size,
            block_tiles=layout.block_tiles,
            stride=layout.stride,
            client=client,
            attrs=attrs,
        )
    if features != out:
        dim = DOFA_SIZES[backbone.size].embed_dim
        transform_embeddings(
            features, out, lambda x: x, out_dim=dim, attrs=attrs, dtype=layout.dtype
        )
    return {**result, "zarr": str(out)}, features


def build(settings: EmbedDofaSettings, inputs: StageInputs, out_dir: Path) -> EmbedDofaOutput:
    """Embed the image store with the frozen backbone, publish it in its dtype, preview it."""
    from botaclip_core.preview import write_preview

    weights = weights_path(inputs.files)
    published = out_dir / "dofa.zarr"
    result, features = embed_image(
        Path(inputs.output("tile", TileOutput).zarr),
        published,
        backbone=settings.backbone,
        weights=weights,
        layout=settings.map,
        inference=settings.inference,
        attrs={"source": "dofa", "dofa_weights": weights or "random"},
        precision=settings.precision,
    )
    preview = write_preview(published, preview_path(published))
    return EmbedDofaOutput(
        **result,
        preview=str(preview) if preview else None,
        features=None if features == published else str(features),
    )


def report(output: EmbedDofaOutput) -> dict[str, Any]:
    """The DOFA embedding map and its preview."""
    previews = {"dofa": output.preview} if output.preview else {}
    return {"embeddings": {"dofa": output.zarr}, "previews": previews}


STAGE = Stage(
    name="embed-dofa",
    version="3",  # 3: keyed on the precision (fp32 on CPUs, bf16 on GPUs by default)
    needs=("tile",),
    settings_type=EmbedDofaSettings,
    settings=settings,
    build=build,
    output=EmbedDofaOutput,
    inputs=inputs,
    report=report,
    description="image.zarr → dofa.zarr: frozen DOFA features of every covered tile (Dask)",
)
