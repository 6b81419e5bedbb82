"""Per-stage lock files in the artifact store, so two runs never build one output at once.

A lock is ``<store>/_locks/<stage>.<key>.lock``: JSON naming the holder's host, process id and
process start time, and a lease that a background thread renews while the holder lives. A run
that finds the lock held waits (and logs that it waits), then usually finds the output complete
and reuses it. A lock is taken over at once when its holder is gone from this host (process id
not running, or reused by a later process), and after its lease has expired when it was taken
on another host (a process there cannot be checked from here).

Deciding and writing happen under an exclusive ``flock`` of ``<store>/_locks/.guard``, held for
milliseconds, so two waiters never both take over one stale lock (the kernel drops a flock
when its process dies, so a killed run never leaves the guard held).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botaclip_core.errors import StageError

logger = logging.getLogger(__name__)

LOCKS_DIR = "_locks"
GUARD = ".guard"
# a holder renews its lease every LEASE_S / 4; another host's lock older than LEASE_S is stale
LEASE_S = 120.0
POLL_S = 0.25
WAIT_LOG_EVERY_S = 60.0


def _process_start(pid: int) -> str | None:
    """Start time of a process in clock ticks since boot (Linux), to tell reused pids apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its file says."""

    host: str
    pid: int
    started: str | None
    token: str
    acquired_at: float
    renewed_at: float
    lease_s: float

    @classmethod
    def read(cls, path: Path) -> Holder | None:
        """The holder recorded in ``path``; None if there is no lock or it cannot be read."""
        try:
            data = json.loads(path.read_text())
            return cls(
                str(data["host"]),
                int(data["pid"]),
                data.get("started"),
                str(data["token"]),
                float(data["acquired_at"]),
                float(data["renewed_at"]),
                float(data["lease_s"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def stale_reason(self, now: float) -> str | None:
        """Why this holder no longer holds the lock, or None while it does."""
        if self.host == socket.gethostname():
            if not _alive(self.pid):
                return f"process {self.pid} on this host is gone"
            started = _process_start(self.pid)
            if self.started and started and started != self.started:
                return f"process id {self.pid} now belongs to another process"
            return None
        if now - self.renewed_at > self.lease_s:
            return f"its lease from host {self.host} expired {now - self.renewed_at - self.lease_s:.0f} s ago"
        return None

    def describe(self) -> str:
        """``host H, pid P, since T``."""
        since = time.strftime("%H:%M:%S", time.localtime(self.acquired_at))
        return f"host {self.host}, pid {self.pid}, since {since}"


@contextlib.contextmanager
def _guarded(folder: Path) -> Iterator[None]:
    fd = os.open(folder / GUARD, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


class StageLock:
    """The lock of one stage output; use :meth:`hold` as a context manager.

    Args:
        root: the artifact store's root.
        stage: the stage.
        key: the output's store key.
        lease_s: how long another host waits after the last renewal before taking over.
        poll_s: how often a waiting run looks again.
    """

    def __init__(
        self,
        root: Path,
        stage: str,
        key: str,
        *,
        lease_s: float = LEASE_S,
        poll_s: float = POLL_S,
    ) -> None:
        self.folder = Path(root) / LOCKS_DIR
        self.path = self.folder / f"{stage}.{key}.lock"
        self.stage = stage
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.lost = False

    def _record(self, acquired_at: float) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _process_start(os.getpid()),
            "token": self.token,
            "stage": self.stage,
            "acquired_at": acquired_at,
            "renewed_at": time.time(),
            "lease_s": self.lease_s,
        }

    def _write(self, acquired_at: float) -> None:
        # every writer and every reader that decides holds the guard, so a plain write is
        # enough; a write cut by a crash leaves an unreadable lock, which the next run replaces
        data = json.dumps(self._record(acquired_at), indent=1).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def try_acquire(self) -> Holder | None:
        """Take the lock if it is free or stale; returns None if taken, else the live holder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with _guarded(self.folder):
            holder = Holder.read(self.path)
            if holder is not None:
                if holder.token == self.token:
                    return None
                why = holder.stale_reason(time.time())
                if why is None:
                    return holder
                logger.warning(
                    "%s: taking over the lock left by %s (%s)", self.stage, holder.describe(), why
                )
            elif self.path.exists():
                # unreadable: its writer died while writing it (under the guard, so it was not
                # holding the stage yet)
                logger.warning("%s: replacing the unreadable lock file %s", self.stage, self.path)
            self._write(time.time())
            return None

    def acquire(self, timeout_s: float | None = None) -> None:
        """Wait for the lock, logging who holds it, then start renewing its lease.

        Raises:
            StageError: if ``timeout_s`` passes first.
        """
        started = time.monotonic()
        last_log = -WAIT_LOG_EVERY_S
        while True:
            holder = self.try_acquire()
            if holder is None:
                break
            now = time.monotonic()
            if now - last_log >= WAIT_LOG_EVERY_S:
                logger.warning(
                    "%s: waiting for another run that is building this output (lock %s held by "
                    "%s); it is reused once that run finishes",
                    self.stage,
                    self.path,
                    holder.describe(),
                )
                last_log = now
            if timeout_s is not None and now - started > timeout_s:
                raise StageError(
                    f"{self.stage}: gave up after {timeout_s:.0f} s waiting for the lock {self.path} "
                    f"held by {holder.describe()}. If no such run exists, delete that file."
                )
            time.sleep(self.poll_s)
        waited = time.monotonic() - started
        if waited > self.poll_s:
            logger.info("%s: lock acquired after waiting %.1f s", self.stage, waited)
        self._stop.clear()
        self._renewer = threading.Thread(
            target=self._renew, name=f"botaclip-lock-{self.stage}", daemon=True
        )
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                with _guarded(self.folder):
                    holder = Holder.read(self.path)
                    if holder is None or holder.token != self.token:
                        self.lost = True
                        logger.error(
                            "%s: lost the lock %s (now %s); another run took it over",
                            self.stage,
                            self.path,
                            holder.describe() if holder else "removed",
                        )
                        return
                    self._write(holder.acquired_at)
            except OSError as exc:  # a full disk must not kill the run; the lease may lapse
                logger.warning("%s: cannot renew the lock %s (%s)", self.stage, self.path, exc)

    def release(self) -> None:
        """Stop renewing and remove the lock (if it is still ours)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        with contextlib.suppress(OSError), _guarded(self.folder):
            holder = Holder.read(self.path)
            if holder is not None and holder.token == self.token:
                self.path.unlink()

    @contextlib.contextmanager
    def hold(self, timeout_s: float | None = None) -> Iterator[StageLock]:
        """The lock for the duration of a ``with`` block."""
        self.acquire(timeout_s)
        try:
            yield self
        finally:
            self.release()
