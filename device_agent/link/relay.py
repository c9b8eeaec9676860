"""The phone's relay for its paired ring: assignments pushed over the link, telemetry pulled back.

A ring has no internet. Its phone checks in *for* it (the server accepts the phone's credential
for a ring it paired), verifies the ring's assignment set and bundles as a Primary (the phone's
pinned root, the ring's own release counters), pushes them over the link, and lets the ring
verify again as a Secondary. Telemetry goes the other way: the ring's window pieces are stored
in the phone's durable outbox, one batch per piece keyed by the ring's device id, boot epoch and
sequence number (so the server drops a piece it already has if the ring is read twice), and only
then acknowledged on the ring; they are uploaded as the phone's own batches are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from device_agent.client import FleetClient, resolve_url
from device_agent.errors import DownloadError, TrustError
from device_agent.fetch import BundleFetcher
from device_agent.link import model_group as mg
from device_agent.link.client import DeviceClient
from device_agent.link.errors import DeviceRejected
from device_agent.outbox import Outbox
from device_agent.telemetry_upload import upload_pending
from device_agent.trust import TrustedState
from firmware_bundles import TargetCatalogue, TrustedRoot
from firmware_bundles.messages import (
    Assignment,
    CapabilityReport,
    CheckInRequest,
    InstalledModel,
    SlotStatus,
    TelemetryBatch,
)

_SLOT_STATUS: dict[str, SlotStatus] = {
    "empty": "empty",
    "uploading": "installing",
    "uploaded": "installing",
    "corrupt": "installing",
    "testing": "self-test",
    "active": "active",
    "standby": "standby",
    "failed": "failed",
}
LastInstall = Literal["ok", "self-test-failed", "verify-failed", "download-failed"]


@dataclass
class RelayOutcome:
    """What one relay round did for the ring."""

    ring_id: str
    installed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    telemetry_queued: int = 0
    telemetry_uploaded: int = 0


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(kw_only=True, eq=False)
class RingRelay:
    """Serves one paired ring from its phone.

    Attributes:
        ring: A connected client of the ring's link.
        fleet: The phone's fleet client.
        credential: The phone's credential (the server accepts it for its paired ring).
        root: The phone's pinned root.
        fetcher: The phone's bundle fetcher.
        work_dir: Where partial downloads for the ring are kept.
        outbox: The phone's durable telemetry outbox, which keeps the ring's batches too.
        catalogue: Target catalogue (the packaged one by default).
        clock: The phone's clock.
    """

    ring: DeviceClient
    fleet: FleetClient
    credential: str
    root: TrustedRoot
    fetcher: BundleFetcher
    work_dir: Path
    outbox: Outbox
    catalogue: TargetCatalogue = field(default_factory=TargetCatalogue.load_default)
    clock: Callable[[], datetime] = _now
    _last: dict[str, tuple[LastInstall, str | None]] = field(default_factory=dict, init=False)

    async def enroll_ring(self, phone_id: str, enroll_token: str) -> str:
        """Enroll the ring through the phone (``relay-enroll``); returns the ring's id.

        Raises:
            ServerError: If the server refuses or cannot be reached.
            LinkError: If the ring does not answer.
        """
        identity = await self.ring.identity()
        await asyncio.to_thread(
            self.fleet.relay_enroll,
            self.credential,
            phone_id,
            enroll_token=enroll_token,
            device_id=identity.device_id,
            capabilities=self._capabilities(identity),
        )
        return identity.device_id

    async def sync(self) -> RelayOutcome:
        """Install what the server assigns the ring, then carry its telemetry to the server.

        Raises:
            ServerError: If the server cannot be reached (telemetry stays in the outbox).
            LinkError: If the ring stops answering.
        """
        outcome = await self.install_assigned()
        outcome.telemetry_queued = await self.pull_telemetry()
        outcome.telemetry_uploaded = await self.upload_telemetry()
        return outcome

    async def install_assigned(self) -> RelayOutcome:
        """Check in for the ring and install each assigned bundle it does not run yet."""
        identity = await self.ring.identity()
        slots = await self.ring.slots()
        outcome = RelayOutcome(identity.device_id)
        request = CheckInRequest(
            device_id=identity.device_id,
            nonce=identity.nonce,
            firmware_version=identity.firmware_version,
            installed=self._installed(slots),
            capabilities=self._capabilities(identity),
        )
        # The answer is the signed envelope; the ring gets the very bytes the server sent.
        envelope = await asyncio.to_thread(self.fleet.check_in, self.credential, request)
        state = TrustedState(self.root, slots.counters, self.catalogue)
        verified = state.verify_assignments(
            envelope,
            device_id=identity.device_id,
            hardware_id=identity.hardware_id,
            nonce=identity.nonce,
            now=self.clock(),
        )
        for assignment, refused in verified.refused:
            self._last[assignment.model] = ("verify-failed", str(refused))
            outcome.refused[f"{assignment.model} {assignment.version}"] = str(refused)
        running = _running_bundle_sha256(slots)
        for assignment in verified.assignments:
            label = f"{assignment.model} {assignment.version}"
            if assignment.bundle_sha256 == running:
                outcome.unchanged.append(label)
                continue
            try:
                bundle = await asyncio.to_thread(self._download, assignment)
                state.verify_bundle(
                    bundle,
                    assignment,
                    identity.hardware_id,
                    firmware_version=identity.firmware_version,
                    now=self.clock(),
                )
            except (DownloadError, TrustError) as exc:
                failed: LastInstall = (
                    "download-failed" if isinstance(exc, DownloadError) else "verify-failed"
                )
                self._last[assignment.model] = (failed, str(exc))
                outcome.refused[label] = str(exc)
                continue
            try:
                await self.ring.upload_model(bundle)
                await self.ring.activate(envelope)
                await self.ring.self_test()
            except DeviceRejected as exc:
                failed = (
                    "self-test-failed" if exc.rc == mg.ModelRc.SELFTEST_FAILED else "verify-failed"
                )
                self._last[assignment.model] = (failed, f"{exc.rc_name}: {exc.reason}")
                outcome.refused[label] = f"the ring refused: {exc.rc_name}: {exc.reason}"
                continue
            self._last[assignment.model] = ("ok", None)
            outcome.installed.append(label)
        return outcome

    def _download(self, assignment: Assignment) -> bytes:
        url = resolve_url(self.fleet.server_url, assignment.download_url)
        # The phone's credential goes only to the fleet server, never to a CDN in an assignment.
        same_origin = urlsplit(url)[:2] == urlsplit(self.fleet.server_url)[:2]
        headers = {"Authorization": f"Bearer {self.credential}"} if same_origin else None
        return self.fetcher.fetch(
            url,
            assignment.bundle_sha256,
            assignment.bundle_length,
            self.work_dir / "partial",
            headers=headers,
        )

    async def pull_telemetry(self) -> int:
        """Store the ring's window pieces durably in the outbox, then acknowledge them on the
        ring.

        Raises:
            OutboxError: If the outbox cannot be written (nothing is acknowledged).
            LinkError: If the ring stops answering.
        """
        stored = 0
        while True:
            read = await self.ring.read_telemetry()
            if not read.windows:
                return stored
            ring_id = read.windows[0][1].device_id
            for sequence, window in read.windows:
                self.outbox.put_relayed(
                    TelemetryBatch(
                        device_id=ring_id,
                        boot_epoch=read.boot_epoch,
                        sequence=sequence,
                        windows=[window],
                    )
                )
                stored += 1
            await self.ring.ack_telemetry(read.windows[-1][0])
            if not read.more:
                return stored

    async def upload_telemetry(self) -> int:
        """Send the relayed batches in the outbox with the phone's credential.

        Each is forgotten once the server has it (a replay of one it already has included); one
        it refuses as invalid will never be accepted and is dropped (counted in the outbox's
        stats).

        Returns:
            How many batches the server now has.

        Raises:
            ServerError: If the server cannot be reached or refuses otherwise; the rest stay in
                the outbox.
        """
        sent = 0
        for device_id in self.outbox.relayed_devices():
            result = await asyncio.to_thread(
                upload_pending, self.outbox, self.fleet, device_id, self.credential
            )
            sent += result.batches_sent
        return sent

    def _installed(self, slots: mg.SlotsResponse) -> list[InstalledModel]:
        active = next((s for s in slots.slots if s.slot == slots.active), None)
        if active is None or active.model is None:
            return []
        last, error = self._last.get(active.model, (None, None))
        return [
            InstalledModel(
                model=active.model,
                version=active.version,
                bundle_sha256=active.sha.hex() if active.sha else None,
                release_counter=active.release_counter or 0,
                active_slot="ab"[active.slot],
                slots={"ab"[s.slot]: _SLOT_STATUS.get(s.state, "failed") for s in slots.slots},
                last_install=last,
                last_error=error,
            )
        ]

    def _capabilities(self, identity: mg.IdentityResponse) -> CapabilityReport:
        return CapabilityReport.of_target(
            self.catalogue.get(identity.hardware_id),
            (identity.max_bundle_bytes, identity.ram_arena_bytes),
            identity.firmware_version,
            links=["ble"],
        )


def _running_bundle_sha256(slots: mg.SlotsResponse) -> str | None:
    active = next((s for s in slots.slots if s.slot == slots.active), None)
    if active is None or active.sha is None or not slots.confirmed:
        return None
    return active.sha.hex()
