"""Confirming a version (docs/rollback.md) on SQLite and PostgreSQL: what each check-in answer
then names, and the refusals, with nothing written."""

from __future__ import annotations

from typing import Any

import pytest
from sqlmodel import Session, select

from server.confirmations import ConfirmedCounters, confirmed_counter
from server.models import Confirmation
from tests.server.conftest import Fleet

MODEL = "wrist-activity"


def _entry(fleet: Fleet, device_id: str, credential: str) -> dict[str, Any]:
    firmware = "3.1.0" if device_id.startswith("ring") else "14.0.0"
    r = fleet.check_in(device_id, credential, firmware=firmware)
    assert r.status_code == 200, r.text
    (entry,) = r.json()["signed"]["bundles"]
    return entry  # type: ignore[no-any-return]


def _confirm(fleet: Fleet, version: str, body: Any = None, role: str = "operator") -> Any:
    return fleet.client.post(
        f"/v1/models/{MODEL}/versions/{version}/confirm",
        json=body,
        headers=fleet.auth(fleet.token(role)),
    )


def test_a_release_does_not_confirm_and_a_confirmation_reaches_the_next_check_in(
    fleet: Fleet,
) -> None:
    fleet.publish(fleet.bundle(version="1.0.0", counter=1))
    fleet.publish(fleet.bundle(version="2.0.0", counter=2))
    fleet.publish(fleet.bundle(target="ring-gen3", version="2.0.0", counter=2))
    fleet.release(MODEL, "1.0.0")
    phone = fleet.enroll("phone-1")
    ring = fleet.enroll("ring-1", target="ring-gen3")
    assert "confirmed_release_counter" not in _entry(fleet, "phone-1", phone)

    r = _confirm(fleet, "1.0.0")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "model": MODEL,
        "version": "1.0.0",
        "release_counter": 1,
        "confirmed_for": ["phone-android"],
        "confirmed_by": "operator",
    }
    assert _entry(fleet, "phone-1", phone)["confirmed_release_counter"] == 1

    fleet.release(MODEL, "2.0.0")
    entry = _entry(fleet, "phone-1", phone)
    assert (entry["version"], entry["confirmed_release_counter"]) == ("2.0.0", 1)
    assert "confirmed_release_counter" not in _entry(fleet, "ring-1", ring)

    r = _confirm(fleet, "2.0.0", {"hardware_id": "ring-gen3"})
    assert r.status_code == 200 and r.json()["confirmed_for"] == ["ring-gen3"]
    assert _entry(fleet, "ring-1", ring)["confirmed_release_counter"] == 2
    assert _entry(fleet, "phone-1", phone)["confirmed_release_counter"] == 1


def test_rollout_scoped_confirmations_count_only_for_its_members() -> None:
    counters = ConfirmedCounters({MODEL: 1}, {MODEL: ((7, 3),)})
    assert confirmed_counter(counters, MODEL, "phone-android", "phone-1") == 1
    member = lambda rollout_id, device_id: (rollout_id, device_id) == (7, "phone-1")  # noqa: E731
    assert confirmed_counter(counters, MODEL, "phone-android", "phone-1", member) == 3
    assert confirmed_counter(counters, MODEL, "phone-android", "phone-2", member) == 1
    assert confirmed_counter(counters, "other", "phone-android", "phone-1", member) == 0


BAD = [
    ("unknown-version", "9.9.9", None, "operator", 404, "no version 9.9.9 of model"),
    ("withdrawn-version", "2.0.0", None, "operator", 409, "2.0.0 is withdrawn"),
    ("unknown-hardware-id", "1.0.0", {"hardware_id": "toaster-9"}, "operator", 400, "toaster-9"),
    ("no-bundle-for-it", "1.0.0", {"hardware_id": "ring-gen3"}, "operator", 409, "no bundle"),
    ("unknown-field", "1.0.0", {"hardware": "phone-android"}, "operator", 422, "hardware"),
    ("viewer", "1.0.0", None, "viewer", 403, "may not operate"),
    ("publisher", "1.0.0", None, "publisher", 403, "may not operate"),
]


@pytest.mark.parametrize(
    ("version", "body", "role", "status", "reason"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_confirmations_are_refused_and_write_nothing(
    fleet: Fleet, version: str, body: Any, role: str, status: int, reason: str
) -> None:
    fleet.publish(fleet.bundle(version="1.0.0", counter=1))
    fleet.publish(fleet.bundle(version="2.0.0", counter=2))
    op = fleet.auth(fleet.token("operator"))
    fleet.client.post(f"/v1/models/{MODEL}/versions/2.0.0/withdraw", headers=op)
    r = _confirm(fleet, version, body, role)
    assert r.status_code == status, r.text
    assert reason in str(r.json()["detail"])
    with Session(fleet.state.engine) as session:
        assert session.exec(select(Confirmation)).all() == []
