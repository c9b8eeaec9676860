"""Check-in's write path under concurrency, on SQLite and PostgreSQL (where check-ins that arrive
together are coalesced into one statement): each is recorded and authenticated on its own."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

from sqlmodel import Session

from server.auth import hash_token
from server.checkin_store import Contact
from server.device_events import state_hash
from server.models import Device
from tests.server.conftest import Fleet


def contact(device_id: str, credential: str, seen: datetime, **extra: object) -> Contact:
    installed = [{"model": "m", "version": "1.0.0"}]
    return Contact(
        credential_hash=hash_token(credential),
        device_id=device_id,
        last_seen=seen,
        nonce=uuid.uuid4().hex,
        firmware_version="14.0.0",
        installed=installed,
        state_hash=state_hash("14.0.0", installed),
        **extra,  # type: ignore[arg-type]
    )


def test_concurrent_check_ins_are_each_recorded_and_authenticated(fleet: Fleet) -> None:
    credentials = {f"phone-{i}": fleet.enroll(f"phone-{i}") for i in range(6)}
    t0 = datetime.now(UTC).replace(microsecond=0)
    contacts = [
        contact(d, c, t0 + timedelta(seconds=i)) for i, (d, c) in enumerate(credentials.items())
    ]
    # The same device twice in one burst (its later contact wins), a wrong credential for a
    # real device, and a new free-flash figure for one device.
    contacts.append(contact("phone-0", credentials["phone-0"], t0 + timedelta(seconds=30)))
    contacts.append(contact("phone-1", "efd_not_the_credential", t0 + timedelta(seconds=40)))
    contacts.append(
        contact(
            "phone-2",
            credentials["phone-2"],
            t0 + timedelta(seconds=50),
            free_flash_bytes=12345,
            free_ram_bytes=678,
        )
    )
    store = fleet.state.check_in_store

    async def burst() -> list[object]:
        return list(await asyncio.gather(*(store.record(c) for c in contacts)))

    rows = fleet.client.portal.call(burst)  # type: ignore[union-attr]
    assert [r is not None for r in rows] == [True] * 6 + [True, False, True]
    assert {r.hardware_id for r in rows if r is not None} == {"phone-android"}
    assert rows[-1].free_flash_bytes == 12345  # type: ignore[union-attr]
    with Session(fleet.state.engine) as session:
        seen = {d: session.get(Device, d) for d in credentials}
        assert seen["phone-0"].last_seen.replace(tzinfo=UTC) == t0 + timedelta(seconds=30)  # type: ignore[union-attr]
        assert seen["phone-0"].last_nonce == contacts[6].nonce  # type: ignore[union-attr]
        # the wrong credential recorded nothing
        assert seen["phone-1"].last_nonce == contacts[1].nonce  # type: ignore[union-attr]
        assert seen["phone-2"].free_flash_bytes == 12345  # type: ignore[union-attr]
        assert seen["phone-2"].free_ram_bytes == 678  # type: ignore[union-attr]
        assert seen["phone-3"].installed == [{"model": "m", "version": "1.0.0"}]  # type: ignore[union-attr]
        assert seen["phone-4"].free_flash_bytes == 10**9  # type: ignore[union-attr]


def test_a_revoked_device_is_not_recorded(fleet: Fleet) -> None:
    credential = fleet.enroll("phone-1")
    r = fleet.client.post("/v1/devices/phone-1/revoke", headers=fleet.auth(fleet.token("operator")))
    assert r.status_code == 200
    store = fleet.state.check_in_store
    now = datetime.now(UTC)

    async def one() -> object:
        return await store.record(contact("phone-1", credential, now))

    assert fleet.client.portal.call(one) is None  # type: ignore[union-attr]
    assert fleet.check_in("phone-1", credential).status_code == 401


def test_check_in_records_commit_without_waiting_for_the_flush(fleet: Fleet) -> None:
    """Only the contact record's commits are asynchronous (PostgreSQL); telemetry appends and
    the ORM's stay synchronous (an answered upload survives a crash)."""
    stores = (fleet.state.check_in_store, fleet.state.ingest_store)
    if fleet.state.engine.dialect.name != "postgresql":
        assert not any(hasattr(s, "_pool") for s in stores)  # SQLite: local connections
        return

    async def settings() -> tuple[str, str, str]:
        found = []
        for store in stores:
            pool = await store._pool.get()
            async with pool.connection() as conn:
                row = await (await conn.execute("SHOW synchronous_commit")).fetchone()
            await store.close()
            found.append(row[0])
        with Session(fleet.state.engine) as session:
            orm = session.connection().exec_driver_sql("SHOW synchronous_commit").scalar()
        return found[0], found[1], orm

    assert asyncio.run(settings()) == ("off", "on", "on")
