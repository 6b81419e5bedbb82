"""Stage ``rasterize``: relevés and downstream site datasets placed on the region grid."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import RootModel

from botaclip_core.catalog import DatasetSpec
from botaclip_core.stages.base import Stage, StageInputs, StageOutput, StageSettings
from botaclip_core.stages.common import GridSettings
from botaclip_core.stages.context import PlanContext

if TYPE_CHECKING:
    from botaclip_core.releves import SiteTable


class RasterizeSettings(StageSettings):
    """The grid and the datasets to place on it (how to read each one is part of its input)."""

    grid: GridSettings
    datasets: list[str]


class SiteFiles(StageOutput):
    """One dataset's sites on the grid: a site table, a site × species matrix, a vocabulary."""

    kind: str
    n_sites: int
    n_species: int
    sites: str
    values: str
    species: str
    file: dict[str, Any] | None = None  # the source file's fingerprint (None in older stores)

    def load(self, name: str) -> SiteTable:
        """The site table."""
        from botaclip_core.releves import SiteTable

        return SiteTable.load(Path(self.sites).parent, name)


class RasterizeOutput(RootModel[dict[str, SiteFiles]]):
    """Dataset name → its sites on the grid."""

    def sites(self, name: str) -> SiteFiles:
        """The files of one dataset."""
        return self.root[name]


def settings(ctx: PlanContext) -> RasterizeSettings:
    """The grid and the region's site datasets (relevés first, then the targets)."""
    return RasterizeSettings(
        grid=GridSettings.of(ctx.grid), datasets=ctx.catalog.site_datasets(ctx.region_name)
    )


def inputs(ctx: PlanContext) -> dict[str, Any]:
    """Each dataset's spec and file fingerprint."""
    return {name: ctx.dataset_input(name) for name in ctx.catalog.site_datasets(ctx.region_name)}


def build(settings: RasterizeSettings, inputs: StageInputs, out_dir: Path) -> RasterizeOutput:
    """Read every dataset, place its sites on the grid and save them."""
    from botaclip_core.releves import sites_on_grid

    grid = settings.grid.to_grid()
    outputs: dict[str, SiteFiles] = {}
    for name in settings.datasets:
        spec = DatasetSpec.model_validate(inputs.files[name]["spec"])
        path = Path(inputs.files[name]["file"]["path"])
        table = sites_on_grid(spec, path, grid, name=name)
        outputs[name] = SiteFiles(
            kind=spec.kind,
            n_sites=len(table.sites),
            n_species=len(table.species),
            file=inputs.files[name]["file"],
            **table.save(out_dir, name),
        )
    return RasterizeOutput(outputs)


STAGE = Stage(
    name="rasterize",
    version="1",
    needs=(),
    settings_type=RasterizeSettings,
    settings=settings,
    build=build,
    output=RasterizeOutput,
    inputs=inputs,
    description="relevés and site datasets → sites on the grid, plot × species matrices",
)
