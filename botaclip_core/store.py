"""The artifact store: content-addressed stage folders, completion manifests, fingerprints."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botaclip_core import __version__
from botaclip_core.errors import InputDataError, StageError, StorageError

logger = logging.getLogger(__name__)

SUCCESS = "_SUCCESS.json"
KEY_LENGTH = 16
# beyond this size a file's content hash samples head, middle and tail instead of every byte
FULL_HASH_LIMIT = 256 * 2**20
SAMPLE_BYTES = 8 * 2**20


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal settings hash equally."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint_file(
    path: str | Path, known: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Identity of an input file: path, size, mtime and a content hash.

    Files larger than 256 MiB are hashed on three 8 MiB samples plus their size. ``known`` maps
    resolved paths to earlier fingerprints: one whose size and mtime still match is reused, so
    a rerun over a département's orthophotos does not read them all again.

    Raises:
        InputDataError: if the file does not exist.
    """
    p = Path(path)
    try:
        stat = p.stat()
    except FileNotFoundError:
        raise InputDataError(f"{p}: no such file. Check the path in the catalog.") from None
    earlier = (known or {}).get(str(p.resolve()))
    if earlier and earlier["size"] == stat.st_size and earlier["mtime_ns"] == stat.st_mtime_ns:
        return earlier
    digest = hashlib.blake2b(digest_size=16)
    with open(p, "rb") as fh:
        if stat.st_size <= FULL_HASH_LIMIT:
            for block in iter(lambda: fh.read(2**22), b""):
                digest.update(block)
        else:
            for offset in (0, stat.st_size // 2, stat.st_size - SAMPLE_BYTES):
                fh.seek(offset)
                digest.update(fh.read(SAMPLE_BYTES))
    return {
        "path": str(p.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "blake2b": digest.hexdigest(),
    }


def stage_key(
    stage: str, version: str, settings: Mapping[str, Any], inputs: Mapping[str, Any]
) -> str:
    """Hash of a stage's name, version, output-changing settings and input fingerprints."""
    payload = canonical_json(
        {"stage": stage, "version": version, "settings": settings, "inputs": inputs}
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]


def temporary_path(path: Path) -> Path:
    """A hidden sibling of ``path`` for writing it atomically, unique per process and thread."""
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; the rename is still atomic
        pass
    finally:
        os.close(fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """Flush the finished file ``tmp`` to disk, rename it over ``path``, flush the folder.

    After a crash, ``path`` holds the old content or the whole new one, never a part.
    """
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one."""
    atomic_write_bytes(path, text.encode())


def atomic_save_npy(path: Path, array: Any) -> None:
    """``np.save`` to ``path`` atomically (temporary file, fsync, rename, fsync of the folder)."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, value: Any) -> None:
    """:func:`atomic_write_text` of indented JSON."""
    atomic_write_text(path, json.dumps(value, indent=2, default=str) + "\n")


_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def storage_error(
    exc: OSError, *, what: str, workdir: Path, target: Path | None = None
) -> BaseException:
    """A clear error for a failed write (full disk, no permission), or ``exc`` itself.

    Args:
        exc: the error a write raised.
        what: what was writing (a stage's name, "the report").
        workdir: the artifact store's root (what to free space on or make writable).
        target: what was being written, when the error does not name the file.

    Nothing of a stage is marked complete; what it finished (blocks, groups, epochs) is kept.
    """
    where = exc.filename or target or workdir
    if exc.errno in _DISK_FULL:
        return StorageError(
            f"{what}: the disk is full (or a size or quota limit was reached) while writing "
            f"{where} ({exc.strerror}). Free space on the disk holding {workdir}, then rerun the "
            "same command: finished stages and finished parts of this one are kept, and the run "
            "resumes where it stopped."
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(
            f"{what}: cannot write {where} ({exc.strerror}). Make the workdir {workdir} "
            "writable, or set 'workdir' in the catalog to another folder."
        )
    return exc


@dataclass
class StageResult:
    """What a stage produced: where, under which key, and whether it ran or was cached."""

    stage: str
    key: str
    status: str  # "completed" | "cached"
    seconds: float
    path: Path
    outputs: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """Small JSON-ready record (what Prefect tasks return)."""
        return {
            "stage": self.stage,
            "key": self.key,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "path": str(self.path),
            "outputs": self.outputs,
        }


class ArtifactStore:
    """``<root>/<stage>/<key>/`` folders; a stage is complete once its ``_SUCCESS.json`` exists."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    @property
    def fingerprint_cache(self) -> Path:
        """JSON file of known input fingerprints (see :func:`fingerprint_file`)."""
        return self.root / "_cache" / "fingerprints.json"

    def load_fingerprints(self) -> dict[str, dict[str, Any]]:
        """Fingerprints recorded by earlier runs (empty if none or unreadable)."""
        try:
            return dict(json.loads(self.fingerprint_cache.read_text()))
        except (FileNotFoundError, ValueError):
            return {}

    def save_fingerprints(self, fingerprints: dict[str, dict[str, Any]]) -> None:
        """Record fingerprints for later runs (atomically; the last writer wins).

        A cache: when it cannot be written (a full disk), the next run hashes the files again.
        """
        try:
            atomic_write_json(self.fingerprint_cache, fingerprints)
        except OSError as exc:
            logger.warning(
                "cannot write %s (%s); files are hashed again next run", self.fingerprint_cache, exc
            )

    def stage_dir(self, stage: str, key: str) -> Path:
        """Folder of one stage output."""
        return self.root / stage / key

    def is_complete(self, stage: str, key: str) -> bool:
        """Whether the stage output exists and was finished."""
        return (self.stage_dir(stage, key) / SUCCESS).is_file()

    def manifest(self, stage: str, key: str) -> dict[str, Any]:
        """The completion manifest of a finished stage.

        Raises:
            StageError: if the stage has not completed.
        """
        path = self.stage_dir(stage, key) / SUCCESS
        if not path.is_file():
            raise StageError(
                f"stage {stage!r} output {key} is not complete ({path} missing); run that stage first"
            )
        return json.loads(path.read_text())

    def run(
        self,
        stage: str,
        version: str,
        settings: Mapping[str, Any],
        inputs: Mapping[str, Any],
        build: Callable[[Path], dict[str, Any]],
        *,
        key: str | None = None,
    ) -> StageResult:
        """Run ``build(out_dir)`` unless the keyed output is already complete.

        ``build`` writes into ``out_dir`` (which survives a crash, so long stages resume inside
        it) and returns the outputs to record; the manifest is written last, atomically. The
        build runs under the output's :class:`~botaclip_core.locks.StageLock`: a second run
        that needs the same output waits for the first, then reuses what it wrote.

        Raises:
            StorageError: if the disk is full or the store cannot be written (nothing is marked
                complete; a rerun resumes).
        """
        key = key or stage_key(stage, version, settings, inputs)
        out_dir = self.stage_dir(stage, key)
        if self.is_complete(stage, key):
            return self._cached(stage, key)
        from botaclip_core.locks import StageLock

        try:
            with StageLock(self.root, stage, key).hold():
                # another run may have finished it while this one waited for the lock
                if self.is_complete(stage, key):
                    return self._cached(stage, key)
                out_dir.mkdir(parents=True, exist_ok=True)
                logger.info("%s: running into %s", stage, out_dir)
                start = time.perf_counter()
                outputs = build(out_dir)
                seconds = time.perf_counter() - start
                atomic_write_json(
                    out_dir / SUCCESS,
                    {
                        "stage": stage,
                        "stage_version": version,
                        "key": key,
                        "code_version": __version__,
                        "settings": dict(settings),
                        "inputs": dict(inputs),
                        "outputs": outputs,
                        "seconds": round(seconds, 3),
                        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    },
                )
        except OSError as exc:
            clear = storage_error(exc, what=stage, workdir=self.root, target=out_dir)
            if clear is exc:
                raise
            raise clear from exc
        return StageResult(stage, key, "completed", seconds, out_dir, outputs)

    def _cached(self, stage: str, key: str) -> StageResult:
        out_dir = self.stage_dir(stage, key)
        manifest = self.manifest(stage, key)
        logger.info("%s: cached (%s)", stage, out_dir)
        return StageResult(stage, key, "cached", 0.0, out_dir, manifest["outputs"])

    def check_writable(self) -> None:
        """Check that the store's root is a folder this process can write, creating it if needed.

        Raises:
            StorageError: if the root is a file, cannot be created or is not writable.
        """
        if self.root.exists() and not self.root.is_dir():
            raise StorageError(
                f"workdir {self.root} is a file, not a folder. Set 'workdir' in the catalog to a "
                "folder (it is created if missing)."
            )
        probe = self.root / f".write-test-{os.getpid()}-{threading.get_ident()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StorageError(
                f"workdir {self.root} is not writable ({exc.strerror or exc}). Set 'workdir' in the "
                "catalog to a folder you can write, or fix its permissions."
            ) from None

    def discard(self, stage: str, key: str) -> None:
        """Remove a stage output (complete or partial)."""
        shutil.rmtree(self.stage_dir(stage, key), ignore_errors=True)
