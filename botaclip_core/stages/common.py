"""Settings shared by several stages: the region grid, the DOFA backbone, its runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from botaclip_core.catalog import DaskSettings, StrictModel
from botaclip_core.grid import RegionGrid
from botaclip_core.stages.base import runtime
from botaclip_core.stages.context import PlanContext


class GridSettings(StrictModel):
    """The region grid (CRS, resolution, pixel-snapped origin and size)."""

    crs: str
    resolution: float
    left: float
    top: float
    width: int
    height: int

    @classmethod
    def of(cls, grid: RegionGrid) -> GridSettings:
        """The settings form of a grid."""
        return cls.model_validate(grid.to_dict())

    def to_grid(self) -> RegionGrid:
        """The grid itself."""
        return RegionGrid.from_dict(self.model_dump())


class OrthophotoReading(StrictModel):
    """How orthophoto pixels are read onto the grid (the files themselves are inputs)."""

    bands: list[str]
    wavelengths_um: list[float]
    nodata: float | None
    resampling: str
    precedence: str

    @classmethod
    def of(cls, ctx: PlanContext) -> OrthophotoReading:
        """The region's orthophoto reading settings."""
        ortho = ctx.region.orthophotos
        return cls.model_validate(ortho.model_dump(mode="json", exclude={"paths", "mean", "std"}))


class BackboneSettings(StrictModel):
    """The DOFA backbone and its input scaling (the checkpoint file is an input)."""

    size: str
    seed: int
    wavelengths_um: list[float]
    mean: list[float]
    std: list[float]
    tile_size: int

    @classmethod
    def of(cls, ctx: PlanContext) -> BackboneSettings:
        """The catalog's backbone, with per-band statistics resolved for the imagery's dtype."""
        from botaclip_core.features import band_statistics

        ortho = ctx.region.orthophotos
        mean, std = band_statistics(len(ortho.bands), ctx.imagery_dtype, ortho.mean, ortho.std)
        return cls(
            size=ctx.catalog.model.dofa.size,
            seed=ctx.catalog.finetune.seed,
            wavelengths_um=list(ortho.wavelengths_um),
            mean=[float(v) for v in mean],
            std=[float(v) for v in std],
            tile_size=ctx.catalog.tiling.tile_size,
        )


class InferenceRuntime(StrictModel):
    """Where and how inference runs: no effect on the embeddings.

    ``batch_size`` None is the device's default (8 on the CPU, 256 for DOFA-Base on CUDA);
    ``device`` is resolved where the forward runs (a Dask worker), ``auto`` picking CUDA there.
    """

    batch_size: int | None = 8
    device: str = "auto"
    dask: DaskSettings = DaskSettings()


def inference_runtime(ctx: PlanContext) -> InferenceRuntime:
    """The catalog's inference runtime settings."""
    embed = ctx.catalog.embed
    return InferenceRuntime(batch_size=embed.batch_size, device=embed.device, dask=ctx.catalog.dask)


def inference_field() -> Any:
    """A runtime settings field holding an :class:`InferenceRuntime`."""
    return runtime(InferenceRuntime(), "Batch size, device and Dask cluster of the forward passes.")


def embed_precision(ctx: PlanContext) -> str:
    """The precision the maps are computed in (``fp32``, ``bf16``): part of their key.

    ``embed.precision: auto`` is bf16 when ``embed.device`` is CUDA (or ``auto`` on a machine
    with a GPU), fp32 otherwise. The device itself stays out of the key.
    """
    from botaclip_core.features import plan_precision

    embed = ctx.catalog.embed
    return plan_precision(embed.device, embed.precision)


def weights_path(files: dict[str, Any]) -> str | None:
    """The DOFA checkpoint path from a stage's input fingerprints (None: random weights)."""
    fp = files.get("weights")
    return str(fp["path"]) if fp else None


class ChipSource(StrictModel):
    """Where chips around plots are read: the orthophotos (inputs), on the grid."""

    grid: GridSettings
    nodata: float | None
    resampling: str

    @classmethod
    def of(cls, ctx: PlanContext) -> ChipSource:
        """The region's grid and orthophoto reading settings."""
        ortho = ctx.region.orthophotos
        return cls(grid=GridSettings.of(ctx.grid), nodata=ortho.nodata, resampling=ortho.resampling)

    def reader(self, files: dict[str, Any], size: int) -> Any:
        """A :class:`~botaclip_core.chips.SourceChipReader` over the input orthophotos."""
        from botaclip_core.chips import SourceChipReader

        return SourceChipReader(
            [Path(fp["path"]) for fp in files["orthophotos"]],
            self.grid.to_grid(),
            size,
            nodata=self.nodata,
            resampling=self.resampling,
        )


class MapSettings(StrictModel):
    """How an embedding map is laid out and stored: cells per block, stride, dtype."""

    block_tiles: int
    stride: int
    dtype: str

    @classmethod
    def of(cls, ctx: PlanContext) -> MapSettings:
        """The catalog's embedding-map settings (stride default: the tile size)."""
        embed = ctx.catalog.embed
        return cls(
            block_tiles=embed.block_tiles,
            stride=embed.stride or ctx.catalog.tiling.tile_size,
            dtype=embed.dtype,
        )


def preview_path(store: str | Path) -> Path:
    """Where a map's preview goes: ``<store>.preview.png`` beside the store."""
    store = Path(store)
    return store.with_name(store.name.removesuffix(".zarr") + ".preview.png")
