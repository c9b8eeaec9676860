"""Webhooks in process, on SQLite and PostgreSQL: the API, events written with the change they
report, threshold events once per onset, the delivery job's retries against a loopback receiver,
and the signature's checks."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlmodel import Session, SQLModel, col, select

from firmware_bundles import open_bundle
from firmware_bundles import webhook_signature as signature
from server import notify, triggers
from server.config import Settings
from server.db import make_engine, upgrade
from server.models import ModelVersion, Outbound, TriggerState, Webhook
from server.outbound import Deliverer
from server.webhooks import Thresholds
from tests.server.conftest import Fleet, mlflow_source
from tests.server.receiver import Receiver
from tests.server.windows import batch_text, steady_window

MODEL = "wrist-activity"
ALL_STATE_KINDS = sorted(set(notify.EVENT_KINDS) - notify.THRESHOLD_KINDS)


def subscribe(fleet: Fleet, expect: int = 201, **body: Any) -> Any:
    r = fleet.client.post(
        "/v1/webhooks",
        json={"url": "http://127.0.0.1:9/hook", "events": ALL_STATE_KINDS, **body},
        headers=fleet.auth(fleet.admin),
    )
    assert r.status_code == expect, r.text
    return r.json()


def outbound(fleet: Fleet, sink: str = "webhook") -> list[Outbound]:
    with Session(fleet.state.engine) as session:
        query = select(Outbound).where(Outbound.sink == sink).order_by(col(Outbound.id))
        return list(session.exec(query))


def test_subscriptions_show_the_secret_once_and_refuse_what_they_cannot_deliver_to(
    fleet: Fleet,
) -> None:
    created = subscribe(fleet, model=MODEL)
    assert created["secret"].startswith("whsec_") and len(created["secret"]) > 30
    given = subscribe(fleet, secret="s" * 16)
    assert given["secret"] == "s" * 16
    listed = fleet.client.get("/v1/webhooks", headers=fleet.auth(fleet.admin)).json()
    assert [h["id"] for h in listed] == [created["id"], given["id"]]
    assert all("secret" not in h for h in listed)
    assert listed[0]["thresholds"]["drift_over"] == 0.2
    bodies: list[tuple[dict[str, Any], int, str]] = [
        ({"url": "ftp://127.0.0.1/x"}, 400, "http:// or https://"),
        ({"url": "http://:80/x"}, 400, "with a host"),
        ({"events": ["model.exploded"]}, 422, "events"),
        ({"events": ["accuracy.under_floor"]}, 400, "needs thresholds.accuracy_under"),
        ({"events": ["schedule.due"]}, 400, "needs thresholds.schedule_every_s"),
        ({"secret": "short"}, 422, "secret"),
    ]
    for body, status, words in bodies:
        assert words in json.dumps(subscribe(fleet, expect=status, **body)), body
    viewer = fleet.client.get("/v1/webhooks", headers=fleet.auth(fleet.token("operator")))
    assert viewer.status_code == 403
    fleet.state.settings.webhook_allowed_hosts = ["hooks.example"]
    try:
        refused = subscribe(fleet, expect=400)
        assert "'127.0.0.1' is not among" in refused["detail"]
    finally:
        fleet.state.settings.webhook_allowed_hosts = None


def test_events_commit_with_their_change_and_removal_cancels_pending_deliveries(
    fleet: Fleet,
) -> None:
    hook = subscribe(fleet)
    other = subscribe(fleet, model="another-model")
    v1 = fleet.bundle(version="1.0.0", counter=1)
    published = fleet.publish(v1)
    # A refused publish (same version, another release counter) changes nothing, so says nothing.
    fleet.publish(fleet.bundle(version="1.0.0", counter=2), expect=409)
    fleet.release(MODEL, "1.0.0")
    fleet.publish(fleet.bundle(version="2.0.0", counter=2))
    op = fleet.auth(fleet.token("operator"))
    r = fleet.client.post("/v1/rollouts", json={"model": MODEL, "version": "2.0.0"}, headers=op)
    assert r.status_code == 201, r.text
    rollout = r.json()["id"]
    assert fleet.client.post(f"/v1/rollouts/{rollout}/pause", headers=op).status_code == 200
    assert fleet.client.post(f"/v1/rollouts/{rollout}/abort", headers=op).status_code == 200
    rows = outbound(fleet)
    assert {r.webhook_id for r in rows} == {hook["id"]}  # the other one wants another model
    assert [r.kind for r in rows] == [
        "bundle.published",
        "version.released",
        "bundle.published",
        "rollout.started",
        "rollout.halted",
    ]
    first = json.loads(rows[0].payload)
    assert first["kind"] == "bundle.published" and first["event_id"] == rows[0].event_id
    assert first["data"] == {
        "model": MODEL,
        "version": "1.0.0",
        "hardware_id": "phone-android",
        "bundle_sha256": published["sha256"],
        "length": len(v1),
        "published_by": "publisher",
    }
    halted = json.loads(rows[-1].payload)["data"]
    assert halted["rollout_id"] == rollout and halted["state"] == "halted"
    assert halted["actor"] == "operator:operator" and halted["stage"] == 1
    assert len({r.delivery_id for r in rows}) == len(rows)
    assert not outbound(fleet, "mlflow")  # no provenance names an MLflow model version
    removed = fleet.client.delete(f"/v1/webhooks/{hook['id']}", headers=fleet.auth(fleet.admin))
    assert removed.status_code == 200, removed.text
    states = {r.state for r in outbound(fleet)}
    assert states <= {"cancelled", "failed", "delivered"}, states
    gone = fleet.client.delete(f"/v1/webhooks/{hook['id']}", headers=fleet.auth(fleet.admin))
    assert gone.status_code == 404
    log = fleet.client.get(
        "/v1/webhooks/deliveries",
        params={"webhook_id": hook["id"], "state": "cancelled"},
        headers=fleet.auth(fleet.admin),
    ).json()
    assert {d["delivery_id"] for d in log} <= {r.delivery_id for r in rows}
    assert other["id"] not in {d["webhook_id"] for d in log}


def test_a_version_whose_manifest_names_an_mlflow_version_queues_tag_writes(
    fleet: Fleet,
) -> None:
    run = "552b1903905b4407ba24cc767fbab5de"
    registered = mlflow_source(run, "wrist", "4")
    fleet.publish(fleet.bundle(version="1.0.0", counter=1, mlflow=registered))
    # Converted from a run's path: no registered version to tag.
    fleet.publish(fleet.bundle(version="2.0.0", counter=2, mlflow=mlflow_source(run)))
    fleet.publish(fleet.bundle(version="3.0.0", counter=3))  # no provenance.mlflow at all
    fleet.release(MODEL, "1.0.0")
    fleet.release(MODEL, "2.0.0")
    fleet.release(MODEL, "3.0.0")
    rows = outbound(fleet, "mlflow")
    target = {"model": MODEL, "version": "1.0.0", "mlflow_name": "wrist", "mlflow_version": "4"}
    assert [(r.kind, json.loads(r.payload)) for r in rows] == [
        ("bundle.published", target),
        ("version.released", target),
    ]
    # This server runs without --mlflow-uri: the delivery job marks the rows skipped.
    Deliverer(fleet.state.engine, fleet.state.settings).run()
    assert {r.state for r in outbound(fleet, "mlflow")} == {"skipped"}


def test_a_stored_provenance_mlflow_that_does_not_validate_names_no_version(
    fleet: Fleet,
) -> None:
    fleet.publish(fleet.bundle(version="1.0.0", counter=1))
    # Names that an earlier guess read, not the manifest's: they name nothing.
    guessed = {"name": "wrist", "version": "4", "registered_model_name": "wrist"}
    with Session(fleet.state.engine) as session:
        version = session.exec(select(ModelVersion)).one()
        version.provenance = {**(version.provenance or {}), "mlflow": guessed}
        session.add(version)
        session.commit()
        assert notify.mlflow_ref(session, MODEL, "1.0.0") is None
    fleet.release(MODEL, "1.0.0")
    assert outbound(fleet, "mlflow") == []


# -- threshold events --------------------------------------------------------------------------


def _window(device: str, sha: str, start: datetime, bad: bool) -> dict[str, Any]:
    return steady_window(
        device,
        sha,
        model=MODEL,
        version="1.0.0",
        window_start=start.isoformat(),
        outputs=[{"name": "label", "counts": [200, 200, 0]}],
        # The manifest's reference for x0 is [1, 2, 3]: all in one bin is far off it.
        inputs=[{"name": "x0", "counts": [0, 400, 0] if bad else [67, 133, 200]}],
        feedback={"thumbs_down": 100 if bad else 2, "thumbs_up": 50},
        labels={"rest": {"rest": 10 if bad else 40, "move": 30 if bad else 0}},
    )


def test_threshold_events_fire_once_per_onset(fleet: Fleet) -> None:
    sha = fleet.publish(fleet.bundle(version="1.0.0", counter=1))["sha256"]
    fleet.release(MODEL, "1.0.0")
    credential = fleet.enroll("phone-1")
    kinds = ["drift.over_threshold", "feedback.over_threshold", "accuracy.under_floor"]
    hook = subscribe(fleet, events=kinds, thresholds={"accuracy_under": 0.8})
    deaf = subscribe(fleet, events=["bundle.published"])  # wants no threshold events
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=9)
    sequence = iter(range(100))

    def upload(at: datetime, bad: bool) -> None:
        batch = batch_text("phone-1", [_window("phone-1", sha, at, bad)], next(sequence))
        r = fleet.client.post(
            "/v1/devices/phone-1/telemetry",
            content=batch,
            headers=fleet.auth(credential),
        )
        assert r.status_code == 200, r.text

    def check(at: datetime) -> list[tuple[str, str]]:
        with Session(fleet.state.engine) as session:
            emitted = triggers.check_all(session, now=at, relative_accuracy=0.01)
        rows = [r for r in outbound(fleet) if r.kind in kinds]
        fired = [(r.kind, json.loads(r.payload)["data"]["subject"]) for r in rows[-emitted:]]
        return fired if emitted else []

    onset = [
        ("accuracy.under_floor", "accuracy"),
        ("drift.over_threshold", "input:x0"),
        ("feedback.over_threshold", "feedback"),
    ]
    upload(day + timedelta(hours=10), bad=True)
    assert sorted(check(day + timedelta(hours=12))) == onset
    assert check(day + timedelta(hours=13)) == []  # still holding: no new event
    upload(day + timedelta(days=2, hours=10), bad=False)
    assert check(day + timedelta(days=2, hours=12)) == []  # cleared: no event
    assert check(day + timedelta(days=5)) == []  # no data: neither fires nor clears
    upload(day + timedelta(days=6, hours=10), bad=True)
    assert sorted(check(day + timedelta(days=6, hours=12))) == onset  # held again
    rows = [r for r in outbound(fleet) if r.kind in kinds]
    assert {r.webhook_id for r in rows} == {hook["id"]} and deaf["id"] not in {
        r.webhook_id for r in rows
    }
    drift = json.loads(next(r.payload for r in rows if r.kind == "drift.over_threshold"))
    assert drift["data"]["metric"] == "psi" and drift["data"]["value"] > 0.2
    assert drift["data"]["version"] == "1.0.0" and drift["data"]["inferences"] == 400
    accuracy = json.loads(next(r.payload for r in rows if r.kind == "accuracy.under_floor"))
    assert accuracy["data"]["value"] == pytest.approx(0.25) and accuracy["data"]["labels"] == 40
    with Session(fleet.state.engine) as session:
        states = session.exec(select(TriggerState).where(TriggerState.webhook_id == hook["id"]))
        held = {(s.condition, s.subject): s.holding for s in states}
    assert held[("drift.over_threshold", "input:x0")] is True
    assert held[("drift.over_threshold", "output:label")] is False  # outputs stayed put


def test_data_quality_readings_come_from_the_aggregates_counters(fleet: Fleet) -> None:
    manifest = open_bundle(fleet.bundle()).manifest
    [x0] = [h for h in manifest.telemetry_histograms().inputs if h.name == "x0"]
    assert x0.kind == "numeric" and len(x0.counts) == 3
    counts = [2, 965, 3]  # under and over the training range: 5 values
    agg = {
        "inference_count": 1000,
        "feedback": {},
        "labels": {},
        "inputs": {"x0": counts},
        "outputs": {},
        "quality": {"missing": {"x0": 30}, "refused": {"features": 12}},
    }
    t = Thresholds(data_quality_rate_over=0.01)
    kinds = {"data_quality.over_threshold"}
    found = triggers.readings(agg, manifest, t, kinds)
    assert [(r.subject, r.holds, r.value) for r in found] == [
        ("input:features:refused", True, 0.012),
        ("input:x0:missing", True, 0.03),
        ("input:x0:out_of_range", False, 0.005),
    ]
    clean = {**agg, "inputs": {}, "quality": {"missing": {}, "refused": {}}}
    assert triggers.readings(clean, manifest, t, kinds) == []
    few = {**agg, "inference_count": 50}  # under min_inferences: no data, neither way
    assert [r.holds for r in triggers.readings(few, manifest, t, kinds)] == [None, None, None]


# -- the delivery job against a receiver -------------------------------------------------------


@pytest.fixture()
def queue(database_url: str, tmp_path: Path) -> Any:
    upgrade(database_url)
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def _subscribe_directly(engine: Any, url: str, at: datetime) -> None:
    with Session(engine) as session:
        session.add(
            Webhook(
                url=url,
                events=["version.released"],
                secret="x" * 20,
                thresholds={},
                created_by="test",
                created_at=at,
            )
        )
        session.commit()


def _emit(engine: Any, at: datetime, version: str = "1") -> None:
    with Session(engine) as session:
        notify.emit(session, "version.released", {"model": "m", "version": version}, now=at)
        session.commit()


def test_deliveries_retry_with_the_same_id_and_bytes_until_a_2xx(queue: Any) -> None:
    receiver = Receiver(script=[503, 429, 200, 410]).start()
    settings = Settings(outbound_backoff_base_s=1, outbound_backoff_max_s=4)
    deliverer = Deliverer(queue, settings)
    t0 = datetime.now(UTC)
    try:
        _subscribe_directly(queue, receiver.url, t0)
        _emit(queue, t0)
        assert deliverer.run(now=t0) == 0  # 503: to be retried
        assert deliverer.run(now=t0) == 0  # not due yet
        assert deliverer.run(now=t0 + timedelta(seconds=10)) == 0  # 429
        assert deliverer.run(now=t0 + timedelta(seconds=20)) == 1  # 200
        _emit(queue, t0 + timedelta(seconds=25), version="2")
        assert deliverer.run(now=t0 + timedelta(seconds=30)) == 1  # 410: failed, not retried
        with Session(queue) as session:
            rows = list(session.exec(select(Outbound).order_by(col(Outbound.id))))
        assert [(r.state, r.attempts, r.last_status) for r in rows] == [
            ("delivered", 3, 200),
            ("failed", 1, 410),
        ]
        got = receiver.requests()
        assert len(got) == 4
        first = got[:3]
        assert {g.headers["X-EdgeFleet-Delivery-Id"] for g in first} == {rows[0].delivery_id}
        assert {g.body for g in first} == {rows[0].payload.encode()}
        assert got[3].headers["X-EdgeFleet-Delivery-Id"] == rows[1].delivery_id
        for g in got:
            assert g.headers["X-EdgeFleet-Event"] == "version.released"
            assert (
                signature.problem(
                    "x" * 20,
                    g.headers["X-EdgeFleet-Delivery-Id"],
                    g.headers["X-EdgeFleet-Timestamp"],
                    g.body,
                    g.headers["X-EdgeFleet-Signature"],
                    now=datetime.now(UTC).timestamp(),
                    max_age_s=300,
                )
                is None
            )
    finally:
        receiver.stop()


def test_a_down_destination_waits_its_turn_without_holding_up_others(queue: Any) -> None:
    receiver = Receiver().start()
    t0 = datetime.now(UTC)
    try:
        _subscribe_directly(queue, "http://127.0.0.1:9/nobody", t0)
        _subscribe_directly(queue, receiver.url, t0)
        for version in ("1", "2", "3"):
            _emit(queue, t0, version)
        deliverer = Deliverer(queue, Settings(outbound_backoff_base_s=1))
        assert deliverer.run(now=t0) == 3  # the receiver's three
        with Session(queue) as session:
            down = session.exec(select(Outbound).where(Outbound.webhook_id == 1)).all()
        # The first refused connection put the down subscription's other rows off to the next
        # round, unattempted.
        assert sorted(r.attempts for r in down) == [0, 0, 1]
        assert all(r.state == "pending" for r in down)
        assert len(receiver.requests()) == 3
    finally:
        receiver.stop()


def test_a_delivery_older_than_the_max_age_is_given_up(queue: Any) -> None:
    settings = Settings(outbound_backoff_base_s=1, outbound_max_age_s=60)
    t0 = datetime.now(UTC)
    _subscribe_directly(queue, "http://127.0.0.1:9/nobody", t0)
    _emit(queue, t0)
    deliverer = Deliverer(queue, settings)
    assert deliverer.run(now=t0) == 0
    assert deliverer.run(now=t0 + timedelta(seconds=120)) == 1
    with Session(queue) as session:
        row = session.exec(select(Outbound)).one()
    assert row.state == "failed" and row.attempts == 2
    assert row.last_error and row.last_error.startswith("gave up after 2 attempts: Connect")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"payload": b'{"kind":"rollout.halted"} '}, "does not match"),
        ({"delivery_id": "another"}, "does not match"),
        ({"secret": "y" * 20}, "does not match"),
        ({"timestamp": "1000"}, "from now"),
        ({"timestamp": "soon"}, "not Unix seconds"),
        ({"signature": "v0,abc"}, "no v1 signature"),
    ],
    ids=["payload", "delivery-id", "secret", "old", "not-a-number", "scheme"],
)
def test_a_changed_delivery_fails_its_signature(change: dict[str, Any], words: str) -> None:
    now = 1_800_000_000
    good: dict[str, Any] = {
        "secret": "x" * 20,
        "delivery_id": "d1",
        "timestamp": str(now),
        "payload": b'{"kind":"rollout.halted"}',
    }
    good["signature"] = signature.sign(good["secret"], good["delivery_id"], now, good["payload"])
    assert signature.problem(**good, now=now, max_age_s=300) is None
    rotated = {**good, "signature": "v1,AAAA " + good["signature"]}
    assert signature.problem(**rotated, now=now, max_age_s=300) is None
    problem = signature.problem(**{**good, **change}, now=now, max_age_s=300)
    assert problem is not None and words in problem


def test_the_migration_makes_the_tables_the_models_describe(queue: Any) -> None:
    mine = {"webhook", "outbound", "trigger_state"}
    with queue.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    about_mine = [d for d in diff if mine & set(_tables(d))]
    assert not about_mine, about_mine


def _tables(diff: Any) -> list[str]:
    """Table names an autogenerate diff entry touches."""
    found = []
    for part in diff if isinstance(diff, list) else [diff]:
        for item in part if isinstance(part, tuple) else [part]:
            name = getattr(item, "name", None)
            table = getattr(item, "table", None)
            if isinstance(item, str):
                found.append(item)
            if table is not None:
                found.append(table.name)
            elif name:
                found.append(name)
    return found
