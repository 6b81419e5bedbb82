"""A Prefect server with its UI for botaclip: loopback, telemetry off, SQLite or Postgres."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_PORT = 4200
DATABASE_URL = "PREFECT_API_DATABASE_CONNECTION_URL"
# what the server and the UI would otherwise report or show
QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
}


@dataclass(frozen=True)
class ServerSpec:
    """How to start the server and where it will answer."""

    command: list[str]
    env: dict[str, str]
    ui_url: str
    api_url: str
    database: str


def mask_password(url: str) -> str:
    """A database URL with its password replaced by ``***`` (it goes to the console)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def server_spec(
    *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, environ: Mapping[str, str] | None = None
) -> ServerSpec:
    """The ``prefect server start`` command, its environment and the addresses it serves.

    The database is Prefect's SQLite file under ``PREFECT_HOME`` unless
    ``PREFECT_API_DATABASE_CONNECTION_URL`` names another (e.g.
    ``postgresql+asyncpg://user:password@host:5432/prefect``).

    Args:
        host: the interface to listen on; loopback by default (the UI has no login).
        port: the port of the API and the UI.
        environ: the environment to start from (default ``os.environ``).
    """
    env = {**(os.environ if environ is None else environ), **QUIET}
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    api_url = f"http://{shown}:{port}/api"
    env.setdefault("PREFECT_UI_API_URL", api_url)
    database = env.get(DATABASE_URL)
    if database:
        where = mask_password(database)
    else:
        home = env.get("PREFECT_HOME") or os.path.expanduser("~/.prefect")
        where = f"SQLite, {os.path.join(home, 'prefect.db')}"
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", host]
    return ServerSpec(
        command=[*command, "--port", str(port)],
        env=env,
        ui_url=f"http://{shown}:{port}",
        api_url=api_url,
        database=where,
    )
