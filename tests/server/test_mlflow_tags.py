"""MLflow in and out, end to end (issue 15's first acceptance line).

Small models trained here, logged and registered in a real `mlflow server` (the session's, see
tests/mlflow_proc.py), are converted from ``models:/...`` by `edgefleet convert` (in process, for
phones only: no TFLite), published to a real `edgefleet serve --mlflow-uri`, released and rolled
out. The registry's model version that each manifest's ``provenance.mlflow`` names gets the
fleet's tags; the fleet's version carries the run id and the datasets' digests. While MLflow is
down a tag write waits in the queue and arrives when MLflow is back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import mlflow
from typer.testing import CliRunner

from edgefleet.cli import app
from tests.mlflow_models import MODEL as MLFLOW_MODEL
from tests.mlflow_proc import QUIET_ENV, MlflowRegistry
from tests.procs import ServerProcess, wait_for
from tests.server.test_webhooks_e2e import FAST, ok

#: The fleet's name for the model: another than the registry's, so the tags can only find the
#: registry's version through the manifest's provenance.
MODEL = "wrist"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def convert(
    registry: MlflowRegistry, uri: str, version: str, counter: int, targets: str, **paths: Path
) -> dict[str, Path]:
    """`edgefleet convert URI` signed with ``paths['key']`` into ``paths['out']``; the bundle
    file per hardware id."""
    args = ["convert", uri, "--mlflow-uri", registry.server.url, "--name", MODEL]
    args += ["--version", version, "--release-counter", str(counter), "--targets", targets]
    args += ["--train", str(registry.files / "train.csv"), "--label-column", "label"]
    args += ["--eval", str(registry.files / "eval.npz"), "--key", str(paths["key"])]
    args += ["--out", str(paths["out"]), "--json"]
    result = CliRunner().invoke(app, args, env=QUIET_ENV)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert all(t["ok"] for t in report["targets"]), report["targets"]
    return {t["target_id"]: Path(t["bundle"]) for t in report["targets"]}


def test_a_model_from_mlflow_reaches_the_fleet_and_its_registry_version_hears_back(
    mlflow_registry: MlflowRegistry, tmp_path: Path
) -> None:
    registry = mlflow_registry
    client = mlflow.MlflowClient(tracking_uri=registry.server.url)
    fleet = ServerProcess(
        data_dir=tmp_path / "data",
        log_dir=tmp_path,
        env=FAST,
        serve_args=("--mlflow-uri", registry.server.url, "--public-url", "https://fleet.example"),
    )

    def tags(version: str) -> dict[str, str]:
        return dict(client.get_model_version(MLFLOW_MODEL, version).tags)

    def tagged(version: str, **expected: str) -> dict[str, str]:
        wanted = {f"edgefleet.{k.replace('__', '.')}": v for k, v in expected.items()}

        def probe() -> dict[str, str] | None:
            found = tags(version)
            return found if all(found.get(k) == v for k, v in wanted.items()) else None

        return wait_for(probe, f"MLflow version {version} tagged {wanted}", every_s=0.2)

    try:
        fleet.start()
        key = fleet.data_dir / "keys" / "release.pem"
        first = convert(
            registry,
            f"models:/{MLFLOW_MODEL}/1",
            "1.0.0",
            1,
            "phone-android,phone-ios",
            key=key,
            out=tmp_path / "v1",
        )
        second = convert(
            registry,
            f"models:/{MLFLOW_MODEL}@champion",  # version 2
            "2.0.0",
            2,
            "phone-android",
            key=key,
            out=tmp_path / "v2",
        )
        android = fleet.publish(first["phone-android"])
        assert android == sha256(first["phone-android"])
        # Publishing the version's bundle for another hardware id tags both hashes.
        ios = fleet.publish(first["phone-ios"])
        assert ios == sha256(first["phone-ios"])
        found = tagged(
            "1",
            released_for="none",
            rollout="none",
            event="bundle.published",
            **{"bundle_sha256.phone-ios": ios},  # the second publish's write
        )
        assert found["edgefleet.bundle_sha256.phone-android"] == android
        assert found["edgefleet.version"] == f"{MODEL} 1.0.0"
        assert (
            found["edgefleet.lineage_url"]
            == f"https://fleet.example/ui/models/{MODEL}/versions/1.0.0/lineage"
        )

        # The fleet's version carries the run and its data, as MLflow has them.
        versions = {v["version"]: v for v in fleet.api("GET", f"/v1/models/{MODEL}")["versions"]}
        provenance = versions["1.0.0"]["provenance"]
        source = provenance["mlflow"]
        registered = client.get_model_version(MLFLOW_MODEL, "1")
        assert (source["model_name"], source["model_version"]) == (MLFLOW_MODEL, "1")
        assert source["run_id"] == registered.run_id == registry.runs["v1"]
        run = client.get_run(registered.run_id)
        assert run.inputs is not None
        logged = sorted((d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs)
        assert sorted((d["name"], d["digest"]) for d in source["datasets"]) == logged
        assert len(logged) == 2  # the training table and the held-out rows
        assert provenance["data_sha256"] == {
            "train": sha256(registry.files / "train.csv"),
            "eval": sha256(registry.files / "eval.npz"),
        }

        ok(fleet.cli("release", MODEL, "1.0.0"))
        tagged("1", released_for="phone-android, phone-ios", event="version.released")
        fleet.publish(second["phone-android"])
        versions = {v["version"]: v for v in fleet.api("GET", f"/v1/models/{MODEL}")["versions"]}
        later = versions["2.0.0"]["provenance"]["mlflow"]
        assert (later["model_version"], later["alias"]) == ("2", "champion")
        assert later["run_id"] == registry.runs["v2"] != registry.runs["v1"]
        stages = [{"percent": p, "thin_deadline_s": 0, "min_duration_s": 0} for p in (50, 100)]
        plan = {"model": MODEL, "version": "2.0.0", "stages": stages}
        rollout = fleet.api("POST", "/v1/rollouts", json=plan)["id"]
        found = tagged(
            "2",
            rollout=f"{rollout} running stage 1/2 (50%)",
            rollout__state="running",
            event="rollout.started",
        )
        assert found["edgefleet.bundle_sha256.phone-android"] == sha256(second["phone-android"])
        fleet.api("POST", f"/v1/rollouts/{rollout}/evaluate")
        fleet.api("POST", f"/v1/rollouts/{rollout}/approve")
        tagged("2", rollout=f"{rollout} running stage 2/2 (100%)", event="rollout.advanced")

        # MLflow goes away; the halt waits in the queue and is written when MLflow is back.
        registry.server.stop()
        fleet.api("POST", f"/v1/rollouts/{rollout}/abort")

        def waiting() -> list[dict[str, Any]] | None:
            rows = fleet.api("GET", "/v1/webhooks/deliveries", params={"sink": "mlflow"})
            halt = [r for r in rows if r["kind"] == "rollout.halted"]
            retried = halt and halt[0]["state"] == "pending" and halt[0]["attempts"] >= 2
            return halt if retried else None

        halt = wait_for(waiting, "the halt's tag write retried while MLflow is down")
        assert halt[0]["last_error"].startswith("ConnectError")
        registry.server.start().ready()
        tagged("2", rollout__state="halted", event="rollout.halted")
        fleet.api("POST", f"/v1/rollouts/{rollout}/rollback")
        tagged("2", rollout=f"{rollout} rolled-back stage 2/2 (100%)", event="rollout.rolled_back")
        # Version 1's tags are its own: the rollout of 2.0.0 never touched them.
        assert tags("1")["edgefleet.rollout"] == "none"
        rows = fleet.api("GET", "/v1/webhooks/deliveries", params={"sink": "mlflow"})
        assert {r["state"] for r in rows} == {"delivered"}
        assert [r["kind"] for r in reversed(rows)] == [
            "bundle.published",
            "bundle.published",
            "version.released",
            "bundle.published",
            "rollout.started",
            "rollout.advanced",
            "rollout.halted",
            "rollout.rolled_back",
        ]
        # The halt was written after the attempts that failed while MLflow was down.
        assert next(r for r in rows if r["kind"] == "rollout.halted")["attempts"] >= 3
    finally:
        fleet.stop()
        if not registry.server.running:  # the session's other MLflow tests need it
            registry.server.start().ready()
