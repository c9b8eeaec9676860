"""A real `mlflow server` on loopback for tests: SQLite backend, artifacts served over HTTP.

Artifacts are proxied (``--artifacts-destination``, experiments' root ``mlflow-artifacts:/``), so
clients download models over HTTP as they would from a remote registry, not from the directory.
Without MLflow, or if the server does not come up, tests skip; with ``CI=true`` they fail.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import httpx
import pytest

from tests.procs import free_port, terminate

#: The first start creates and migrates the SQLite database: 15-50 s on a shared 2-core machine.
START_TIMEOUT_S = 180.0
#: For every MLflow process of the tests (server and clients): no usage reports (no network).
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


@dataclass
class MlflowServer:
    """A tracking server started in ``directory``; :meth:`ready` waits until it answers."""

    url: str
    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def log(self) -> str:
        return (self.directory / "server.log").read_text(errors="replace")[-4000:]

    def ready(self) -> MlflowServer:
        """Wait for ``/health``; skip (fail under ``CI=true``) if the server exits or stays mute."""
        deadline = time.monotonic() + START_TIMEOUT_S
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                unavailable(f"mlflow server exited with {self.process.returncode}:\n{self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.5)
        unavailable(
            f"mlflow server gave no /health in {START_TIMEOUT_S:.0f} s ({last}):\n{self.log}"
        )


def unavailable(reason: str) -> NoReturn:
    """Skip the test with ``reason``; under ``CI=true``, fail it."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"MLflow tests cannot run: {reason}")
    pytest.skip(reason)


@contextmanager
def mlflow_server(directory: Path) -> Iterator[MlflowServer]:
    """Start `mlflow server` in ``directory`` (call ``ready()`` before using it); stop it after.

    Tests do their slow preparation (imports, training) while the server starts.
    """
    if importlib.util.find_spec("mlflow") is None:
        unavailable("mlflow is not installed; pip install -e '.[mlflow,dev]'")
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
    try:
        yield MlflowServer(f"http://127.0.0.1:{port}", directory, process)
    finally:
        terminate(process, timeout_s=10)
        log.close()
