"""A real `mlflow server` on loopback for tests (SQLite backend, artifacts served over HTTP), and
the session's registry: small models trained here and logged to it as a training pipeline would.

Artifacts are proxied (``--artifacts-destination``, experiments' root ``mlflow-artifacts:/``), so
clients download models over HTTP as they would from a remote registry, not from the directory.
One server serves every MLflow test of a session (the ``mlflow_registry`` fixture in
tests/conftest.py; those tests share one pytest-xdist worker). A server that does not come up
fails the tests that need it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.mlflow_models import FEATURES, Trained, log_all, train
from tests.procs import free_port

#: The first start creates and migrates the SQLite database: 15-50 s on a shared 2-core machine.
START_TIMEOUT_S = 180.0
#: For every MLflow process of the tests (server and clients): no usage reports (no network).
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
#: The server without MLflow's job runner (seven huey consumer processes, each importing MLflow,
#: for GenAI jobs the tests never run): it starts in half the time on a 2-core machine.
SERVER_ENV = {**QUIET_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class MlflowServer:
    """`mlflow server` in ``directory``, stoppable and restartable on the same port and data.

    :meth:`start` returns at once (tests do slow preparation while it boots); :meth:`ready`
    waits until it answers.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        """The end of the latest start's log."""
        path = self.directory / f"server-{self.starts}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> MlflowServer:
        assert not self.running, "the mlflow server is already running"
        self.starts += 1
        (self.directory / "artifacts").mkdir(parents=True, exist_ok=True)
        command = [
            *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"),
            *("--port", str(self.port), "--workers", "1"),
            *("--backend-store-uri", f"sqlite:///{self.directory / 'mlflow.db'}"),
            *("--artifacts-destination", str(self.directory / "artifacts")),
        ]
        with (self.directory / f"server-{self.starts}.log").open("wb") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **SERVER_ENV},
                start_new_session=True,  # its uvicorn child stops with it
            )
        return self

    def ready(self) -> MlflowServer:
        """Wait for ``/health``; fail with the server's log if it exits or stays mute."""
        deadline = time.monotonic() + START_TIMEOUT_S
        last = "no answer yet"
        while time.monotonic() < deadline:
            if not self.running:
                code = self.process.returncode if self.process else None
                pytest.fail(f"mlflow server exited with {code}:\n{self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.2)
        waited = f"{START_TIMEOUT_S:.0f} s"
        pytest.fail(f"mlflow server gave no /health in {waited} ({last}):\n{self.log}")

    def stop(self) -> None:
        """SIGTERM the server's process group and wait (SIGKILL after 30 s)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None


@dataclass
class MlflowRegistry:
    """The running server, the models trained and logged to it, and the run of each.

    ``files`` holds ``train.csv`` (the training table with its columns in another order than the
    signature's, and a ``label`` column) and ``eval.npz`` for `edgefleet convert`.
    Registered (tests/mlflow_models.py): ``wrist-activity`` 1 and 2 (alias ``champion``: 2),
    ``wrist-activity-torch`` 1 and 2, ``wrist-activity-onnx`` 1 and ``echo`` 1.
    """

    server: MlflowServer
    files: Path
    trained: Trained
    runs: dict[str, str] = field(default_factory=dict)


@contextmanager
def logged_registry(directory: Path) -> Iterator[MlflowRegistry]:
    """Start a server in ``directory``, train while it boots, log and register every model."""
    import mlflow

    server = MlflowServer(directory / "server")
    (directory / "server").mkdir(parents=True)
    try:
        with pytest.MonkeyPatch.context() as env:
            for name, value in QUIET_ENV.items():
                env.setenv(name, value)
            server.start()
            trained = train()
            registry = MlflowRegistry(server, directory / "files", trained)
            registry.files.mkdir()
            table = trained.train[FEATURES[::-1]].assign(label=trained.y)
            table.to_csv(registry.files / "train.csv", index=False)
            np.savez(registry.files / "eval.npz", X=trained.x_eval, y=trained.y_eval)
            server.ready()
            # Only the logging sees the server's URI: each convert must find it by itself.
            with pytest.MonkeyPatch.context() as logging_env:
                logging_env.setenv("MLFLOW_TRACKING_URI", server.url)
                mlflow.set_experiment("wrist")
                registry.runs = log_all(mlflow, trained)
            yield registry
    finally:
        server.stop()
