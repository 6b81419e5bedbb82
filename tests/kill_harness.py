"""Kill a real ``botaclip run`` with SIGKILL inside a chosen stage, rerun it, compare outputs.

A run is a subprocess of the CLI. A stage is running while its lock file
(``<workdir>/_locks/<stage>.<key>.lock``) exists and its ``_SUCCESS.json`` does not, so the
harness waits for that, sleeps a seeded random part of the stage's expected duration, and
kills the whole process group (the run and anything it started). Outputs are compared stage by
stage with :func:`assert_same_outputs`: every file of every stage folder, arrays and checkpoint
tensors exactly, JSON with the workdir and the store keys made neutral.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
POLL_S = 0.005


def cli(catalog: Path, *args: str, prefect: bool = False) -> list[str]:
    """The command line of ``botaclip run CATALOG --region demo ARGS``."""
    return [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        str(catalog),
        "--region",
        "demo",
        *([] if prefect else ["--no-prefect"]),
        *args,
    ]


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own process group, its output appended to ``log``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    with open(log, "ab") as sink:
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of ``proc`` and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def running_stages(workdir: Path) -> set[str]:
    """Stages whose lock is held and whose output is not complete."""
    found = set()
    for lock in (workdir / "_locks").glob("*.lock"):
        stage, key = lock.name.removesuffix(".lock").rsplit(".", 1)
        if not (workdir / stage / key / "_SUCCESS.json").is_file():
            found.add(stage)
    return found


def complete(workdir: Path, stage: str) -> bool:
    """Whether some output of ``stage`` is complete in ``workdir``."""
    return any((workdir / stage).glob("*/_SUCCESS.json"))


@dataclass
class Kill:
    """Where a kill was aimed and where it landed."""

    target: str
    delay_s: float
    landed: set[str] = field(default_factory=set)
    exited: int | None = None  # the run finished before it could be killed


def kill_inside(
    cmd: list[str],
    workdir: Path,
    stage: str,
    delay_s: float,
    log: Path,
    *,
    ready: Callable[[], bool] | None = None,
    timeout_s: float = 300.0,
) -> Kill:
    """Run ``cmd`` and SIGKILL it ``delay_s`` after ``stage`` started running (and ``ready()``).

    Returns:
        The stages that were running at the moment of the kill (``landed``), or the run's exit
        code if it ended first.
    """
    proc = start(cmd, log)
    deadline = time.monotonic() + timeout_s
    try:
        while stage not in running_stages(workdir) or (ready is not None and not ready()):
            if proc.poll() is not None:
                return Kill(stage, delay_s, exited=proc.returncode)
            if time.monotonic() > deadline:
                raise AssertionError(f"{stage} did not start within {timeout_s} s:\n{tail(log)}")
            time.sleep(POLL_S)
        time.sleep(delay_s)
        landed = running_stages(workdir)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        kill(proc)
    if proc.returncode != -signal.SIGKILL:
        return Kill(stage, delay_s, exited=proc.returncode)
    return Kill(stage, delay_s, landed=landed)


def run_to_end(cmd: list[str], log: Path, timeout_s: float = 600.0) -> None:
    """Run ``cmd`` to its end; fail with the log's tail unless it exits 0."""
    proc = start(cmd, log)
    try:
        proc.wait(timeout=timeout_s)
    finally:
        kill(proc)
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}:\n{tail(log)}")


def reference_run(catalog: Path, *args: str) -> None:
    """An uninterrupted ``botaclip run`` of ``catalog``: the reference a killed run must equal.

    It runs in a fresh process, as the runs under test do, and never in the test's own: a
    process's state (BLAS and torch thread counts left by earlier tests) changes float results
    in the last bits, and the comparison is exact.
    """
    run_to_end(cli(catalog, *args), catalog.parent / "reference.log")


def tail(log: Path, n: int = 60) -> str:
    """The last ``n`` lines of a log."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


# comparing outputs ---------------------------------------------------------------------------


def _stage_dirs(workdir: Path) -> dict[str, Path]:
    """The complete output folder of each stage (one per stage in a single-run workdir)."""
    out: dict[str, Path] = {}
    for success in sorted(workdir.glob("*/*/_SUCCESS.json")):
        stage = success.parent.parent.name
        if stage in out:
            raise AssertionError(f"two complete outputs of {stage} in {workdir}")
        out[stage] = success.parent
    return out


def _neutral(data: bytes, workdir: Path, dirs: dict[str, Path]) -> bytes:
    data = data.replace(str(workdir.resolve()).encode(), b"<workdir>")
    for stage, folder in dirs.items():
        data = data.replace(folder.name.encode(), f"<key:{stage}>".encode())
    return data


# when a run happened, not what it made: timings and the inputs' modification times
_TIMING_KEYS = frozenset({"seconds", "finished_at", "mtime_ns"})


def _without_timing(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in _TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def _skipped(rel: str) -> bool:
    # the tile stage's resume records (per-process logs, a stamp of the inputs' mtimes)
    return ".blocks/" in rel


def _same_value(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), where
        for k in a:
            _same_value(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same_value(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def stage_files(workdir: Path) -> dict[str, dict[str, Path]]:
    """Stage → relative path → file, over every complete stage output of ``workdir``."""
    return {
        stage: {
            f.relative_to(folder).as_posix(): f
            for f in sorted(folder.rglob("*"))
            if f.is_file() and not _skipped(f.relative_to(folder).as_posix())
        }
        for stage, folder in _stage_dirs(workdir).items()
    }


def assert_same_outputs(got: Path, want: Path, stages: list[str] | None = None) -> list[str]:
    """Assert that two workdirs hold equal outputs, stage by stage; return the stages compared.

    Arrays (``.npy``) and checkpoint tensors (``.pt``) must be equal exactly; JSON files
    (metrics, model cards, Zarr metadata) equal once timings and input mtimes are left out
    (manifests: their recorded outputs); every other file (Zarr chunks, Parquet, PNG) equal
    bytes. Paths and store keys are made neutral first.
    """
    got_files, want_files = stage_files(got), stage_files(want)
    got_dirs, want_dirs = _stage_dirs(got), _stage_dirs(want)
    names = stages or sorted(want_files)
    for stage in names:
        assert stage in got_files, f"{stage}: no complete output in {got}"
        assert sorted(got_files[stage]) == sorted(want_files[stage]), stage
        for rel, path in got_files[stage].items():
            other, where = want_files[stage][rel], f"{stage}/{rel}"
            if rel.endswith(".npy"):
                a, b = np.load(path), np.load(other)
                assert a.dtype == b.dtype and a.shape == b.shape, where
                np.testing.assert_array_equal(a, b, err_msg=where)
            elif rel.endswith(".pt"):
                _same_value(
                    torch.load(path, map_location="cpu", weights_only=True),
                    torch.load(other, map_location="cpu", weights_only=True),
                    where,
                )
            elif rel.endswith(".json"):
                a = _without_timing(json.loads(_neutral(path.read_bytes(), got, got_dirs)))
                b = _without_timing(json.loads(_neutral(other.read_bytes(), want, want_dirs)))
                if rel == "_SUCCESS.json":
                    a, b = a["outputs"], b["outputs"]
                assert a == b, where
            else:
                a_bytes = _neutral(path.read_bytes(), got, got_dirs)
                b_bytes = _neutral(other.read_bytes(), want, want_dirs)
                assert a_bytes == b_bytes, f"{where} differs"
    return names
