"""A rich progress bar for the CLI: every tracker of a run (tiles tiled, tiles embedded)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from botaclip_core import progress
from botaclip_core.progress import Tracker


class RateColumn(ProgressColumn):
    """Units per second (``tiles/s``)."""

    def render(self, task: Task) -> Text:
        """The rate, once known."""
        unit = task.fields.get("unit", "")
        return Text(
            f"{task.speed:,.1f} {unit}/s" if task.speed else "", style="progress.data.speed"
        )


class RichListener:
    """Shows each tracker as a row of a rich progress display."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self._rows: dict[int, int] = {}

    def started(self, tracker: Tracker) -> None:
        """Add a row."""
        self._rows[id(tracker)] = self.bar.add_task(
            tracker.description, total=tracker.total or None, unit=tracker.unit
        )

    def advanced(self, tracker: Tracker) -> None:
        """Move the row on."""
        if id(tracker) in self._rows:
            self.bar.update(self._rows[id(tracker)], completed=tracker.done)

    def finished(self, tracker: Tracker) -> None:
        """Complete the row."""
        row = self._rows.pop(id(tracker), None)
        if row is not None:
            self.bar.update(row, completed=tracker.done, total=tracker.total or tracker.done)


@contextlib.contextmanager
def progress_bar(console: Console) -> Iterator[Progress]:
    """Rows for the trackers opened inside the block: done of total, rate, time left."""
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        RateColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    with bar, progress.listening(RichListener(bar)):
        yield bar
