"""Device events over real check-ins, on SQLite and PostgreSQL: recorded when what a device
reports changes (not at every check-in), listed newest first with a cursor, and a device's history
built from them."""

from __future__ import annotations

import hashlib
import json
import random
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlmodel import Session, select

from server import device_events, fleet_summary
from server.device_events import Assigned, Reported, changes
from server.models import DeviceEvent, DeviceState
from tests.server.conftest import Fleet
from tests.server.test_api import relay_enroll


def installed(sha: str, **entry: Any) -> dict[str, Any]:
    """A model as the agent reports it after installing ``sha`` into slot a."""
    return {
        "model": "wrist-activity",
        "version": "1.0.0",
        "bundle_sha256": sha,
        "release_counter": 1,
        "active_slot": "a",
        "slots": {"a": "active"},
        "last_install": "ok",
        **entry,
    }


def check_in(
    fleet: Fleet,
    device_id: str,
    credential: str,
    models: list[dict[str, Any]],
    firmware: str = "14.0.0",
) -> None:
    body = {
        "device_id": device_id,
        "nonce": uuid.uuid4().hex,
        "firmware_version": firmware,
        "installed": models,
    }
    r = fleet.client.post(
        f"/v1/devices/{device_id}/check-in", json=body, headers=fleet.auth(credential)
    )
    assert r.status_code == 200, r.text


def events(fleet: Fleet, device_id: str, **params: Any) -> list[dict[str, Any]]:
    r = fleet.client.get(
        f"/v1/devices/{device_id}/events", params=params, headers=fleet.auth(fleet.token("viewer"))
    )
    assert r.status_code == 200, r.text
    return r.json()["events"]  # type: ignore[no-any-return]


def details(event: dict[str, Any]) -> dict[str, Any]:
    """The details an event sets (the answer lists every field, unset ones null)."""
    return {k: v for k, v in event["details"].items() if v is not None}


def kinds(found: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    """(kind, outcome) of each event, oldest first."""
    return [(e["kind"], e["outcome"]) for e in reversed(found)]


def published(fleet: Fleet, *versions: str) -> dict[str, str]:
    """Publish each version for phone-android; release the last; their bundles' SHA-256s."""
    shas = {}
    for counter, version in enumerate(versions, 1):
        shas[version] = fleet.publish(fleet.bundle(version=version, counter=counter))["sha256"]
    fleet.release("wrist-activity", versions[-1])
    return shas


def test_the_same_state_five_times_is_one_event_and_a_new_outcome_another(fleet: Fleet) -> None:
    shas = published(fleet, "1.0.0", "1.1.0")
    credential = fleet.enroll("phone-1")
    running = installed(shas["1.0.0"])
    for _ in range(5):
        check_in(fleet, "phone-1", credential, [running])
    found = events(fleet, "phone-1")
    assert kinds(found) == [("enrolled", None), ("install", "ok")]
    install = found[0]
    assert (install["model"], install["version"], install["bundle_sha256"]) == (
        "wrist-activity",
        "1.0.0",
        shas["1.0.0"],
    )
    assert install["details"]["slot"] == "a" and install["details"]["release_counter"] == 1
    # The check-ins were recorded all the same: last seen moves on, events do not.
    device = fleet.client.get("/v1/devices/phone-1", headers=fleet.auth(fleet.admin)).json()
    assert device["last_seen"] is not None and device["installed"][0]["version"] == "1.0.0"

    failed = {
        **running,
        "slots": {"a": "active", "b": "failed"},
        "last_install": "self-test-failed",
        "last_error": "self-test vector 0 differs by 0.4",
    }
    for _ in range(3):
        check_in(fleet, "phone-1", credential, [failed])
    found = events(fleet, "phone-1")
    assert kinds(found)[2:] == [("install", "self-test-failed")]
    # The failure names what the server assigns (1.1.0), and what the device still runs.
    assert (found[0]["version"], found[0]["bundle_sha256"]) == ("1.1.0", shas["1.1.0"])
    assert details(found[0]) == {
        "error": "self-test vector 0 differs by 0.4",
        "running_version": "1.0.0",
    }


def test_install_switch_revert_and_firmware_each_recorded(fleet: Fleet) -> None:
    shas = published(fleet, "1.0.0", "1.1.0")
    credential = fleet.enroll("phone-1")
    v1 = installed(shas["1.0.0"])
    check_in(fleet, "phone-1", credential, [v1])
    v2 = installed(
        shas["1.1.0"],
        version="1.1.0",
        release_counter=2,
        active_slot="b",
        slots={"a": "standby", "b": "active"},
    )
    check_in(fleet, "phone-1", credential, [v2])
    # Back to the intact standby (a rollback), then a firmware update.
    back = {**v1, "slots": {"a": "active", "b": "standby"}}
    check_in(fleet, "phone-1", credential, [back])
    check_in(fleet, "phone-1", credential, [back], firmware="14.1.0")
    found = events(fleet, "phone-1")
    assert kinds(found) == [
        ("enrolled", None),
        ("install", "ok"),
        ("install", "ok"),
        ("switch", None),
        ("firmware", None),
    ]
    switch, upgrade = found[1], found[2]
    assert switch["version"] == "1.0.0" and details(switch) == {
        "slot": "a",
        "from_version": "1.1.0",
        "from_slot": "b",
    }
    assert upgrade["details"]["from_version"] == "1.0.0" and upgrade["details"]["slot"] == "b"
    assert details(found[0]) == {"from_firmware": "14.0.0", "to_firmware": "14.1.0"}


def test_paging_spans_and_refusals(fleet: Fleet) -> None:
    shas = published(fleet, "1.0.0")
    credential = fleet.enroll("phone-1")
    for error in range(5):  # five distinct failures: five events
        check_in(
            fleet,
            "phone-1",
            credential,
            [installed(shas["1.0.0"], last_install="download-failed", last_error=f"e{error}")],
        )
    viewer = fleet.auth(fleet.token("viewer"))
    pages, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        r = fleet.client.get("/v1/devices/phone-1/events", params=params, headers=viewer)
        assert r.status_code == 200, r.text
        pages.append([e["id"] for e in r.json()["events"]])
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    ids = [i for page in pages for i in page]
    assert [len(p) for p in pages] == [2, 2, 2, 1] and ids == sorted(ids, reverse=True)
    assert len(set(ids)) == 7  # enrolled, the first install, five failures
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert events(fleet, "phone-1", **{"from": tomorrow}) == []
    assert len(events(fleet, "phone-1", to=tomorrow)) == 7

    def status(path: str, headers: dict[str, str], **params: Any) -> tuple[int, str]:
        r = fleet.client.get(path, params=params, headers=headers)
        return r.status_code, r.json().get("detail", "")

    assert status("/v1/devices/phone-9/events", viewer) == (404, "no device phone-9")
    code, detail = status("/v1/devices/phone-1/events", viewer, cursor="99-1x")
    assert code == 422
    code, detail = status(
        "/v1/devices/phone-1/events", viewer, **{"from": tomorrow, "to": "2020-01-01"}
    )
    assert code == 400 and "must be before" in detail
    assert status("/v1/devices/phone-1/events", fleet.auth(credential))[0] == 403


def test_pairing_and_revocation_are_events_on_both_sides(fleet: Fleet) -> None:
    fleet.publish(fleet.bundle(target="ring-gen3"))
    fleet.release("wrist-activity", "1.0.0")
    phone = fleet.enroll("phone-1")
    assert relay_enroll(fleet, "phone-1", phone, "ring-1").status_code == 201
    # The phone checks in for its ring with a state the ring never reported: an event on the ring.
    check_in(fleet, "ring-1", phone, [], firmware="3.2.0")
    ring = events(fleet, "ring-1")
    assert kinds(ring) == [("enrolled", None), ("firmware", None)]
    assert ring[1]["details"]["relay_id"] == "phone-1"
    assert kinds(events(fleet, "phone-1")) == [("enrolled", None), ("paired", None)]
    assert details(events(fleet, "phone-1")[0]) == {"relayed_device_id": "ring-1"}
    r = fleet.client.post("/v1/devices/phone-1/revoke", headers=fleet.auth(fleet.token("operator")))
    assert r.status_code == 200
    assert kinds(events(fleet, "phone-1"))[-2:] == [("revoked", None), ("unpaired", None)]
    unpaired = events(fleet, "ring-1")[0]
    assert unpaired["kind"] == "unpaired" and details(unpaired) == {
        "relay_id": "phone-1",
        "reason": "relay revoked",
    }


def test_a_device_without_a_recorded_state_reports_once(fleet: Fleet) -> None:
    """As a device enrolled before migration 0004: its first check-in records what it runs."""
    shas = published(fleet, "1.0.0")
    credential = fleet.enroll("phone-1")
    with Session(fleet.state.engine) as session:
        session.delete(session.get(DeviceState, "phone-1"))
        session.commit()
    check_in(fleet, "phone-1", credential, [installed(shas["1.0.0"])])
    check_in(fleet, "phone-1", credential, [installed(shas["1.0.0"])])
    found = events(fleet, "phone-1")
    assert kinds(found) == [("enrolled", None), ("reported", None)]
    assert found[0]["details"]["firmware_version"] == "14.0.0"
    assert [m["version"] for m in found[0]["details"]["installed"]] == ["1.0.0"]


def test_two_check_ins_racing_with_one_change_record_it_once(fleet: Fleet) -> None:
    fleet.enroll("phone-1")
    reported = Reported("14.0.0", [installed("ab" * 32)])
    digest = device_events.state_hash(reported.firmware_version, reported.installed)
    with Session(fleet.state.engine) as session:  # no recorded state: both race on the insert
        session.delete(session.get(DeviceState, "phone-1"))
        session.commit()
    written: list[int] = []
    at = datetime.now(UTC)

    def record() -> None:
        rows = device_events.record_report(
            fleet.state.engine, "phone-1", "phone-android", reported, digest, at, {}
        )
        written.append(len(rows))

    threads = [threading.Thread(target=record) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(written) == [0, 1]
    with Session(fleet.state.engine) as session:
        stored = session.exec(select(DeviceEvent).where(DeviceEvent.kind == "reported")).all()
        assert len(stored) == 1


def test_history_shows_assignments_timeline_counts_and_pairing(fleet: Fleet) -> None:
    shas = published(fleet, "1.0.0")
    credential = fleet.enroll("phone-1")
    check_in(fleet, "phone-1", credential, [installed(shas["1.0.0"])])
    failed = installed(shas["1.0.0"], last_install="self-test-failed", last_error="vector 0")
    check_in(fleet, "phone-1", credential, [failed])
    r = fleet.client.get("/v1/devices/phone-1/history", headers=fleet.auth(fleet.token("viewer")))
    assert r.status_code == 200, r.text
    history = r.json()
    assert [(a["model"], a["version"], a["source"]) for a in history["assignments"]] == [
        ("wrist-activity", "1.0.0", "release")
    ]
    assert [e["kind"] for e in history["timeline"]] == ["enrolled", "install", "install"]
    assert (history["installs"], history["failed_installs"], history["selftest_failures"]) == (
        1,
        1,
        1,
    )
    assert history["pairing"] == {"relay_id": None, "relays_for": []}
    assert history["installed"][0]["last_install"] == "self-test-failed"
    assert history["last_telemetry"]["window_start"] is None
    missing = fleet.client.get("/v1/devices/nope/history", headers=fleet.auth(fleet.admin))
    assert missing.status_code == 404 and missing.json() == {"detail": "no device nope"}


SHA_A, SHA_B = "a" * 64, "b" * 64


def entry(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "version": "1.0.0", "bundle_sha256": SHA_A, "active_slot": "a", **fields}


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ([entry()], [entry()], []),
        ([], [entry()], [("install", "ok", "1.0.0")]),
        (
            [entry(slots={"a": "active"})],
            [entry(version="2.0.0", bundle_sha256=SHA_B, active_slot="b")],
            [("install", "ok", "2.0.0")],
        ),
        (
            [entry(active_slot="b", version="2.0.0", slots={"a": "standby", "b": "active"})],
            [entry(slots={"a": "active", "b": "failed"})],
            [("revert", None, "1.0.0")],
        ),
        (
            [entry(slots={"a": "active", "b": "self-test"})],
            [entry(slots={"a": "active", "b": "reverted"})],
            [("revert", None, "1.0.0")],
        ),
        (
            [entry(last_install="verify-failed", last_error="bad signature")],
            [entry(last_install="verify-failed", last_error="bad signature")],
            [],
        ),
        (
            [entry()],
            [entry(last_install="download-failed", last_error="stalled")],
            [("install", "download-failed", "3.0.0")],
        ),
        ([entry()], [], [("removed", None, "1.0.0")]),
        (
            [entry()],
            [entry(version=None, bundle_sha256=None, active_slot=None)],
            [("removed", None, "1.0.0")],
        ),
    ],
    ids=[
        "unchanged",
        "first install",
        "new bundle into the other slot",
        "active failed, back to standby",
        "trial interrupted",
        "the same failure again",
        "a new failure names the assignment",
        "model gone",
        "no active bundle",
    ],
)
def test_changes(
    before: list[dict[str, Any]], after: list[dict[str, Any]], expected: list[tuple[Any, ...]]
) -> None:
    found = changes(
        Reported("1.0.0", before), Reported("1.0.0", after), {"m": Assigned("3.0.0", SHA_B)}
    )
    assert [(c.kind, c.outcome, c.version) for c in found] == expected


def test_state_hash_ignores_model_order_but_not_an_error_text() -> None:
    a, b = entry(model="a"), entry(model="b")
    assert device_events.state_hash("1.0.0", [a, b]) == device_events.state_hash("1.0.0", [b, a])
    failed = entry(model="a", last_install="verify-failed", last_error="x")
    other = {**failed, "last_error": "y"}
    assert device_events.state_hash("1.0.0", [failed]) != device_events.state_hash("1.0.0", [other])
    assert device_events.state_hash("1.0.0", [a]) != device_events.state_hash("1.0.1", [a])


@pytest.mark.parametrize("seed", range(5))
def test_state_hash_is_the_hash_of_what_json_writes(seed: int) -> None:
    """Stored hashes were made from ``json.dumps``: the faster encoding must give the same ones,
    for any error text (escaped characters, DEL, non-ASCII) and any counter."""
    rng = random.Random(seed)
    awkward = 'ab"\\/\n\t\x01\x1f\x7f \u00e9\u4e2d\U0001f600'
    for _ in range(100):
        installed = [
            entry(
                model="".join(rng.choice(awkward) for _ in range(rng.randint(1, 8))),
                release_counter=rng.choice([0, 7, 2**40, 2**70]),
                last_install="verify-failed",
                last_error="".join(rng.choice(awkward) for _ in range(rng.randint(0, 30))),
            )
            for _ in range(rng.randint(0, 4))
        ]
        ordered = sorted(installed, key=lambda m: str(m.get("model")))
        text = json.dumps(["1.0.0", ordered], sort_keys=True, separators=(",", ":"))
        assert device_events.state_hash("1.0.0", installed) == (
            hashlib.sha256(text.encode()).hexdigest()
        )


def summary(fleet: Fleet, **params: Any) -> dict[str, Any]:
    r = fleet.client.get(
        "/v1/fleet/summary", params=params, headers=fleet.auth(fleet.token("viewer"))
    )
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_fleet_summary_counts_groups_versions_silence_and_outcomes(fleet: Fleet) -> None:
    shas = published(fleet, "1.0.0", "1.1.0")
    credentials = {d: fleet.enroll(d) for d in ("phone-1", "phone-2", "phone-3")}
    for device in ("phone-1", "phone-2"):
        check_in(fleet, device, credentials[device], [installed(shas["1.0.0"])])
    found = summary(fleet)
    assert [
        (g["hardware_id"], g["firmware_version"], g["devices"], g["silent"])
        for g in found["groups"]
    ] == [("phone-android", "14.0.0", 3, 1)]
    assert (found["devices"], found["silent"]) == (3, 1)
    assert [d["id"] for d in found["silent_devices"]] == ["phone-3"]  # never checked in
    assert [(v["version"], v["devices"]) for v in found["versions"]] == [("1.0.0", 2)]
    today = datetime.now(UTC).date().isoformat()
    assert found["install_outcomes"] == [{"day": today, "outcome": "ok", "count": 2}]
    upgraded = installed(shas["1.1.0"], version="1.1.0", release_counter=2)
    check_in(fleet, "phone-2", credentials["phone-2"], [upgraded])
    r = fleet.client.post("/v1/devices/phone-1/revoke", headers=fleet.auth(fleet.token("operator")))
    assert r.status_code == 200
    # Two days on, with a day's silence allowed: the revoked phone counts nowhere, and the
    # others are silent, the one never seen first.
    with Session(fleet.state.engine) as session:
        later = fleet_summary.summary(
            session, now=datetime.now(UTC) + timedelta(days=2), silent_after=timedelta(days=1)
        )
    assert [(v.version, v.devices) for v in later.versions] == [("1.1.0", 1)]
    assert (later.devices, later.silent) == (2, 2)
    assert [d.id for d in later.silent_devices] == ["phone-3", "phone-2"]
    assert summary(fleet)["install_outcomes"][0]["count"] == 3
    bad = fleet.client.get(
        "/v1/fleet/summary", params={"silent_after_h": 0}, headers=fleet.auth(fleet.admin)
    )
    assert bad.status_code == 422
