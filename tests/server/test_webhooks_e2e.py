"""Webhooks end to end: a real `edgefleet serve` process delivering to a receiver on loopback.

The server runs with its retry clock set small (backoff from 0.2 s, at most 1 s; deliveries looked
for every 0.2 s, thresholds checked every 0.5 s), so a receiver down for a few seconds is retried
several times, as one down for a minute is at the default settings (5 s doubling); the tests poll
for each state rather than sleep.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from firmware_bundles import build
from firmware_bundles import webhook_signature as signature
from server import notify
from tests.conftest import MODEL_BYTES, manifest_draft, target_entry
from tests.procs import ServerProcess, free_port, wait_for
from tests.server.conftest import CAPS
from tests.server.receiver import Receiver
from tests.server.windows import batch_text, steady_window

MODEL = "wrist-activity"
FAST = {
    "EDGEFLEET_OUTBOUND_POLL_S": "0.2",
    "EDGEFLEET_OUTBOUND_BACKOFF_BASE_S": "0.2",
    "EDGEFLEET_OUTBOUND_BACKOFF_MAX_S": "1",
    "EDGEFLEET_OUTBOUND_TIMEOUT_S": "5",
    "EDGEFLEET_THRESHOLD_CHECK_S": "0.5",
    "EDGEFLEET_WEBHOOK_ALLOWED_HOSTS": '["127.0.0.1"]',
}


def bundle_file(server: ServerProcess, tmp: Path, version: str, counter: int) -> Path:
    target = [target_entry("phone-android")]
    draft = manifest_draft(name=MODEL, version=version, release_counter=counter, targets=target)
    path = tmp / f"{MODEL}-{version}.bundle"
    path.write_bytes(build(draft, {"model.onnx": MODEL_BYTES}, [server.release_key]))
    return path


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr + result.stdout
    return result.stdout


def add_webhook(server: ServerProcess, url: str, events: list[str], *thresholds: str) -> Any:
    args = [f"--event={e}" for e in events] + [f"--threshold={t}" for t in thresholds]
    return json.loads(ok(server.cli("webhooks", "add", url, *args, "--json")))


def deliveries(server: ServerProcess, webhook_id: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = server.api(
        "GET", "/v1/webhooks/deliveries", params={"webhook_id": webhook_id, "limit": 1000}
    )
    return rows


def rollout(server: ServerProcess, version: str, **plan: Any) -> int:
    created = server.api("POST", "/v1/rollouts", json={"model": MODEL, "version": version, **plan})
    return int(created["id"])


def manual(*percents: float) -> list[dict[str, Any]]:
    return [{"percent": p, "thin_deadline_s": 0, "min_duration_s": 0} for p in percents]


def window(device: str, sha: str, version: str, errors: int) -> dict[str, Any]:
    return steady_window(
        device,
        sha,
        model=MODEL,
        version=version,
        # After the rollout started: the evaluator takes windows from its start on.
        window_start=datetime.now(UTC).isoformat(),
        error_count=errors,
        outputs=[{"name": "label", "counts": [200, 200, 0]}],
        inputs=[{"name": "x0", "counts": [0, 400, 0]}],  # far off the reference [1, 2, 3]
        feedback={"thumbs_down": 100},
        labels={"rest": {"rest": 10, "move": 30}},
        quality={"missing": {"x0": 20}},  # 20 NaN per 400 calls: over the 1% default
    )


def enroll_phones(server: ServerProcess, count: int) -> dict[str, str]:
    token = server.api("POST", "/v1/enrollment-tokens", json={"max_uses": count})["token"]
    creds = {}
    for i in range(count):
        device = f"phone-{i:03d}"
        body = {"enroll_token": token, "device_id": device, "capabilities": CAPS["phone-android"]}
        r = httpx.post(f"{server.url}/v1/devices/enroll", json=body, timeout=30)
        assert r.status_code == 201, r.text
        creds[device] = r.json()["credential"]
    return creds


def upload_failing_treatment(
    server: ServerProcess, creds: dict[str, str], shas: dict[str, str]
) -> None:
    """Every phone checks in, then reports on the version it was given: 30% errors on 3.0.0."""
    rng = np.random.default_rng(7)
    for device, cred in creds.items():
        auth = {"Authorization": f"Bearer {cred}"}
        body = {"device_id": device, "nonce": uuid.uuid4().hex, "firmware_version": "14.0.0"}
        r = httpx.post(f"{server.url}/v1/devices/{device}/check-in", json=body, headers=auth)
        assert r.status_code == 200, r.text
        version = next(b["version"] for b in r.json()["signed"]["bundles"] if b["model"] == MODEL)
        errors = int(rng.binomial(400, 0.30 if version == "3.0.0" else 0.01))
        batch = batch_text(device, [window(device, shas[version], version, errors)])
        r = httpx.post(f"{server.url}/v1/devices/{device}/telemetry", content=batch, headers=auth)
        assert r.status_code == 200, r.text


def verify_cli(secret: str, got: Any, body: bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "edgefleet",
            "webhooks",
            "verify",
            "--secret",
            secret,
            "--id",
            got.headers["X-EdgeFleet-Delivery-Id"],
            "--timestamp",
            got.headers["X-EdgeFleet-Timestamp"],
            "--signature",
            got.headers["X-EdgeFleet-Signature"],
            "--max-age-s",
            "0",
        ],
        input=body.decode(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_receiver_gets_each_event_kind_signed_and_threshold_events_once(tmp_path: Path) -> None:
    receiver = Receiver().start()
    server = ServerProcess(data_dir=tmp_path / "data", log_dir=tmp_path, env=FAST)
    try:
        server.start()
        kinds = list(notify.EVENT_KINDS)
        hook = add_webhook(server, receiver.url, kinds, "accuracy_under=0.9", "schedule_every_s=1")
        shas = {}
        for counter, version in enumerate(("1.0.0", "2.0.0", "3.0.0"), start=1):
            shas[version] = server.publish(bundle_file(server, tmp_path, version, counter))
        ok(server.cli("release", MODEL, "1.0.0"))
        # 2.0.0: started, two stages moved by approval (thin data waits for a person), completed.
        first = rollout(server, "2.0.0", stages=manual(50, 100))
        for _ in range(2):
            server.api("POST", f"/v1/rollouts/{first}/evaluate")
            server.api("POST", f"/v1/rollouts/{first}/approve")
        # 3.0.0 fails its error-rate gate on the devices' telemetry and rolls back.
        creds = enroll_phones(server, 40)
        second = rollout(
            server,
            "3.0.0",
            stages=[{"percent": 50, "min_duration_s": 0}, {"percent": 100}],
            gates={"min_devices_per_arm": 10, "min_inferences_per_arm": 100},
            on_failure="rollback",
        )
        upload_failing_treatment(server, creds, shas)
        decision = server.api("POST", f"/v1/rollouts/{second}/evaluate")
        assert decision["action"] == "halt", decision["reason"]
        assert decision["state_after"] == "rolled-back"
        third = rollout(server, "3.0.0", stages=manual(50, 100))
        server.api("POST", f"/v1/rollouts/{third}/abort")

        def every_kind() -> set[str] | None:
            got = {r.headers["X-EdgeFleet-Event"] for r in receiver.requests()}
            return got if got >= set(kinds) else None

        wait_for(every_kind, "every event kind at the receiver")

        # Let the threshold check run again and again (each schedule.due is at least a second
        # apart), then no threshold event may have come twice.
        def scheduled() -> int:
            got = receiver.requests()
            return sum(1 for r in got if r.headers["X-EdgeFleet-Event"] == "schedule.due")

        before = scheduled()
        wait_for(lambda: scheduled() >= before + 3, "three more schedule.due deliveries")

        got = receiver.requests()
        ids = [r.headers["X-EdgeFleet-Delivery-Id"] for r in got]
        assert len(ids) == len(set(ids)), "a delivery came twice"
        events = [json.loads(r.body) for r in got]
        threshold = Counter(
            (e["kind"], e["data"]["version"], e["data"]["subject"])
            for e in events
            if e["kind"] in notify.THRESHOLD_KINDS and e["kind"] != "schedule.due"
        )
        assert threshold == {
            ("drift.over_threshold", "1.0.0", "input:x0"): 1,
            ("drift.over_threshold", "3.0.0", "input:x0"): 1,
            ("feedback.over_threshold", "1.0.0", "feedback"): 1,
            ("feedback.over_threshold", "3.0.0", "feedback"): 1,
            ("accuracy.under_floor", "1.0.0", "accuracy"): 1,
            ("accuracy.under_floor", "3.0.0", "accuracy"): 1,
            ("data_quality.over_threshold", "1.0.0", "input:x0:missing"): 1,
            ("data_quality.over_threshold", "3.0.0", "input:x0:missing"): 1,
        }
        state = Counter(e["kind"] for e in events if e["kind"] not in notify.THRESHOLD_KINDS)
        assert state == {
            "bundle.published": 3,
            "version.released": 1,
            "rollout.started": 3,
            "rollout.advanced": 1,
            "rollout.completed": 1,
            "rollout.gate_failed": 1,
            "rollout.rolled_back": 1,
            "rollout.halted": 1,
        }
        failed = next(e for e in events if e["kind"] == "rollout.gate_failed")
        assert failed["data"]["rollout_id"] == second
        assert "error_rate" in failed["data"]["figures"]["verdict"]["failed"]
        for r in got:
            assert r.headers["X-EdgeFleet-Event"] == json.loads(r.body)["kind"]
            why = signature.problem(
                hook["secret"],
                r.headers["X-EdgeFleet-Delivery-Id"],
                r.headers["X-EdgeFleet-Timestamp"],
                r.body,
                r.headers["X-EdgeFleet-Signature"],
                now=time.time(),
                max_age_s=300,
            )
            assert why is None, why
        # The delivery log names each delivered request by its delivery id.
        log = {d["delivery_id"]: d for d in deliveries(server, hook["id"])}
        assert set(ids) <= set(log)
        assert all(log[i]["state"] == "delivered" for i in ids)
        # A shell receiver's check: the body as received passes, a changed one fails.
        halted = next(r for r in got if r.headers["X-EdgeFleet-Event"] == "rollout.halted")
        assert verify_cli(hook["secret"], halted, halted.body).returncode == 0
        tampered = halted.body.replace(b'"halted"', b'"running"')
        assert tampered != halted.body
        refused = verify_cli(hook["secret"], halted, tampered)
        assert refused.returncode == 1
        assert "signature does not match" in refused.stderr
        listed = ok(server.cli("webhooks", "deliveries", "--webhook-id", str(hook["id"])))
        assert "rollout.gate_failed" in listed and "delivered" in listed
    finally:
        server.stop()
        receiver.stop()


#: Attempts each delivery fails while the receiver is down, before it comes back.
FAILED = 3


def test_a_receiver_that_was_down_gets_every_event_when_it_returns(tmp_path: Path) -> None:
    receiver = Receiver(port=free_port())  # not listening yet: connections are refused
    server = ServerProcess(data_dir=tmp_path / "data", log_dir=tmp_path, env=FAST)
    try:
        server.start()
        kinds = ["bundle.published", "version.released", "rollout.started", "rollout.halted"]
        hook = add_webhook(server, receiver.url, kinds)
        for counter, version in enumerate(("1.0.0", "2.0.0"), start=1):
            server.publish(bundle_file(server, tmp_path, version, counter))
        ok(server.cli("release", MODEL, "1.0.0"))
        server.api("POST", f"/v1/rollouts/{rollout(server, '2.0.0')}/abort")

        # Down for seconds, not a minute: the small backoff makes as many attempts fail.
        def retried() -> list[dict[str, Any]] | None:
            rows = deliveries(server, hook["id"])
            waiting = [r for r in rows if r["state"] == "pending" and r["attempts"] >= FAILED]
            return rows if len(waiting) == 5 else None

        rows = wait_for(retried, f"all five deliveries failed {FAILED} times, receiver down")
        assert all(r["last_error"].startswith("ConnectError") for r in rows)
        # The queue is in the database: a server restart loses nothing.
        server.stop()
        server.start()
        receiver.start()

        def all_delivered() -> list[dict[str, Any]] | None:
            rows = deliveries(server, hook["id"])
            return rows if all(r["state"] == "delivered" for r in rows) else None

        rows = wait_for(all_delivered, "every delivery delivered once the receiver is back")
        # Each was delivered by an attempt after those that failed.
        assert all(r["attempts"] > FAILED and r["last_status"] == 200 for r in rows), rows
        got = receiver.requests()
        received = {r.headers["X-EdgeFleet-Delivery-Id"]: r for r in got}
        assert set(received) == {r["delivery_id"] for r in rows}
        kinds_received = sorted(json.loads(r.body)["kind"] for r in received.values())
        expected = ["bundle.published"] * 2 + ["rollout.halted", "rollout.started"]
        assert kinds_received == sorted([*expected, "version.released"])
        listed = json.loads(ok(server.cli("webhooks", "deliveries", "--json")))
        assert {d["delivery_id"] for d in listed} == set(received)
        assert receiver.url in ok(server.cli("webhooks", "list"))
        removed = ok(server.cli("webhooks", "remove", str(hook["id"])))
        assert f"removed webhook {hook['id']} (0 pending deliveries cancelled)" in removed
        assert json.loads(ok(server.cli("webhooks", "list", "--json"))) == []
    finally:
        server.stop()
        receiver.stop()
