"""Per-stage locks: concurrent runs share one store, dead holders are taken over, leases renew."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from kill_harness import REPO, assert_same_outputs, cli, reference_run, start, tail

from botaclip_core.demo import write_demo_region
from botaclip_core.errors import StageError
from botaclip_core.locks import Holder, StageLock
from botaclip_core.store import ArtifactStore

STAGES = ["tile", "rasterize", "features", "finetune", "embed-dofa", "embed"]


def test_two_concurrent_runs_build_each_stage_once_and_equal_a_single_run(tmp_path):
    reference = tmp_path / "single"
    catalog = write_demo_region(reference, size="tiny")
    reference_run(catalog, "--stages", "embed")

    shared = tmp_path / "shared"
    catalog = write_demo_region(shared, size="tiny")
    runs = []
    for i in (1, 2):
        log = tmp_path / f"run{i}.log"
        cmd = cli(catalog, "--stages", "embed", "--report", str(tmp_path / f"report{i}.json"))
        runs.append((start(cmd, log), log))
    for proc, log in runs:
        assert proc.wait(timeout=600) == 0, tail(log)
    reports = [json.loads((tmp_path / f"report{i}.json").read_text()) for i in (1, 2)]
    for stage in STAGES:
        statuses = sorted(r["stages"][stage]["status"] for r in reports)
        assert statuses == ["cached", "completed"], (stage, statuses)  # built once, reused once
    logs = "".join(log.read_text() for _, log in runs)
    assert "waiting for another run that is building this output" in logs
    assert not list((shared / "_locks").glob("*.lock")), "both runs released their locks"
    assert assert_same_outputs(shared, reference) == sorted(STAGES)


def test_concurrent_builds_in_one_process_run_once(tmp_path, caplog):
    """Two Prefect-like threads asking for one output: one builds, the other waits and reuses."""
    store, calls = ArtifactStore(tmp_path), []

    def build(out_dir):
        calls.append(threading.get_ident())
        time.sleep(0.6)
        (out_dir / "x.txt").write_text("x")
        return {"x": str(out_dir / "x.txt")}

    results = []

    def run():
        results.append(store.run("toy", "1", {"a": 1}, {}, build))

    caplog.set_level(logging.INFO, logger="botaclip_core")
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(r.status for r in results) == ["cached", "completed"]
    assert "waiting for another run" in caplog.text


_HOLD = """
import sys, time
from pathlib import Path
from botaclip_core.locks import StageLock
StageLock(Path(sys.argv[1]), "features", "k" * 16).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_lock_of_a_killed_process_is_taken_over_at_once(tmp_path, caplog):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"
        lock = StageLock(tmp_path, "features", "k" * 16)
        holder = lock.try_acquire()
        assert holder is not None and holder.pid == proc.pid  # a live holder keeps its lock
        assert holder.host == socket.gethostname()
        with pytest.raises(StageError, match=f"pid {proc.pid}"):
            lock.acquire(timeout_s=0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    caplog.set_level(logging.WARNING, logger="botaclip_core")
    started = time.monotonic()
    with lock.hold():
        assert Holder.read(lock.path).pid == os.getpid()
    assert time.monotonic() - started < 1.0
    assert (
        f"taking over the lock left by host {socket.gethostname()}, pid {proc.pid}" in caplog.text
    )
    assert "is gone" in caplog.text
    assert not lock.path.exists()


def _foreign_lock(lock: StageLock, renewed_at: float, lease_s: float) -> None:
    lock.folder.mkdir(parents=True, exist_ok=True)
    lock.path.write_text(
        json.dumps(
            {
                "host": "another-host",
                "pid": os.getpid(),  # alive here, but on another host it says nothing
                "started": None,
                "token": "theirs",
                "acquired_at": renewed_at,
                "renewed_at": renewed_at,
                "lease_s": lease_s,
            }
        )
    )


def test_another_hosts_lock_is_taken_over_after_its_lease(tmp_path, caplog):
    lock = StageLock(tmp_path, "tile", "a" * 16, poll_s=0.05)
    _foreign_lock(lock, time.time(), lease_s=1.0)
    caplog.set_level(logging.INFO, logger="botaclip_core")
    started = time.monotonic()
    with lock.hold(timeout_s=10):
        waited = time.monotonic() - started
    assert 0.8 < waited < 5, waited
    assert "waiting for another run" in caplog.text and "host another-host" in caplog.text
    assert "its lease from host another-host expired" in caplog.text

    _foreign_lock(lock, time.time() - 3600, lease_s=60)  # expired an hour ago: at once
    started = time.monotonic()
    with lock.hold(timeout_s=10):
        assert time.monotonic() - started < 0.5


def test_lease_is_renewed_while_held_and_released_after(tmp_path):
    lock = StageLock(tmp_path, "embed", "b" * 16, lease_s=0.4)
    with lock.hold():
        first = Holder.read(lock.path)
        time.sleep(0.5)
        later = Holder.read(lock.path)
        assert first is not None and later is not None
        assert later.renewed_at > first.renewed_at and later.acquired_at == first.acquired_at
        assert later.stale_reason(time.time()) is None
    assert not lock.path.exists()
