"""The stage registry: every stage in dependency order, i.e. the pipeline's DAG."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from botaclip_core.errors import CatalogError
from botaclip_core.stages import (
    downstream,
    embed,
    embed_dofa,
    features,
    finetune,
    rasterize,
    tile,
)
from botaclip_core.stages.base import Stage

_STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add a stage after the ones it needs.

    Raises:
        ValueError: if the name is taken or a needed stage is not registered yet.
    """
    if stage.name in _STAGES:
        raise ValueError(f"stage {stage.name!r} is already registered")
    missing = [n for n in stage.needs if n not in _STAGES]
    if missing:
        raise ValueError(
            f"stage {stage.name!r} needs {missing}, which are not registered; register them first"
        )
    _STAGES[stage.name] = stage
    return stage


def unregister(name: str) -> None:
    """Remove a stage that no other stage needs.

    Raises:
        ValueError: if another stage needs it.
    """
    users = [s.name for s in _STAGES.values() if name in s.needs]
    if users:
        raise ValueError(f"stage {name!r} is needed by {users}")
    _STAGES.pop(name, None)


@contextlib.contextmanager
def registered(stage: Stage) -> Iterator[Stage]:
    """A stage registered for the duration of a ``with`` block (tests, plugins)."""
    register(stage)
    try:
        yield stage
    finally:
        unregister(stage.name)


def get(name: str) -> Stage:
    """A stage by name.

    Raises:
        CatalogError: for an unknown name, listing the stages.
    """
    try:
        return _STAGES[name]
    except KeyError:
        raise CatalogError(
            f"--stages: unknown stage {name!r}; stages are {', '.join(_STAGES)}"
        ) from None


def stages() -> list[Stage]:
    """Every stage, each after the stages it needs."""
    return list(_STAGES.values())


def names() -> list[str]:
    """Every stage name, in dependency order."""
    return list(_STAGES)


def edges() -> list[tuple[str, str]]:
    """The DAG's edges ``(needed, needing)``."""
    return [(need, s.name) for s in _STAGES.values() for need in s.needs]


for _module in (tile, rasterize, features, finetune, embed_dofa, embed, downstream):
    register(_module.STAGE)
