"""A toy stage in its own module, as a plugin would add one: per-band means of the image store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import zarr

from botaclip_core.stages.base import Stage, StageInputs, StageOutput, StageSettings
from botaclip_core.stages.context import PlanContext
from botaclip_core.stages.tile import TileOutput


class BandMeansSettings(StageSettings):
    bands: list[str]


class BandMeansOutput(StageOutput):
    means: dict[str, float]
    file: str


def settings(ctx: PlanContext) -> BandMeansSettings:
    return BandMeansSettings(bands=list(ctx.region.orthophotos.bands))


def build(settings: BandMeansSettings, inputs: StageInputs, out_dir: Path) -> BandMeansOutput:
    store = Path(inputs.output("tile", TileOutput).zarr)
    image = zarr.open_array(str(store / "image"), mode="r")[:]
    valid = zarr.open_array(str(store / "valid"), mode="r")[:] > 0
    means = {b: float(image[i][valid].mean()) for i, b in enumerate(settings.bands)}
    (out_dir / "means.json").write_text(json.dumps(means))
    return BandMeansOutput(means=means, file=str(out_dir / "means.json"))


def report(output: BandMeansOutput) -> dict[str, Any]:
    return {"band_means": output.means}


STAGE = Stage(
    name="band-means",
    version="1",
    needs=("tile",),
    settings_type=BandMeansSettings,
    settings=settings,
    build=build,
    output=BandMeansOutput,
    report=report,
    description="per-band means of the valid pixels of image.zarr",
)
