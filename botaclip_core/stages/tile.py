"""Stage ``tile``: the orthophotos on the region grid, as a sharded image Zarr."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from botaclip_core.catalog import DaskSettings
from botaclip_core.stages.base import (
    Stage,
    StageInputs,
    StageOutput,
    StageSettings,
    runtime,
    storage,
)
from botaclip_core.stages.common import GridSettings, OrthophotoReading
from botaclip_core.stages.context import PlanContext


class TileSettings(StageSettings):
    """What the image store holds (grid, reading, tile size) and how it is stored."""

    grid: GridSettings
    orthophotos: OrthophotoReading
    tile_size: int
    shard_blocks: int = storage(8, "Chunks per Zarr shard side.")
    zstd_level: int = storage(1, "zstd level of the chunks.")
    workers: int | None = runtime(None, "Tiling threads; default: all cores.")
    dask: DaskSettings = runtime(DaskSettings(), "A scheduler spreads the I/O over machines.")


class TileOutput(StageOutput):
    """The image store."""

    zarr: str
    grid: dict[str, Any]
    blocks: int
    blocks_written: int
    dtype: str


def settings(ctx: PlanContext) -> TileSettings:
    """The catalog's tiling settings for the region."""
    tiling = ctx.catalog.tiling
    return TileSettings(
        grid=GridSettings.of(ctx.grid),
        orthophotos=OrthophotoReading.of(ctx),
        tile_size=tiling.tile_size,
        shard_blocks=tiling.shard_blocks,
        zstd_level=tiling.zstd_level,
        workers=tiling.workers,
        dask=ctx.catalog.dask,
    )


def inputs(ctx: PlanContext) -> dict[str, Any]:
    """The orthophotos, in catalog order (the order decides overlaps)."""
    return {"orthophotos": ctx.orthophoto_inputs()}


def build(settings: TileSettings, inputs: StageInputs, out_dir: Path) -> TileOutput:
    """Tile every orthophoto onto the grid (resumable shard by shard)."""
    from botaclip_core.tiling import tile_orthophotos

    ortho = settings.orthophotos
    # GDAL releases the GIL: local threads beat processes; a remote scheduler spreads the I/O
    with contextlib.ExitStack() as stack:
        client = None
        if settings.dask.address:
            from botaclip_core.cluster import dask_client

            client = stack.enter_context(dask_client(settings.dask))
        result = tile_orthophotos(
            [Path(fp["path"]) for fp in inputs.files["orthophotos"]],
            out_dir / "image.zarr",
            grid=settings.grid.to_grid(),
            bands=ortho.bands,
            wavelengths_um=ortho.wavelengths_um,
            tile_size=settings.tile_size,
            resampling=ortho.resampling,
            nodata=ortho.nodata,
            precedence=ortho.precedence,
            shard_blocks=settings.shard_blocks,
            zstd_level=settings.zstd_level,
            workers=settings.workers,
            dask_client=client,
        )
    return TileOutput(
        zarr=str(result.path),
        grid=result.grid.to_dict(),
        blocks=result.n_blocks,
        blocks_written=result.n_written,
        dtype=result.dtype,
    )


STAGE = Stage(
    name="tile",
    version="2",  # 2: sharded image Zarr
    needs=(),
    settings_type=TileSettings,
    settings=settings,
    build=build,
    output=TileOutput,
    inputs=inputs,
    description="orthophotos on the region grid → image.zarr (band, y, x) + valid mask",
)
