"""A real Prefect server for tests: `botaclip server` on a free loopback port, its own database."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A running server: its addresses, the environment of clients, its log."""

    api_url: str
    ui_url: str
    home: Path
    log: Path
    proc: subprocess.Popen

    @property
    def env(self) -> dict[str, str]:
        """The environment of a process that runs flows against this server."""
        return {
            **os.environ,
            "PREFECT_API_URL": self.api_url,
            "PREFECT_HOME": str(self.home / "client"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PYTHONPATH": str(REPO),
        }

    def api(self, query):
        """Run ``await query(client)`` against this server's REST API."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        async def main():
            async with get_client() as client:
                return await query(client)

        with temporary_settings({PREFECT_API_URL: self.api_url}):
            return asyncio.run(main())

    def run(self, *args: str, timeout: float = 300, cwd: Path | None = None) -> str:
        """Run ``botaclip ARGS`` against this server; fail with its output unless it exits 0."""
        done = subprocess.run(
            [sys.executable, "-m", "flows.cli", *map(str, args)],
            env=self.env,
            cwd=cwd or REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, (
            f"botaclip {args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
        return done.stdout


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def prefect_server(
    home: Path, *, startup_s: float = 120, env: dict | None = None
) -> Iterator[Server]:
    """Start `botaclip server --port <free>` with PREFECT_HOME=``home``; stop it afterwards."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = home / "server.log"
    server_env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PYTHONPATH": str(REPO),
        # new scheduled runs appear within seconds of a deployment (default: every 60 s)
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        **(env or {}),
    }
    server_env.pop("PREFECT_API_URL", None)
    sink = open(log, "w")  # noqa: SIM115 (closed below, after the process)
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "server", "--port", str(port)],
        env=server_env,
        cwd=REPO,
        stdout=sink,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = Server(f"http://127.0.0.1:{port}/api", f"http://127.0.0.1:{port}", home, log, proc)
    try:
        deadline = time.monotonic() + startup_s
        while not _healthy(server.api_url):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"`botaclip server` exited {proc.returncode}:\n{log.read_text()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"no Prefect server after {startup_s} s:\n{log.read_text()}")
            time.sleep(0.3)
        yield server
    finally:
        stop(proc)
        sink.close()


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Terminate a process started with ``start_new_session`` and its children."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait()
