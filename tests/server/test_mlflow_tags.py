"""MLflow out, end to end: a real `mlflow server` (SQLite backend) and a real `edgefleet serve
--mlflow-uri` on loopback. Publishing, releasing and each rollout step tag the registry's model
version that the bundle's provenance names; while MLflow is down the write waits in the queue and
arrives when MLflow is back."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from firmware_bundles import build
from tests.conftest import MODEL_BYTES, manifest_draft, target_entry
from tests.procs import ServerProcess, free_port, wait_for
from tests.server.test_webhooks_e2e import FAST, ok

mlflow = pytest.importorskip("mlflow", reason="MLflow out needs the mlflow extra for its tests")

MODEL = "wrist-activity"
#: MLflow's first start migrates its database: 15-40 s on these machines.
MLFLOW_START_S = 180.0
IOS = {
    "target_id": "phone-ios",
    "generation": "phone",
    "platform": "ios",
    "firmware": {"minimum": "15.0.0"},
}


class MlflowServer:
    """`mlflow server` on loopback with a SQLite backend, restartable on the same port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        self.starts += 1
        log = self.directory / f"mlflow-{self.starts}.log"
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("mlflow")),
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    f"sqlite:///{self.directory / 'mlflow.db'}",
                    "--default-artifact-root",
                    str(self.directory / "artifacts"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its workers stop with it
                env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
            )

        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"mlflow exited {self.proc.returncode}: {log.read_text()}")
            try:
                return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, "mlflow server /health", timeout_s=MLFLOW_START_S, every_s=0.5)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server.start()
    finally:
        server.stop()


def register_versions(url: str, name: str, count: int) -> Any:
    """A registered model with ``count`` versions, each from a run, through MLflow's client."""
    client = mlflow.MlflowClient(tracking_uri=url)
    client.create_registered_model(name)
    experiment = client.create_experiment(f"{name}-training")
    for _ in range(count):
        run = client.create_run(experiment)
        source = f"runs:/{run.info.run_id}/model"
        client.create_model_version(name, source=source, run_id=run.info.run_id)
    return client


def name_mlflow_version(data_dir: Path, version: str, mlflow_version: str) -> None:
    """Record the MLflow model version in a published version's provenance, as a manifest's
    ``provenance.mlflow`` (the MLflow-in work of issue 15) records it at publish."""
    with sqlite3.connect(data_dir / "fleet.db") as db:
        (raw,) = db.execute(
            "SELECT provenance FROM model_version WHERE model_name = ? AND version = ?",
            (MODEL, version),
        ).fetchone()
        provenance = {**json.loads(raw), "mlflow": {"name": MODEL, "version": mlflow_version}}
        db.execute(
            "UPDATE model_version SET provenance = ? WHERE model_name = ? AND version = ?",
            (json.dumps(provenance), MODEL, version),
        )


def publish(server: ServerProcess, tmp: Path, version: str, counter: int, target: Any) -> str:
    draft = manifest_draft(name=MODEL, version=version, release_counter=counter, targets=[target])
    path = tmp / f"{version}-{target['target_id']}.bundle"
    path.write_bytes(build(draft, {"model.onnx": MODEL_BYTES}, [server.release_key]))
    return server.publish(path)


def test_publish_release_and_rollout_steps_tag_the_registry_version(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    client = register_versions(mlflow_server.url, MODEL, 2)
    fleet = ServerProcess(
        data_dir=tmp_path / "data",
        log_dir=tmp_path,
        env=FAST,
        serve_args=("--mlflow-uri", mlflow_server.url, "--public-url", "https://fleet.example"),
    )

    def tags(version: str) -> dict[str, str]:
        return dict(client.get_model_version(MODEL, version).tags)

    def tagged(version: str, **expected: str) -> dict[str, str]:
        def probe() -> dict[str, str] | None:
            found = tags(version)
            wanted = {f"edgefleet.{k.replace('__', '.')}": v for k, v in expected.items()}
            return found if all(found.get(k) == v for k, v in wanted.items()) else None

        return wait_for(probe, f"MLflow version {version} tagged {expected}")

    try:
        fleet.start()
        android = publish(fleet, tmp_path, "1.0.0", 1, target_entry("phone-android"))
        name_mlflow_version(fleet.data_dir, "1.0.0", "1")
        # Publishing the version's bundle for another hardware id tags both hashes.
        ios = publish(fleet, tmp_path, "1.0.0", 1, IOS)
        found = tagged("1", released_for="none", rollout="none", event="bundle.published")
        assert found["edgefleet.bundle_sha256.phone-android"] == android
        assert found["edgefleet.bundle_sha256.phone-ios"] == ios
        assert found["edgefleet.version"] == f"{MODEL} 1.0.0"
        assert (
            found["edgefleet.lineage_url"]
            == f"https://fleet.example/ui/models/{MODEL}/versions/1.0.0/lineage"
        )
        ok(fleet.cli("release", MODEL, "1.0.0"))
        tagged("1", released_for="phone-android, phone-ios", event="version.released")

        publish(fleet, tmp_path, "2.0.0", 2, target_entry("phone-android"))
        name_mlflow_version(fleet.data_dir, "2.0.0", "2")
        stages = [{"percent": p, "thin_deadline_s": 0, "min_duration_s": 0} for p in (50, 100)]
        plan = {"model": MODEL, "version": "2.0.0", "stages": stages}
        rollout = fleet.api("POST", "/v1/rollouts", json=plan)["id"]
        tagged(
            "2",
            rollout=f"{rollout} running stage 1/2 (50%)",
            rollout__state="running",
            event="rollout.started",
        )
        fleet.api("POST", f"/v1/rollouts/{rollout}/evaluate")
        fleet.api("POST", f"/v1/rollouts/{rollout}/approve")
        tagged("2", rollout=f"{rollout} running stage 2/2 (100%)", event="rollout.advanced")

        # MLflow goes away; the halt waits in the queue and is written when MLflow is back.
        mlflow_server.stop()
        fleet.api("POST", f"/v1/rollouts/{rollout}/abort")

        def waiting() -> list[dict[str, Any]] | None:
            rows = fleet.api("GET", "/v1/webhooks/deliveries", params={"sink": "mlflow"})
            halt = [r for r in rows if r["kind"] == "rollout.halted"]
            retried = halt and halt[0]["state"] == "pending" and halt[0]["attempts"] >= 2
            return halt if retried else None

        halt = wait_for(waiting, "the halt's tag write retried while MLflow is down")
        assert halt[0]["last_error"].startswith("ConnectError")
        mlflow_server.start()
        tagged("2", rollout__state="halted", event="rollout.halted")
        fleet.api("POST", f"/v1/rollouts/{rollout}/rollback")
        tagged("2", rollout=f"{rollout} rolled-back stage 2/2 (100%)", event="rollout.rolled_back")
        # Version 1's tags are its own: the rollout of 2.0.0 never touched them.
        assert tags("1")["edgefleet.rollout"] == "none"
        assert tags("2")["edgefleet.bundle_sha256.phone-android"] != android
        rows = fleet.api("GET", "/v1/webhooks/deliveries", params={"sink": "mlflow"})
        assert {r["state"] for r in rows} == {"delivered"}
        assert [r["kind"] for r in reversed(rows)] == [
            "bundle.published",
            "version.released",
            "rollout.started",
            "rollout.advanced",
            "rollout.halted",
            "rollout.rolled_back",
        ]
    finally:
        fleet.stop()
