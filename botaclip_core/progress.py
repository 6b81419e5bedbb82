"""Progress of long loops (tiles, blocks), reported to whoever listens: a CLI bar, Prefect.

Core code never knows who listens. It opens a :func:`track` and advances it; listeners added
with :func:`listening` (the CLI's rich bar, a Prefect task's progress artifact) see every
tracker opened in their context. Listeners live in a context variable, so concurrently running
Prefect tasks (threads) each see only their own stage's trackers.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Iterator
from typing import Protocol

logger = logging.getLogger(__name__)


class Listener(Protocol):
    """Receives the trackers' events."""

    def started(self, tracker: Tracker) -> None:
        """A tracker was opened."""

    def advanced(self, tracker: Tracker) -> None:
        """A tracker moved on (``tracker.done`` of ``tracker.total``)."""

    def finished(self, tracker: Tracker) -> None:
        """A tracker was closed."""


_LISTENERS: contextvars.ContextVar[tuple[Listener, ...]] = contextvars.ContextVar(
    "botaclip_progress_listeners", default=()
)


class Tracker:
    """The progress of one loop: ``done`` of ``total`` units since ``started_at``."""

    def __init__(self, description: str, total: int, unit: str) -> None:
        self.description = description
        self.total = max(0, int(total))
        self.unit = unit
        self.done = 0
        self.started_at = time.monotonic()
        self._listeners = _LISTENERS.get()
        self._lock = threading.Lock()

    @property
    def rate(self) -> float:
        """Units per second so far."""
        elapsed = time.monotonic() - self.started_at
        return self.done / elapsed if elapsed > 0 else 0.0

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more units done (thread-safe)."""
        with self._lock:
            self.done = min(self.total, self.done + n) if self.total else self.done + n
        self._emit("advanced")

    def _emit(self, event: str) -> None:
        for listener in self._listeners:
            try:
                getattr(listener, event)(self)
            except Exception:  # a broken progress display must not fail the work
                logger.debug("progress listener %r failed on %s", listener, event, exc_info=True)


@contextlib.contextmanager
def track(description: str, *, total: int, unit: str) -> Iterator[Tracker]:
    """A tracker for the duration of a loop."""
    tracker = Tracker(description, total, unit)
    tracker._emit("started")
    try:
        yield tracker
    finally:
        tracker._emit("finished")


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[Listener]:
    """Add a listener for the trackers opened inside the block (in this context)."""
    token = _LISTENERS.set((*_LISTENERS.get(), listener))
    try:
        yield listener
    finally:
        _LISTENERS.reset(token)
