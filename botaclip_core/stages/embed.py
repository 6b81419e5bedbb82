"""Stage ``embed``: BotaCLIP and BotaSP embedding maps from the DOFA map (or the tuned backbone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from botaclip_core.stages.base import Stage, StageInputs, StageOutput, StageSettings
from botaclip_core.stages.common import (
    BackboneSettings,
    InferenceRuntime,
    inference_field,
    inference_runtime,
)
from botaclip_core.stages.context import PlanContext
from botaclip_core.stages.embed_dofa import EmbedDofaOutput, embed_image
from botaclip_core.stages.finetune import FinetuneOutput
from botaclip_core.stages.tile import TileOutput


class EmbedSettings(StageSettings):
    """For pixel training modes, the tuned backbone re-embeds the image store."""

    backbone: BackboneSettings
    block_tiles: int
    inference: InferenceRuntime = inference_field()


class EmbedOutput(StageOutput):
    """The embedding maps: DOFA's (from ``embed-dofa``), BotaCLIP's and BotaSP's."""

    dofa: str
    botaclip: str | None = None
    botasp: str | None = None


def settings(ctx: PlanContext) -> EmbedSettings:
    """The catalog's backbone and embedding settings."""
    return EmbedSettings(
        backbone=BackboneSettings.of(ctx),
        block_tiles=ctx.catalog.embed.block_tiles,
        inference=inference_runtime(ctx),
    )


def build(settings: EmbedSettings, inputs: StageInputs, out_dir: Path) -> EmbedOutput:
    """Apply the trained adapters to the DOFA map, or embed the image with the tuned backbone."""
    dofa = inputs.output("embed-dofa", EmbedDofaOutput)
    trained = inputs.optional("finetune", FinetuneOutput)
    if trained is None:
        return EmbedOutput(dofa=dofa.zarr)
    attrs = {"finetune_key": inputs.keys["finetune"], "finetune_mode": trained.mode}
    botaclip = out_dir / "botaclip.zarr"
    if trained.mode == "adapter":
        from botaclip_core.training.adapter import load_adapter

        _apply_adapter(
            dofa.zarr, load_adapter(Path(trained.model)).adapter, botaclip, attrs, "botaclip"
        )
    else:  # the fine-tuned backbone itself embeds the region (resumable block by block)
        embed_image(
            Path(inputs.output("tile", TileOutput).zarr),
            botaclip,
            backbone=settings.backbone,
            weights=trained.backbone,
            block_tiles=settings.block_tiles,
            inference=settings.inference,
            attrs={**attrs, "source": "botaclip"},
        )
    botasp = None
    if trained.botasp:
        from botaclip_core.botasp import load_botasp_adapter

        botasp = out_dir / "botasp.zarr"
        _apply_adapter(
            dofa.zarr, load_botasp_adapter(Path(trained.botasp)), botasp, attrs, "botasp"
        )
    return EmbedOutput(
        dofa=dofa.zarr, botaclip=str(botaclip), botasp=str(botasp) if botasp else None
    )


def _apply_adapter(
    dofa_zarr: str, adapter: Any, out: Path, attrs: dict[str, Any], source: str
) -> None:
    """Adapted embeddings of a DOFA Zarr: ``x @ W.T + b`` block by block."""
    from botaclip_core.embed import transform_embeddings

    weight = adapter.weight.detach().cpu().numpy().T.copy()
    bias = adapter.bias.detach().cpu().numpy().copy()
    transform_embeddings(
        Path(dofa_zarr),
        out,
        lambda x: x @ weight + bias,
        out_dim=weight.shape[1],
        attrs={**attrs, "source": source},
    )


def report(output: EmbedOutput) -> dict[str, Any]:
    """Every embedding map, by feature source."""
    maps = {"dofa": output.dofa, "botaclip": output.botaclip, "botasp": output.botasp}
    return {"embeddings": {k: v for k, v in maps.items() if v}}


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
