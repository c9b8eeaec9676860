"""A real `mlflow server` on loopback for tests: SQLite backend, artifacts served over HTTP.

Artifacts are proxied (``--artifacts-destination``, experiments' root ``mlflow-artifacts:/``), so
clients download models over HTTP as they would from a remote registry, not from the directory.
Without MLflow, or if the server does not come up, tests skip; with ``CI=true`` they fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.procs import free_port, terminate

#: The first start creates and migrates the SQLite database: 15-50 s on a shared 2-core machine.
START_TIMEOUT_S = 180.0
#: For every MLflow process of the tests (server and clients): no usage reports (no network).
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


@dataclass
class MlflowServer:
    """A running tracking server and where it keeps its files."""

    url: str
    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def log(self) -> str:
        return (self.directory / "server.log").read_text(errors="replace")[-4000:]


def unavailable(reason: str) -> None:
    """Skip the test with ``reason``; under ``CI=true``, fail it."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"MLflow tests cannot run: {reason}")
    pytest.skip(reason)


@contextmanager
def mlflow_server(directory: Path) -> Iterator[MlflowServer]:
    """Start `mlflow server` in ``directory`` and wait for ``/health``; stop it afterwards."""
    try:
        import mlflow  # noqa: F401
    except ImportError as exc:
        unavailable(f"mlflow is not installed ({exc}); pip install -e '.[mlflow,dev]'")
    port = free_port()
    (directory / "artifacts").mkdir(parents=True, exist_ok=True)
    log = (directory / "server.log").open("wb")
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{directory / 'mlflow.db'}",
        "--artifacts-destination",
        str(directory / "artifacts"),
    ]
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **QUIET_ENV}
    )
    server = MlflowServer(f"http://127.0.0.1:{port}", directory, process)
    try:
        problem = _wait_healthy(server)
        if problem:
            unavailable(f"{problem}; server log:\n{server.log}")
        yield server
    finally:
        terminate(process, timeout_s=10)
        log.close()


def _wait_healthy(server: MlflowServer) -> str | None:
    """None once ``/health`` answers 200, else why not (the server exited, or the deadline)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    last = "no answer yet"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return f"mlflow server exited with {server.process.returncode}"
        try:
            if httpx.get(f"{server.url}/health", timeout=2.0).status_code == 200:
                return None
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    return f"mlflow server did not answer /health within {START_TIMEOUT_S:.0f} s: {last}"
