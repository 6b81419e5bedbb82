"""Per-block completion records kept next to an image store, so that a killed run resumes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import threading
from pathlib import Path
from typing import Any

import numpy as np

RECORDS_SUFFIX = ".blocks"
_SETTINGS_STAMP = "_settings.json"


def records_dir(zarr_path: Path) -> Path:
    """Directory of the per-block completion logs of a store: ``<out>/../<out name>.blocks``.

    Args:
        zarr_path: the image Zarr store.

    Returns:
        The records directory, next to the store.

    """
    zarr_path = Path(zarr_path)
    return zarr_path.parent / (zarr_path.name + RECORDS_SUFFIX)


def _settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _has_settings_stamp(records: Path) -> bool:
    return (records / _SETTINGS_STAMP).exists()


def _recorded_hash(records: Path) -> str | None:
    """Settings hash of the run that created the records; None if the stamp is unreadable."""
    try:
        stamp = json.loads((records / _SETTINGS_STAMP).read_text())
    except json.JSONDecodeError:
        return None
    return stamp.get("hash")


def _write_settings_stamp(records: Path, digest: str, settings: dict[str, Any]) -> None:
    """Create the records directory with its settings stamp, atomically replaced."""
    records.mkdir(parents=True)
    tmp = records / (_SETTINGS_STAMP + ".tmp")
    tmp.write_text(json.dumps({"hash": digest, "settings": settings}, sort_keys=True))
    os.replace(tmp, records / _SETTINGS_STAMP)


def _read_records(records: Path, settings: dict[str, Any]) -> np.ndarray:
    """Ids of the blocks recorded as done (written or empty), sorted and unique."""
    n_bcols = math.ceil(settings["grid"]["width"] / settings["tile_size"])
    ids: list[int] = []
    for log in records.glob("*.log"):
        text = log.read_text()
        # a line cut by a kill has no newline: that block is not done
        for line in text.split("\n")[:-1]:
            parts = line.split()
            if len(parts) == 3 and parts[2] in ("w", "e"):
                ids.append(int(parts[0]) * n_bcols + int(parts[1]))
    return np.unique(np.asarray(ids, dtype=np.int64))


def _open_log(records: str) -> int:
    """Open the calling thread's completion log for appending; returns its file descriptor."""
    # one log per host, process and thread: appends never interleave
    log_name = f"{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}.log"
    return os.open(os.path.join(records, log_name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
