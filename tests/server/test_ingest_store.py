"""Telemetry ingest's store under concurrency, on SQLite and PostgreSQL: uploads that arrive
together share one append, yet each is stored exactly once, replays store nothing, and one
upload the database refuses fails alone."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import pytest
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session, select

from firmware_bundles.messages import TelemetryBatch
from server.auth import hash_token
from server.models import Device, TelemetryBatchCount, TelemetryBatchRecord, TelemetryWindowRecord
from server.telemetry import Upload, upload_of
from tests.server.conftest import Fleet
from tests.server.test_api import relay_enroll
from tests.server.windows import batch_text, steady_window


def upload(
    device_id: str, sequence: int, windows: int = 2, hardware_id: str = "phone-android"
) -> Upload:
    days = [f"2026-03-0{1 + w % 7}T10:00:00+00:00" for w in range(windows)]
    body = batch_text(
        device_id,
        [
            steady_window(device_id, "a" * 64, model="m", version="1.0.0", window_start=day, n=5)
            for day in days
        ],
        sequence=sequence,
    )
    return upload_of(device_id, hardware_id, TelemetryBatch.from_bytes(body.encode()))


def stored(fleet: Fleet) -> dict[str, Any]:
    with Session(fleet.state.engine) as session:
        batches = session.exec(select(TelemetryBatchRecord)).all()
        windows = session.exec(select(TelemetryWindowRecord)).all()
        counts = session.exec(select(TelemetryBatchCount)).all()
    per_batch: dict[tuple[str, int], int] = {}
    ids = {b.id: (b.device_id, b.sequence) for b in batches}
    for w in windows:
        per_batch[ids[w.batch_id]] = per_batch.get(ids[w.batch_id], 0) + 1
    return {
        "windows per batch": per_batch,
        "counts": {(c.device_id, c.boot_epoch): (c.received, c.top_sequence) for c in counts},
        "hardware ids": {(c.device_id, c.boot_epoch): c.hardware_id for c in counts},
    }


def test_uploads_arriving_together_are_each_stored_once(fleet: Fleet) -> None:
    for i in range(4):
        fleet.enroll(f"phone-{i}")
    store = fleet.state.ingest_store
    earlier = upload("phone-0", 0)
    assert fleet.client.portal.call(store.append, earlier) is True  # type: ignore[union-attr]
    ios = "phone-ios"  # phone-3's uploads name another hardware id: its counts keep it
    burst = [
        upload(f"phone-{i}", 1, windows=1 + i, hardware_id=ios if i == 3 else "phone-android")
        for i in range(4)
    ]
    burst.append(upload("phone-1", 1, windows=2))  # the same key again, in one burst
    burst.append(upload("phone-0", 0))  # a replay of a stored batch
    burst.append(upload("phone-2", 7, windows=3))

    async def together() -> list[bool]:
        return list(await asyncio.gather(*(store.append(u) for u in burst)))

    results = fleet.client.portal.call(together)  # type: ignore[union-attr]
    assert results == [True, True, True, True, False, False, True]
    found = stored(fleet)
    assert found["windows per batch"] == {
        ("phone-0", 0): 2,
        ("phone-0", 1): 1,
        ("phone-1", 1): 2,
        ("phone-2", 1): 3,
        ("phone-2", 7): 3,
        ("phone-3", 1): 4,
    }
    # Batches received and the highest sequence, per device and boot epoch: replays count none.
    assert found["counts"] == {
        ("phone-0", 1): (2, 1),
        ("phone-1", 1): (1, 1),
        ("phone-2", 1): (2, 7),
        ("phone-3", 1): (1, 1),
    }
    assert found["hardware ids"] == {
        **{(f"phone-{i}", 1): "phone-android" for i in range(3)},
        ("phone-3", 1): "phone-ios",
    }


def test_an_upload_the_database_refuses_fails_alone(fleet: Fleet) -> None:
    for i in range(3):
        fleet.enroll(f"phone-{i}")
    store = fleet.state.ingest_store
    good = [upload(f"phone-{i}", 0) for i in range(3)]
    bad = upload("phone-1", 5)
    bad.windows[1]["hardware_id"] = None  # NOT NULL: only the database can refuse this one

    async def together() -> list[object]:
        return list(
            await asyncio.gather(
                *(store.append(u) for u in [good[0], bad, good[1], good[2], bad]),
                return_exceptions=True,
            )
        )

    results = fleet.client.portal.call(together)  # type: ignore[union-attr]
    assert results[0] is True and results[2] is True and results[3] is True
    assert isinstance(results[1], DBAPIError)
    assert isinstance(results[4], DBAPIError)  # its copy in the same burst is no "replay"
    found = stored(fleet)
    assert found["windows per batch"] == {(f"phone-{i}", 0): 2 for i in range(3)}
    assert ("phone-1", 5) not in found["windows per batch"]  # nothing of it, not even its record
    assert found["counts"][("phone-1", 1)] == (1, 0)


@pytest.mark.parametrize("revoke", ["none", "ring", "phone"])
def test_who_may_upload_for_a_device(fleet: Fleet, revoke: str) -> None:
    phone = fleet.enroll("phone-1")
    stranger = fleet.enroll("phone-2")
    assert relay_enroll(fleet, "phone-1", phone, "ring-1").status_code == 201
    if revoke != "none":
        with Session(fleet.state.engine) as session:
            device = session.get(Device, "ring-1" if revoke == "ring" else "phone-1")
            assert device is not None
            device.revoked = True
            session.add(device)
            session.commit()
    store = fleet.state.ingest_store

    def who(credential: str, device_id: str) -> str | None:
        return fleet.client.portal.call(  # type: ignore[union-attr,no-any-return]
            store.device, hash_token(credential), device_id
        )

    phone_ok = revoke == "none"
    assert who(phone, "phone-1") == ("phone-android" if revoke != "phone" else None)
    assert who(phone, "ring-1") == ("ring-gen3" if phone_ok else None)  # its relay
    assert who(stranger, "ring-1") is None  # not its relay
    assert who(stranger, "phone-1") is None  # another device
    assert who("efd_not_a_credential", "phone-1") is None
    assert who(phone, "no-such-device") is None


def test_refusals_name_the_reason_over_http(fleet: Fleet) -> None:
    phone = fleet.enroll("phone-1")
    stranger = fleet.enroll("phone-2")
    body = b'{"device_id":"phone-1","boot_epoch":1,"sequence":0,"windows":[]}'

    def post(credential: str, device_id: str = "phone-1") -> tuple[int, str]:
        r = fleet.client.post(
            f"/v1/devices/{device_id}/telemetry", content=body, headers=fleet.auth(credential)
        )
        return r.status_code, r.json()["detail"] if r.status_code != 200 else ""

    assert post(phone) == (200, "")
    assert post("efd_wrong") == (401, "a valid device credential is required")
    assert post(stranger) == (403, "device phone-2 may not act for device phone-1")
    assert post(phone, "phone-2") == (403, "device phone-1 may not act for device phone-2")


def test_uploads_making_new_day_partitions_at_once_all_land(fleet: Fleet) -> None:
    """Each upload names a day no partition holds yet while others append (PostgreSQL makes the
    partitions then; a create that took its locks in another order than the appends deadlocked
    with them)."""
    for i in range(8):
        fleet.enroll(f"phone-{i}")
    store = fleet.state.ingest_store
    uploads = []
    for n in range(48):
        u = upload(f"phone-{n % 8}", n, windows=1)
        day = date(2026, 4, 1) + timedelta(days=n)
        u.windows[0]["window_start"] = datetime.combine(day, time(10), UTC)
        uploads.append(u)

    async def together() -> list[object]:
        return list(await asyncio.gather(*(store.append(u) for u in uploads)))

    assert fleet.client.portal.call(together) == [True] * 48  # type: ignore[union-attr]
    assert len(stored(fleet)["windows per batch"]) == 48
