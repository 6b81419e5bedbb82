"""Shared fixtures: an isolated Prefect home, the Prefect test harness, real-data paths."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# before anything imports Prefect: offline, and never the user's ~/.prefect
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="botaclip-prefect-home-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "botaclip_core")

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server and database for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def realdata() -> Path:
    """The shared real data folder, or skip when this checkout has none beside it."""
    if not REALDATA.is_dir():
        pytest.skip(f"real data not found at {REALDATA}")
    return REALDATA
