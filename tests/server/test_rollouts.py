"""Staged rollouts through the app on SQLite and PostgreSQL: membership, arms, the state
machine, refusals, and the evaluator's own decisions."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from sqlalchemy import insert
from sqlmodel import Session, func, select

from server import evaluator
from server.auth import hash_token
from server.models import Device, Rollout, RolloutDecision
from tests.server.conftest import CAPS, Fleet
from tests.server.windows import batch_text, steady_window

MODEL = "wrist-activity"


def bulk_enroll(fleet: Fleet, prefix: str, count: int) -> dict[str, str]:
    """``count`` phones enrolled straight into the database; id -> credential."""
    creds = {f"{prefix}-{i:05d}": f"efd_{uuid.uuid4().hex}" for i in range(count)}
    caps = CAPS["phone-android"]
    rows = [
        {
            "id": device,
            "hardware_id": "phone-android",
            "generation": caps["generation"],
            "platform": caps["platform"],
            "firmware_version": caps["firmware_version"],
            "free_flash_bytes": caps["free_flash_bytes"],
            "free_ram_bytes": caps["free_ram_bytes"],
            "credential_hash": hash_token(cred),
            "revoked": False,
            "enrolled_at": datetime.now(UTC),
        }
        for device, cred in creds.items()
    ]
    with Session(fleet.state.engine) as session:
        session.execute(insert(Device), rows)
        session.commit()
    return creds


def two_versions(fleet: Fleet) -> dict[str, str]:
    shas = {}
    for counter, version in enumerate(("1.0.0", "2.0.0"), start=1):
        shas[version] = fleet.publish(fleet.bundle(version=version, counter=counter))["sha256"]
    fleet.release(MODEL, "1.0.0")
    return shas


def offered(fleet: Fleet, device: str, cred: str, running: str | None = None) -> str | None:
    """The version the device is assigned, checking in as itself."""
    body: dict[str, Any] = {
        "device_id": device,
        "nonce": uuid.uuid4().hex,
        "firmware_version": "14.0.0",
        "installed": [{"model": MODEL, "version": running}] if running else [],
    }
    r = fleet.client.post(f"/v1/devices/{device}/check-in", json=body, headers=fleet.auth(cred))
    assert r.status_code == 200, r.text
    bundles = r.json()["signed"]["bundles"]
    return next((b["version"] for b in bundles if b["model"] == MODEL), None)


def create(fleet: Fleet, expect: int = 201, **plan: Any) -> Any:
    body = {"model": MODEL, "version": "2.0.0", **plan}
    r = fleet.client.post("/v1/rollouts", json=body, headers=fleet.auth(fleet.token("operator")))
    assert r.status_code == expect, r.text
    return r.json()


def act(fleet: Fleet, rollout_id: int, action: str, expect: int = 200) -> Any:
    r = fleet.client.post(
        f"/v1/rollouts/{rollout_id}/{action}", headers=fleet.auth(fleet.token("operator"))
    )
    assert r.status_code == expect, r.text
    return r.json()


def status(fleet: Fleet, rollout_id: int) -> Any:
    r = fleet.client.get(f"/v1/rollouts/{rollout_id}", headers=fleet.auth(fleet.token("viewer")))
    assert r.status_code == 200, r.text
    return r.json()


#: Stages that wait for a person at once when evidence is thin, so a test moves them by approval.
def manual(*percents: float) -> list[dict[str, Any]]:
    return [{"percent": p, "thin_deadline_s": 0, "min_duration_s": 0} for p in percents]


def evaluate(fleet: Fleet, rollout_id: int) -> Any:
    r = fleet.client.post(
        f"/v1/rollouts/{rollout_id}/evaluate", headers=fleet.auth(fleet.token("operator"))
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_membership_is_stable_across_stages_and_for_late_enrollees(fleet: Fleet) -> None:
    two_versions(fleet)
    creds = bulk_enroll(fleet, "early", 2000)
    rollout = create(fleet, stages=manual(5, 25, 100))
    rid = rollout["id"]

    def treated(devices: dict[str, str]) -> set[str]:
        return {d for d, c in devices.items() if offered(fleet, d, c) == "2.0.0"}

    at5 = treated(creds)
    assert abs(len(at5) / 2000 - 0.05) <= 0.02, len(at5)
    assert status(fleet, rid)["arms"]["treatment"] == len(at5)
    # Every other selected device is control and is offered the previous version.
    assert {offered(fleet, d, c) for d, c in list(creds.items())[:50] if d not in at5} == {"1.0.0"}
    assert evaluate(fleet, rid)["state_after"] == "waiting-for-approval"  # thin: a person decides
    assert act(fleet, rid, "approve")["stage"] == 2
    at25 = treated(creds)
    assert at5 <= at25 and abs(len(at25) / 2000 - 0.25) <= 0.02, len(at25)
    late = bulk_enroll(fleet, "late", 2000)
    late25 = treated(late)
    assert abs(len(late25) / 2000 - 0.25) <= 0.02, len(late25)
    assert status(fleet, rid)["arms"] == {
        "selected": 4000,
        "treatment": len(at25) + len(late25),
        "control": 4000 - len(at25) - len(late25),
    }


def test_pause_resume_approve_abort_and_what_each_state_offers(fleet: Fleet) -> None:
    two_versions(fleet)
    creds = bulk_enroll(fleet, "p", 200)
    rid = create(fleet, stages=manual(50, 100))["id"]
    treated = [d for d, c in creds.items() if offered(fleet, d, c) == "2.0.0"]
    control = [d for d in creds if d not in treated]
    assert treated and control
    assert act(fleet, rid, "resume", expect=409)["detail"].startswith(f"rollout {rid} is running")
    assert act(fleet, rid, "pause")["state"] == "paused"
    assert offered(fleet, treated[0], creds[treated[0]]) == "2.0.0"  # paused keeps the arms
    assert evaluate(fleet, rid)["state_after"] == "paused"  # judged, not moved
    assert act(fleet, rid, "resume")["state"] == "running"
    evaluate(fleet, rid)
    assert act(fleet, rid, "approve")["state"] == "running"
    assert act(fleet, rid, "abort")["state"] == "halted"
    # Halted: nothing new. A treatment device that never switched stays on 1.0.0; one that runs
    # 2.0.0 keeps it.
    assert offered(fleet, treated[0], creds[treated[0]], running="1.0.0") == "1.0.0"
    assert offered(fleet, treated[1], creds[treated[1]], running="2.0.0") == "2.0.0"
    assert act(fleet, rid, "rollback")["state"] == "rolled-back"
    assert offered(fleet, treated[1], creds[treated[1]], running="2.0.0") == "1.0.0"
    assert offered(fleet, control[0], creds[control[0]]) == "1.0.0"
    actions = [d["action"] for d in status(fleet, rid)["decisions"]][::-1]
    assert actions == [
        "create",
        "start",
        "pause",
        "evaluate",
        "resume",
        "wait",
        "advance",
        "abort",
        "rollback",
    ]


def test_release_and_withdraw_are_refused_while_a_rollout_owns_the_model(fleet: Fleet) -> None:
    two_versions(fleet)
    rid = create(fleet)["id"]
    op = fleet.auth(fleet.token("operator"))
    r = fleet.client.post(f"/v1/models/{MODEL}/versions/2.0.0/release", json={}, headers=op)
    assert r.status_code == 409 and f"rollout {rid}" in r.json()["detail"]
    r = fleet.client.post(f"/v1/models/{MODEL}/versions/1.0.0/withdraw", headers=op)
    assert r.status_code == 409 and f"rollout {rid}" in r.json()["detail"]


@pytest.mark.parametrize(
    ("plan", "status_code", "message"),
    [
        ({"version": "9.9.9"}, 404, "no version 9.9.9"),
        ({"version": "1.0.0"}, 409, "already released"),
        ({"stages": [{"percent": 25}, {"percent": 5}, {"percent": 100}]}, 400, "must increase"),
        ({"stages": [{"percent": 5}, {"percent": 50}]}, 400, "last stage must be 100"),
        ({"selector": {"cohorts": ["nobody"]}}, 404, "no cohort 'nobody'"),
        ({"selector": {"hardware_ids": ["toaster"]}}, 400, "unknown hardware id toaster"),
        ({"selector": {"hardware_ids": ["ring-gen3"]}}, 409, "no bundle for ring-gen3"),
        ({"gates": {"alpha": 2}}, 400, "gates: alpha"),
        ({"on_failure": "explode"}, 422, "on_failure"),
    ],
    ids=[
        "unknown",
        "current",
        "decreasing",
        "not-100",
        "cohort",
        "hardware",
        "no-bundle",
        "gates",
        "on-failure",
    ],
)
def test_a_bad_plan_is_refused_naming_the_problem_and_writes_nothing(
    fleet: Fleet, plan: dict[str, Any], status_code: int, message: str
) -> None:
    two_versions(fleet)
    answer = create(fleet, expect=status_code, **plan)
    assert message in json.dumps(answer)
    with Session(fleet.state.engine) as session:
        assert session.exec(select(func.count()).select_from(Rollout)).one() == 0
        assert session.exec(select(func.count()).select_from(RolloutDecision)).one() == 0


def test_overlapping_and_withdrawn_are_refused(fleet: Fleet) -> None:
    two_versions(fleet)
    first = create(fleet)["id"]
    answer = create(fleet, expect=409)
    assert f"rollout {first}" in answer["detail"]
    act(fleet, first, "rollback")
    op = fleet.auth(fleet.token("operator"))
    r = fleet.client.post(f"/v1/models/{MODEL}/versions/2.0.0/withdraw", headers=op)
    assert r.status_code == 200, r.text
    assert "withdrawn" in create(fleet, expect=409)["detail"]


def _window(device: str, bundle_sha256: str, version: str, n: int, errors: int, start: str) -> dict:
    return steady_window(
        device,
        bundle_sha256,
        model=MODEL,
        version=version,
        window_start=start,
        n=n,
        error_count=errors,
        outputs=[{"name": "label", "counts": [n // 2, n - n // 2, 0]}],
        inputs=[{"name": "x0", "counts": [0, n, 0]}],
    )


def test_the_evaluator_halts_a_worse_version_and_names_itself_and_the_figures(
    fleet: Fleet,
) -> None:
    shas = two_versions(fleet)
    creds = bulk_enroll(fleet, "e", 80)
    rollout = create(
        fleet,
        stages=[{"percent": 50, "min_duration_s": 0}, {"percent": 100}],
        gates={"min_devices_per_arm": 10, "min_inferences_per_arm": 100},
        on_failure="halt",
    )
    rid = rollout["id"]
    # Windows from after the rollout started (a fixed hour of today would fall before the start
    # for half the day, and the evaluator only counts windows of the rollout's time).
    start = (datetime.now(UTC) + timedelta(seconds=1)).replace(microsecond=0).isoformat()
    rng = np.random.default_rng(3)
    for device, cred in creds.items():
        version = offered(fleet, device, cred)
        assert version is not None
        bad = version == "2.0.0"
        n = 400
        errors = int(rng.binomial(n, 0.30 if bad else 0.01))
        batch = batch_text(device, [_window(device, shas[version], version, n, errors, start)])
        r = fleet.client.post(
            f"/v1/devices/{device}/telemetry", content=batch, headers=fleet.auth(cred)
        )
        assert r.status_code == 200, r.text
    with Session(fleet.state.engine) as session:
        done = evaluator.evaluate_due(
            session, relative_accuracy=fleet.state.settings.telemetry_relative_accuracy, lease_s=60
        )
    assert done == 1
    after = status(fleet, rid)
    assert after["state"] == "halted"
    halt = after["decisions"][0]
    assert halt["actor"] == "evaluator" and halt["action"] == "halt"
    assert "error_rate" in halt["figures"]["verdict"]["failed"]
    gate = next(g for g in halt["figures"]["verdict"]["gates"] if g["gate"] == "error_rate")
    assert gate["status"] == "fail" and gate["treatment_value"] > gate["control_value"]
