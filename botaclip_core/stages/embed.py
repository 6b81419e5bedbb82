"""Stage ``embed``: BotaCLIP and BotaSP embedding maps from the DOFA map (or the tuned backbone)."""

from __future__ import annotations

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
)
from botaclip_core.stages.context import PlanContext
from botaclip_core.stages.embed_dofa import EmbedDofaOutput, embed_image
from botaclip_core.stages.finetune import FinetuneOutput
from botaclip_core.stages.tile import TileOutput


class EmbedSettings(StageSettings):
    """The maps' layout and storage; for pixel modes, the backbone that re-embeds the image."""

    backbone: BackboneSettings
    map: MapSettings
    precision: str = "fp32"
    inference: InferenceRuntime = inference_field()


class EmbedOutput(StageOutput):
    """The embedding maps: DOFA's (from ``embed-dofa``), BotaCLIP's and BotaSP's; previews."""

    dofa: str
    botaclip: str | None = None
    botasp: str | None = None
    previews: dict[str, str] = {}


def settings(ctx: PlanContext) -> EmbedSettings:
    """The catalog's backbone and embedding settings."""
    return EmbedSettings(
        backbone=BackboneSettings.of(ctx),
        map=MapSettings.of(ctx),
        precision=embed_precision(ctx),
        inference=inference_runtime(ctx),
    )


def build(settings: EmbedSettings, inputs: StageInputs, out_dir: Path) -> EmbedOutput:
    """Apply the trained adapters to the DOFA map, or embed the image with the tuned backbone."""
    from botaclip_core.preview import write_preview

    dofa = inputs.output("embed-dofa", EmbedDofaOutput)
    trained = inputs.optional("finetune", FinetuneOutput)
    if trained is None:
        return EmbedOutput(dofa=dofa.zarr)
    attrs = {"finetune_key": inputs.keys["finetune"], "finetune_mode": trained.mode}
    maps = {"botaclip": out_dir / "botaclip.zarr"}
    if trained.mode == "adapter":
        from botaclip_core.training.adapter import load_adapter

        adapter = load_adapter(Path(trained.model)).adapter
        _apply_adapter(dofa.float32, adapter, maps["botaclip"], attrs, "botaclip", settings.map)
    else:  # the fine-tuned backbone itself embeds the region (resumable block by block)
        embed_image(
            Path(inputs.output("tile", TileOutput).zarr),
            maps["botaclip"],
            backbone=settings.backbone,
            weights=trained.backbone,
            layout=settings.map,
            inference=settings.inference,
            attrs={**attrs, "source": "botaclip"},
            precision=settings.precision,
        )
    if trained.botasp:
        from botaclip_core.botasp import load_botasp_adapter

        maps["botasp"] = out_dir / "botasp.zarr"
        adapter = load_botasp_adapter(Path(trained.botasp))
        _apply_adapter(dofa.float32, adapter, maps["botasp"], attrs, "botasp", settings.map)
    previews = {}
    for name, store in maps.items():
        if (png := write_preview(store, preview_path(store))) is not None:
            previews[name] = str(png)
    return EmbedOutput(
        dofa=dofa.zarr,
        botaclip=str(maps["botaclip"]),
        botasp=str(maps["botasp"]) if "botasp" in maps else None,
        previews=previews,
    )


def _apply_adapter(
    dofa_zarr: str, adapter: Any, out: Path, attrs: dict[str, Any], source: str, layout: MapSettings
) -> None:
    """Adapted embeddings of a DOFA map: ``x @ W.T + b`` chunk by chunk, in the map's dtype."""
    from botaclip_core.embed import transform_embeddings

    weight = adapter.weight.detach().cpu().numpy().T.copy()
    bias = adapter.bias.detach().cpu().numpy().copy()
    transform_embeddings(
        Path(dofa_zarr),
        out,
        lambda x: x @ weight + bias,
        out_dim=weight.shape[1],
        attrs={**attrs, "source": source},
        dtype=layout.dtype,
    )


def report(output: EmbedOutput) -> dict[str, Any]:
    """Every embedding map, by feature source, and their previews."""
    maps = {"dofa": output.dofa, "botaclip": output.botaclip, "botasp": output.botasp}
    return {"embeddings": {k: v for k, v in maps.items() if v}, "previews": dict(output.previews)}


STAGE = Stage(
    name="embed",
    version="2",  # 2: the DOFA map is its own stage (embed-dofa)
    needs=("tile", "embed-dofa", "finetune"),
    settings_type=EmbedSettings,
    settings=settings,
    build=build,
    output=EmbedOutput,
    report=report,
    description="dofa.zarr + checkpoints → botaclip.zarr, botasp.zarr (seconds with adapters)",
)
