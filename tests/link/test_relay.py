"""The phone relaying for its ring: the real fleet server (in process, SQLite), an emulated ring
over the radio-paced Bumble link, and the phone's own fleet client, fetcher and pinned root.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import pytest
from sqlmodel import Session, select

from device_agent.client import FleetClient
from device_agent.config import AgentSettings
from device_agent.fetch import BundleFetcher
from device_agent.link import DeviceClient
from device_agent.link.ble import BumbleConnectionLink
from device_agent.link.relay import RingRelay
from device_agent.outbox import Outbox
from firmware_bundles import TrustedRoot
from firmware_bundles.messages import TelemetryBatch
from hil.ble_device import BleRing
from hil.device import EmulatedDevice
from hil.profiles import profile_for
from hil.samples import heldout, sample_bundle
from server.models import TelemetryBatchRecord
from tests.server.conftest import Fleet, running_fleet

SERVER = "http://testserver"


@pytest.fixture()
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with running_fleet(f"sqlite:///{tmp_path / 'fleet.db'}", tmp_path) as running:
        yield running


class Released(NamedTuple):
    """The sample ring bundle, published and released; the phone's credential; an enrollment
    token for the ring; the emulated ring (``ring-1``), not yet enrolled."""

    bundle: bytes
    phone: str
    token: str
    device: EmulatedDevice


@pytest.fixture()
def released(fleet: Fleet, tmp_path: Path) -> Released:
    bundle = sample_bundle([fleet.release_key], ["ring-gen3"])
    fleet.publish(bundle)
    fleet.release("wrist-activity", "1.0.0")
    confirmed = fleet.client.post(  # so the ring's floor rises once it ran it (docs/rollback.md)
        "/v1/models/wrist-activity/versions/1.0.0/confirm",
        headers=fleet.auth(fleet.token("operator")),
    )
    assert confirmed.status_code == 200, confirmed.text
    phone = fleet.enroll("phone-1")
    token = fleet.client.post(
        "/v1/enrollment-tokens", json={}, headers=fleet.auth(fleet.token("operator"))
    ).json()["token"]
    device = EmulatedDevice(
        profile_for("ring-gen3"), tmp_path / "ring.flash", fleet.root, device_id="ring-1"
    )
    return Released(bundle, phone, token, device)


@contextlib.asynccontextmanager
async def _ring_link(device: EmulatedDevice) -> AsyncIterator[DeviceClient]:
    """The ring served over the Bumble link, and a connected client to it."""
    ring = BleRing(device)
    await ring.start()
    try:
        client = DeviceClient(BumbleConnectionLink(await ring.connect()))
        await client.connect()
        yield client
    finally:
        await ring.stop()


def _outbox(tmp_path: Path) -> Outbox:
    """The phone's outbox (a SQLite file in its state dir), opened as at the phone's start."""
    return Outbox(tmp_path / "phone" / "outbox.sqlite", 1 << 20)


def _relay(
    fleet: Fleet, ring: DeviceClient, phone: str, tmp_path: Path, outbox: Outbox | None = None
) -> RingRelay:
    root_path = fleet.state.settings.data_dir / "root.json"
    settings = AgentSettings(
        server_url=SERVER,
        state_dir=tmp_path / "phone",
        root_path=root_path,
        hardware_id="phone-android",
        stall_timeout_s=5,
        max_download_attempts=1,
    )
    fleet_client = FleetClient(fleet.client, SERVER, tmp_path / "phone", timeout_s=5)
    return RingRelay(
        ring=ring,
        fleet=fleet_client,
        credential=phone,
        root=TrustedRoot.from_pinned(root_path.read_bytes(), datetime.now(UTC)),
        fetcher=BundleFetcher(fleet_client, settings),
        work_dir=tmp_path / "phone" / "ring",
        outbox=outbox or _outbox(tmp_path),
    )


def _inferences(fleet: Fleet) -> int:
    rows = fleet.client.get(
        "/v1/telemetry/rollups", headers=fleet.auth(fleet.token("viewer"))
    ).json()
    return sum(r["inference_count"] for r in rows if r["generation"] == "ring-gen3")


def test_phone_installs_its_rings_assignment_and_carries_telemetry_back(
    fleet: Fleet, released: Released, tmp_path: Path
) -> None:
    _, phone, token, device = released
    rows = heldout(5, seed=4)[0]

    async def scenario() -> None:
        async with _ring_link(device) as client:
            relay = _relay(fleet, client, phone, tmp_path)
            assert await relay.enroll_ring("phone-1", token) == "ring-1"

            first = await relay.sync()
            assert first.installed == ["wrist-activity 1.0.0"] and not first.refused
            slots = await client.slots()
            assert slots.confirmed and slots.counters == {"wrist-activity": 1}

            for row in rows:
                await client.infer({"input": row[None, :]})
            second = await relay.sync()
            assert second.unchanged == ["wrist-activity 1.0.0"] and not second.installed
            assert second.telemetry_queued == 1 and second.telemetry_uploaded == 1
            assert _inferences(fleet) == len(rows)
            assert (await client.read_telemetry()).windows == [], "acknowledged on the ring"

            # The same piece queued again (the ring was read twice): the server drops it.
            batch = TelemetryBatch(
                device_id="ring-1",
                boot_epoch=device.record.boot_epoch,
                sequence=1,
                windows=[],
            )
            relay.outbox.put_relayed(batch)
            assert await relay.upload_telemetry() == 1
            assert _inferences(fleet) == len(rows)

    asyncio.run(scenario())


def test_a_bundle_the_phone_cannot_verify_never_reaches_the_ring(
    fleet: Fleet, released: Released, tmp_path: Path
) -> None:
    bundle, phone, token, device = released
    # The server's blob store is corrupted: the download no longer matches the assignment.
    blobs = list((fleet.state.settings.data_dir).rglob("*"))
    stored = next(p for p in blobs if p.is_file() and p.read_bytes() == bundle)
    stored.write_bytes(bundle[:-1] + bytes([bundle[-1] ^ 1]))

    async def scenario() -> None:
        async with _ring_link(device) as client:
            relay = _relay(fleet, client, phone, tmp_path)
            await relay.enroll_ring("phone-1", token)
            outcome = await relay.install_assigned()
            assert not outcome.installed
            assert "SHA-256" in outcome.refused["wrist-activity 1.0.0"]
            assert device.store.stats.upload_sessions == 0
            assert (await client.slots()).active is None

    asyncio.run(scenario())


def _server_batches(fleet: Fleet, device_id: str) -> list[tuple[int, int, int]]:
    """(boot epoch, sequence, windows) of every batch the server accepted for ``device_id``."""
    with Session(fleet.state.engine) as session:
        rows = session.exec(
            select(TelemetryBatchRecord).where(TelemetryBatchRecord.device_id == device_id)
        ).all()
    return sorted((r.boot_epoch, r.sequence, r.window_count) for r in rows)


def test_the_rings_telemetry_survives_a_phone_restart_in_the_outbox_with_the_rings_keys(
    fleet: Fleet, released: Released, tmp_path: Path
) -> None:
    """Pulled from the ring and acknowledged there, then the phone restarts before it is online:
    the pieces are in the phone's SQLite outbox, go up after the restart under the ring's own id,
    boot epoch and sequence numbers, and a piece stored again is a replay the server drops."""
    _, phone, token, device = released
    rows = heldout(7, seed=5)[0]

    async def scenario() -> None:
        async with _ring_link(device) as client:
            before = _relay(fleet, client, phone, tmp_path)
            await before.enroll_ring("phone-1", token)
            assert (await before.install_assigned()).installed == ["wrist-activity 1.0.0"]
            for row in rows:
                await client.infer({"input": row[None, :]})
            on_ring = await client.read_telemetry()  # read, not acknowledged: the ring's keys
            keys = [(on_ring.boot_epoch, sequence) for sequence, _ in on_ring.windows]
            assert keys

            assert await before.pull_telemetry() == len(keys)
            assert (await client.read_telemetry()).windows == [], "acknowledged on the ring"
            before.outbox.close()  # the phone restarts before it reaches the server

            reopened = _outbox(tmp_path)
            assert reopened.stats()["pending_batches"] == len(keys)
            after = _relay(fleet, client, phone, tmp_path, reopened)
            assert await after.upload_telemetry() == len(keys)
            assert _server_batches(fleet, "ring-1") == [(e, s, 1) for e, s in keys]
            assert reopened.boot_epoch not in {e for e, _ in keys}, "not the phone's epoch"
            assert _inferences(fleet) == len(rows)
            assert reopened.stats()["pending_batches"] == 0

            # The ring read twice (its acknowledgement lost): stored again, sent, dropped.
            replay = TelemetryBatch(
                device_id="ring-1", boot_epoch=keys[0][0], sequence=keys[0][1], windows=[]
            )
            reopened.put_relayed(replay)
            assert await after.upload_telemetry() == 1
            assert _server_batches(fleet, "ring-1") == [(e, s, 1) for e, s in keys]
            assert _inferences(fleet) == len(rows)
            reopened.close()

    asyncio.run(scenario())
