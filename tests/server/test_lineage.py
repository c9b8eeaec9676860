"""A version's lineage through the real app on SQLite and PostgreSQL, and `edgefleet lineage`
against a real `edgefleet serve`: provenance, the converter's choice and figures per target,
bundle SHA-256s, HIL verdicts, releases, confirmations, rollouts, devices per day and field
figures, each as stored by the routes that made them."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from edgefleet.lineage_cli import lineage_tree
from firmware_bundles import build
from firmware_bundles.provenance import MlflowSource
from server.lineage import mlflow_links
from tests.conftest import MODEL_BYTES
from tests.procs import ServerProcess
from tests.server.conftest import Fleet, mlflow_source
from tests.server.test_hil_gate import attach, report
from tests.server.test_metrics import draft, make_raw, window

MODEL = "wrist-activity"


def lineage(fleet: Fleet, version: str, token: str | None = None) -> Any:
    r = fleet.client.get(
        f"/v1/models/{MODEL}/versions/{version}/lineage",
        headers=fleet.auth(token or fleet.token("viewer")),
    )
    assert r.status_code == 200, r.text
    return r.json()


def upload(fleet: Fleet, device: str, credential: str, windows: list[dict[str, Any]]) -> None:
    body = {"device_id": device, "boot_epoch": 1, "sequence": 0, "windows": windows}
    r = fleet.client.post(
        f"/v1/devices/{device}/telemetry", content=json.dumps(body), headers=fleet.auth(credential)
    )
    assert r.status_code == 200, r.text


def test_lineage_from_provenance_to_the_field(fleet: Fleet) -> None:
    phone = fleet.publish(fleet.bundle())
    ring = fleet.publish(fleet.bundle(target="ring-gen3"))
    assert attach(fleet, phone["sha256"], report(phone, fleet.hil_key)).status_code == 200
    fleet.release(MODEL, "1.0.0", "phone-android")
    r = fleet.client.post(
        f"/v1/models/{MODEL}/versions/1.0.0/confirm",
        json={"hardware_id": "phone-android"},
        headers=fleet.auth(fleet.token("operator")),
    )
    assert r.status_code == 200, r.text
    # Three devices report two event-time days of the version.
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    raws = make_raw(np.random.default_rng(7), ["p-0", "p-1", "p-2"], 2)
    shift = today - timedelta(days=2) - raws[0].start.replace(hour=0)
    for raw in raws:
        raw.start += shift
    for device in ("p-0", "p-1", "p-2"):
        credential = fleet.enroll(device)
        mine = [r for r in raws if r.device == device]
        upload(fleet, device, credential, [window_of(r, phone["sha256"]) for r in mine])

    found = lineage(fleet, "1.0.0", fleet.token("operator"))
    # The manifest draft's provenance names the model file it was made from.
    assert found["provenance"]["source_model_sha256"] == hashlib.sha256(MODEL_BYTES).hexdigest()
    assert [t["hardware_id"] for t in found["targets"]] == ["phone-android", "ring-gen3"]
    by_target = {t["hardware_id"]: t for t in found["targets"]}
    assert by_target["phone-android"]["bundle_sha256"] == phone["sha256"]
    assert by_target["ring-gen3"]["bundle_sha256"] == ring["sha256"]
    assert by_target["ring-gen3"]["format"] == "tflite"
    assert by_target["phone-android"]["bundle_bytes"] == phone["length"]
    assert by_target["phone-android"]["quantisation"]["scheme"] == "float32"
    hil = by_target["phone-android"]["hil"]
    assert hil["passed"] and hil["signature_valid"] and len(hil["runs"]) == 1
    assert hil["runs"][0]["checks"][0]["name"] == "parity"
    assert by_target["ring-gen3"]["hil"] is None
    assert len(by_target["phone-android"]["released_at"]) == 1
    assert by_target["ring-gen3"]["released_at"] == []
    assert [r["hardware_id"] for r in found["releases"]] == ["phone-android"]
    assert [(c["hardware_id"], c["release_counter"]) for c in found["confirmations"]] == [
        ("phone-android", 1)
    ]
    days = {d["day"]: d for d in found["devices_per_day"]}
    expected_days = sorted({r.start.date().isoformat() for r in raws})
    assert sorted(days) == expected_days
    for day in expected_days:
        assert days[day]["devices"] == 3
        assert days[day]["inferences"] == sum(
            len(r.x0) for r in raws if r.start.date().isoformat() == day
        )
    total = found["field"]["total"]
    assert total["devices_reporting"] == 3 and total["inferences"] == sum(len(r.x0) for r in raws)
    # A viewer sees the same lineage, but not figures over fewer devices than the minimum (5).
    viewed = lineage(fleet, "1.0.0")
    assert viewed["field"]["total"]["withheld"].startswith("too few devices")
    assert viewed["devices_per_day"] == found["devices_per_day"]


def test_rollouts_of_the_version_with_dates_and_last_decision(fleet: Fleet) -> None:
    fleet.publish(fleet.bundle())
    fleet.release(MODEL, "1.0.0")
    fleet.publish(fleet.bundle(version="2.0.0", counter=2))
    operator = fleet.auth(fleet.token("operator"))
    r = fleet.client.post(
        "/v1/rollouts", json={"model": MODEL, "version": "2.0.0"}, headers=operator
    )
    assert r.status_code == 201, r.text
    rollout_id = r.json()["id"]
    paused = fleet.client.post(f"/v1/rollouts/{rollout_id}/pause", headers=operator)
    assert paused.status_code == 200, paused.text
    [rollout] = lineage(fleet, "2.0.0")["rollouts"]
    assert (rollout["id"], rollout["state"], rollout["stage"]) == (rollout_id, "paused", 1)
    assert rollout["started_at"] is not None and rollout["hardware_ids"] == ["phone-android"]
    assert (rollout["decisions"], rollout["last_action"]) == (3, "pause")  # create, start, pause
    assert lineage(fleet, "1.0.0")["rollouts"] == []


def test_unknown_model_or_version_is_a_404_problem(fleet: Fleet) -> None:
    fleet.publish(fleet.bundle())
    viewer = fleet.auth(fleet.token("viewer"))
    for path, detail in (
        (f"/v1/models/{MODEL}/versions/9.9.9/lineage", f"no version 9.9.9 of model {MODEL}"),
        ("/v1/models/nope/versions/1.0.0/lineage", "no version 1.0.0 of model nope"),
    ):
        r = fleet.client.get(path, headers=viewer)
        assert (r.status_code, r.json()) == (404, {"detail": detail})
        assert r.headers["content-type"] == "application/json"


def test_lineage_command_prints_a_tree_and_json(server: ServerProcess, tmp_path: Path) -> None:
    bundle = tmp_path / "gait.efb"
    bundle.write_bytes(
        build(draft("gait", "1.0.0"), {"model.onnx": MODEL_BYTES}, [server.release_key])
    )
    sha = server.publish_and_release(bundle, "gait", "1.0.0")
    done = server.cli("lineage", "gait", "1.0.0", "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["targets"][0]["bundle_sha256"] == sha
    tree = server.cli("lineage", "gait", "1.0.0")
    assert tree.returncode == 0, tree.stderr
    assert "provenance" in tree.stdout and sha in tree.stdout and "phone-android" in tree.stdout
    missing = server.cli("lineage", "gait", "2.0.0")
    assert missing.returncode == 1 and "no version 2.0.0 of model gait" in missing.stderr


def test_the_tree_prints_markup_from_the_server_as_text() -> None:
    """A builder, tool or publisher named like Rich markup is printed as it is, never styled
    (and a closing tag never crashes Rich)."""
    answer = sample_answer()
    answer["published_by"] = "[/]evil[bold]"
    answer["provenance"]["builder"] = "[red]ci[/red]"
    console = Console(record=True, width=200)
    console.print(lineage_tree(answer))
    text = console.export_text()
    assert "[/]evil[bold]" in text and "[red]ci[/red]" in text


def window_of(raw: Any, sha: str) -> dict[str, Any]:
    """A window of the test fleet's model: its manifest has one input x0 and two classes."""
    w = window(raw, MODEL, "1.0.0", sha)
    w["outputs"] = []
    w["inputs"] = [{"name": "x0", "counts": [0, len(raw.x0), 0]}]
    w["labels"] = {}
    return w


def sample_answer() -> dict[str, Any]:
    span = {"model": "m", "version": "1.0.0", "hardware_id": None, "start": "a", "end": "b"}
    return {
        "model": "m",
        "version": "1.0.0",
        "release_counter": 1,
        "published_at": "2026-01-01",
        "published_by": "ci",
        "withdrawn": False,
        "provenance": {
            "source_model_sha256": "0" * 64,
            "data_sha256": {"train": "1" * 64},
            "tool_versions": {"onnx": "1.17"},
            "builder": "ci",
        },
        "targets": [],
        "releases": [],
        "confirmations": [],
        "rollouts": [],
        "devices_per_day": [],
        "field": {"span": span, "total": {"withheld": "too few devices (fewer than 5)"}},
    }


@pytest.mark.parametrize(
    ("source", "links"),
    [
        (
            {**mlflow_source("r1", "wrist", "7", "https://mlflow.example/"), "experiment_id": "3"},
            {
                "run": "https://mlflow.example/#/experiments/3/runs/r1",
                "model_version": "https://mlflow.example/#/models/wrist/versions/7",
                "registered_model": "https://mlflow.example/#/models/wrist",
            },
        ),
        (
            mlflow_source("r1", tracking_uri="http://127.0.0.1:5000"),
            {
                "run": "http://127.0.0.1:5000/#/runs/r1",
                "model_version": None,
                "registered_model": None,
            },
        ),
        (
            {**mlflow_source("r1", "a b/c", "2"), "registry_uri": "databricks-uc"},
            {
                "run": "http://127.0.0.1:5000/#/runs/r1",
                "model_version": None,
                "registered_model": None,
            },
        ),
        (
            {**mlflow_source("r1", "a b/c", "2"), "tracking_uri": "sqlite:///mlruns.db"},
            {
                "run": None,
                "model_version": "http://127.0.0.1:5000/#/models/a%20b%2Fc/versions/2",
                "registered_model": "http://127.0.0.1:5000/#/models/a%20b%2Fc",
            },
        ),
    ],
    ids=["registered-with-experiment", "run-only", "registry-not-web", "tracking-not-web"],
)
def test_mlflow_links_follow_the_mlflow_ui_routes(
    source: dict[str, Any], links: dict[str, Any]
) -> None:
    assert mlflow_links(MlflowSource.model_validate(source)).model_dump() == links


def test_the_tree_prints_the_mlflow_links_it_has() -> None:
    answer = sample_answer()
    console = Console(record=True, width=200)
    console.print(lineage_tree(answer))
    assert "MLflow" not in console.export_text()  # not from MLflow: no such branch
    answer["mlflow"] = {
        "run": "http://127.0.0.1:5000/#/runs/r1",
        "model_version": None,
        "registered_model": "http://127.0.0.1:5000/#/models/[b]wrist",
    }
    console.print(lineage_tree(answer))
    text = console.export_text()
    assert "run: http://127.0.0.1:5000/#/runs/r1" in text
    assert "registered model: http://127.0.0.1:5000/#/models/[b]wrist" in text
    assert "model version" not in text
