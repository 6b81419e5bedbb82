"""What a stage declares: name, version, needs, when it applies, settings, build and report."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from botaclip_core.catalog import StrictModel
from botaclip_core.errors import StageError

if TYPE_CHECKING:
    from botaclip_core.stages.context import PlanContext

Record = TypeVar("Record", bound=BaseModel)


def runtime(default: Any, description: str) -> Any:
    """A settings field that says how to compute, not what: it is left out of the stage key.

    Examples are Dask addresses, worker counts and batch sizes; results must not depend on them.
    """
    return Field(default, description=description, json_schema_extra={"runtime": True})


def storage(default: Any, description: str) -> Any:
    """A settings field that changes how an output is stored, not what it holds.

    It is in the stage's own key (the files differ) but not in the content key that downstream
    stages hash, so changing it reruns this stage only.
    """
    return Field(default, description=description, json_schema_extra={"storage": True})


class StageSettings(StrictModel):
    """Base of every stage's settings: everything its build reads besides files and upstream."""

    def key_dict(self, *, content: bool = False) -> dict[str, Any]:
        """The settings that the key hashes: runtime fields left out, at any depth.

        Args:
            content: also leave out storage-only fields (the content key downstream stages see).
        """
        data = self.model_dump(mode="json")
        _strip_marked(self, data, ("runtime", "storage") if content else ("runtime",))
        return data


def _strip_marked(model: BaseModel, data: dict[str, Any], markers: tuple[str, ...]) -> None:
    for name, info in type(model).model_fields.items():
        if name not in data:
            continue
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if any(extra.get(m) for m in markers):
            del data[name]
            continue
        value = getattr(model, name)
        if isinstance(value, BaseModel) and isinstance(data[name], dict):
            _strip_marked(value, data[name], markers)


class StageOutput(BaseModel):
    """Base of a stage's output record, stored in its ``_SUCCESS.json`` under ``outputs``.

    Any pydantic model will do (``RootModel`` for a mapping); this base forbids unknown keys.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class StageInputs:
    """What a build receives besides its settings: input fingerprints and upstream outputs.

    Attributes:
        files: the input fingerprints the stage declared (paths with size, mtime and hash).
        upstream: output records of the stages it needs (those that apply to the region).
        keys: store keys of those upstream outputs (for model cards and provenance).
    """

    files: dict[str, Any] = field(default_factory=dict)
    upstream: dict[str, BaseModel] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)

    def output(self, stage: str, kind: type[Record]) -> Record:
        """The output record of an upstream stage, checked to be of the expected type.

        Raises:
            StageError: if that stage is not upstream of this one.
        """
        record = self.upstream.get(stage)
        if record is None:
            raise StageError(
                f"stage output {stage!r} is not an input here (inputs: {sorted(self.upstream)})"
            )
        if not isinstance(record, kind):
            raise StageError(f"stage {stage!r} gave {type(record).__name__}, not {kind.__name__}")
        return record

    def optional(self, stage: str, kind: type[Record]) -> Record | None:
        """Like :meth:`output`, or None when that stage does not apply to the region."""
        return self.output(stage, kind) if stage in self.upstream else None


@dataclass(frozen=True)
class TableArtifact:
    """A table to publish beside a run (a Prefect table artifact in the UI)."""

    key: str
    rows: list[dict[str, Any]]
    description: str


def _always(ctx: PlanContext) -> str | None:
    return None


def _no_inputs(ctx: PlanContext) -> dict[str, Any]:
    return {}


def _no_report(output: Any) -> dict[str, Any]:
    return {}


def _no_artifacts(region: str, output: Any, status: str) -> list[TableArtifact]:
    return []


@dataclass(frozen=True)
class Stage:
    """One pipeline stage, as its module declares it.

    Attributes:
        name: the stage's name (store folder, ``--stages`` value, Prefect task-run name).
        version: bump it when the output's format or algorithm changes.
        needs: stages whose outputs the build reads; those that do not apply are skipped.
        settings_type: the stage's settings model.
        settings: ``(ctx) -> Settings``: the stage's settings, from the catalog and region.
        build: ``(settings, inputs, out_dir) -> Output``: writes into ``out_dir``.
        output: the output record type (what ``build`` returns).
        applies: ``(ctx) -> None`` if the stage applies to the region, else the reason why not.
        inputs: ``(ctx) -> fingerprints`` of the files the build reads.
        report: ``(output) -> fragment`` merged into the run report.
        artifacts: ``(region, output, status) -> tables`` published beside the run.
        description: one line for the CLI help and the architecture page.
    """

    name: str
    version: str
    needs: tuple[str, ...]
    settings_type: type[StageSettings]
    settings: Callable[[PlanContext], StageSettings]
    build: Callable[[Any, StageInputs, Path], BaseModel]
    output: type[BaseModel]
    applies: Callable[[PlanContext], str | None] = _always
    inputs: Callable[[PlanContext], dict[str, Any]] = _no_inputs
    report: Callable[[Any], dict[str, Any]] = _no_report
    artifacts: Callable[[str, Any, str], list[TableArtifact]] = _no_artifacts
    description: str = ""

    def load_settings(self, data: Mapping[str, Any]) -> StageSettings:
        """Settings from their planned JSON form (what a Prefect task receives)."""
        return self.settings_type.model_validate(dict(data))

    def load_output(self, data: Any) -> BaseModel:
        """An output record from its manifest form."""
        return self.output.model_validate(data)
