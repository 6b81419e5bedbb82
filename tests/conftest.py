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

# shared/ beside the checkout (as in CI); BOTACLIP_REALDATA points elsewhere
REALDATA = Path(
    os.environ.get("BOTACLIP_REALDATA")
    or Path(__file__).resolve().parents[2] / "shared" / "realdata"
)


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server and database for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def realdata() -> Path:
    """The shared real data folder.

    Without it a developer's run skips the real-data tests; a CI run (``CI`` set, as GitHub
    Actions and GitLab do) fails them, so that a CI job missing the data cannot pass silently.
    """
    if not REALDATA.is_dir():
        msg = (
            f"real data not found at {REALDATA}: check out shared/ beside the repository "
            "or set BOTACLIP_REALDATA"
        )
        if _in_ci():
            pytest.fail(f"{msg} (CI is set, so this is an error, not a skip)", pytrace=False)
        pytest.skip(msg)
    return REALDATA
