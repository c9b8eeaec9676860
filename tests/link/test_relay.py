"""The phone relaying for its ring: the real fleet server (in process, SQLite), an emulated ring
over the radio-paced Bumble link, and the phone's own fleet client, fetcher and pinned root.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from device_agent.client import FleetClient
from device_agent.config import AgentSettings
from device_agent.fetch import BundleFetcher
from device_agent.link import DeviceClient
from device_agent.link.ble import BumbleConnectionLink
from device_agent.link.relay import RelayQueue, RingRelay
from firmware_bundles import TrustedRoot
from firmware_bundles.messages import TelemetryBatch
from hil.ble_device import BleRing
from hil.device import EmulatedDevice
from hil.profiles import profile_for
from hil.samples import heldout, sample_bundle
from tests.server.conftest import Fleet, running_fleet

SERVER = "http://testserver"


@pytest.fixture()
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with running_fleet(f"sqlite:///{tmp_path / 'fleet.db'}", tmp_path) as running:
        yield running


def _relay(fleet: Fleet, ring: DeviceClient, phone: str, tmp_path: Path) -> RingRelay:
    root_path = fleet.state.settings.data_dir / "root.json"
    settings = AgentSettings(
        server_url=SERVER,
        state_dir=tmp_path / "phone",
        root_path=root_path,
        target_id="phone-android",
        stall_timeout_s=5,
        max_download_attempts=1,
    )
    return RingRelay(
        ring=ring,
        fleet=FleetClient(fleet.client, SERVER, tmp_path / "phone", timeout_s=5),
        credential=phone,
        root=TrustedRoot.from_pinned(root_path.read_bytes(), datetime.now(UTC)),
        fetcher=BundleFetcher(fleet.client, settings),
        work_dir=tmp_path / "phone" / "ring",
        queue=RelayQueue(tmp_path / "phone" / "ring-telemetry"),
    )


def _inferences(fleet: Fleet) -> int:
    rows = fleet.client.get(
        "/v1/telemetry/rollups", headers=fleet.auth(fleet.token("viewer"))
    ).json()
    return sum(r["inference_count"] for r in rows if r["generation"] == "ring-gen3")


def test_phone_installs_its_rings_assignment_and_carries_telemetry_back(
    fleet: Fleet, tmp_path: Path
) -> None:
    bundle = sample_bundle([fleet.release_key], ["ring-gen3"])
    fleet.publish(bundle)
    fleet.release("wrist-activity", "1.0.0")
    phone = fleet.enroll("phone-1")
    token = fleet.client.post(
        "/v1/enrollment-tokens", json={}, headers=fleet.auth(fleet.token("operator"))
    ).json()["token"]
    device = EmulatedDevice(
        profile_for("ring-gen3"), tmp_path / "ring.flash", fleet.root, device_id="ring-1"
    )
    rows = heldout(5, seed=4)[0]

    async def scenario() -> None:
        ring = BleRing(device)
        await ring.start()
        try:
            client = DeviceClient(BumbleConnectionLink(await ring.connect()))
            await client.connect()
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
            relay.queue.put(batch)
            assert await relay.upload_telemetry() == 1
            assert _inferences(fleet) == len(rows)
        finally:
            await ring.stop()

    asyncio.run(scenario())


def test_a_bundle_the_phone_cannot_verify_never_reaches_the_ring(
    fleet: Fleet, tmp_path: Path
) -> None:
    bundle = sample_bundle([fleet.release_key], ["ring-gen3"])
    fleet.publish(bundle)
    fleet.release("wrist-activity", "1.0.0")
    phone = fleet.enroll("phone-1")
    token = fleet.client.post(
        "/v1/enrollment-tokens", json={}, headers=fleet.auth(fleet.token("operator"))
    ).json()["token"]
    device = EmulatedDevice(
        profile_for("ring-gen3"), tmp_path / "ring.flash", fleet.root, device_id="ring-1"
    )
    # The server's blob store is corrupted: the download no longer matches the assignment.
    blobs = list((fleet.state.settings.data_dir).rglob("*"))
    stored = next(p for p in blobs if p.is_file() and p.read_bytes() == bundle)
    stored.write_bytes(bundle[:-1] + bytes([bundle[-1] ^ 1]))

    async def scenario() -> None:
        ring = BleRing(device)
        await ring.start()
        try:
            client = DeviceClient(BumbleConnectionLink(await ring.connect()))
            await client.connect()
            relay = _relay(fleet, client, phone, tmp_path)
            await relay.enroll_ring("phone-1", token)
            outcome = await relay.install_assigned()
            assert not outcome.installed
            assert "SHA-256" in outcome.refused["wrist-activity 1.0.0"]
            assert device.store.stats.upload_sessions == 0
            assert (await client.slots()).active is None
        finally:
            await ring.stop()

    asyncio.run(scenario())
