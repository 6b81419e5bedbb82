"""Stage progress as a Prefect progress artifact, updated while the stage runs."""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext

from botaclip_core.progress import Tracker

MIN_STEP_PERCENT = 1.0
MIN_INTERVAL_S = 2.0


class PrefectProgress:
    """A progress listener that shows each tracker of a stage as a progress artifact.

    Updates are throttled (a percent or two seconds apart): the API is not a log.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._artifacts: dict[int, tuple[UUID, float, float]] = {}

    def _percent(self, tracker: Tracker) -> float:
        return 100.0 * tracker.done / tracker.total if tracker.total else 100.0

    def _describe(self, tracker: Tracker) -> str:
        return (
            f"{self.stage}: {tracker.description}, {tracker.done:,} of {tracker.total:,} "
            f"{tracker.unit} ({tracker.rate:.1f} {tracker.unit}/s)"
        )

    def started(self, tracker: Tracker) -> None:
        """Create the artifact at 0 % (inside a task run only: ``.fn`` calls have none)."""
        if TaskRunContext.get() is None:
            return
        artifact = create_progress_artifact(progress=0.0, description=self._describe(tracker))
        self._artifacts[id(tracker)] = (_uuid(artifact), 0.0, time.monotonic())

    def advanced(self, tracker: Tracker) -> None:
        """Update it when it moved a percent or two seconds passed."""
        if id(tracker) not in self._artifacts:
            return
        artifact, shown, at = self._artifacts[id(tracker)]
        percent, now = self._percent(tracker), time.monotonic()
        if percent - shown < MIN_STEP_PERCENT and now - at < MIN_INTERVAL_S:
            return
        update_progress_artifact(artifact, progress=percent, description=self._describe(tracker))
        self._artifacts[id(tracker)] = (artifact, percent, now)

    def finished(self, tracker: Tracker) -> None:
        """Show where it ended (100 % unless it stopped early)."""
        entry = self._artifacts.pop(id(tracker), None)
        if entry is not None:
            update_progress_artifact(
                entry[0], progress=self._percent(tracker), description=self._describe(tracker)
            )


def _uuid(artifact: Any) -> UUID:
    return artifact if isinstance(artifact, UUID) else UUID(str(artifact))
