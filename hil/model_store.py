"""The emulated device's two model slots: upload sessions, activation, confirm and revert.

Every state change is one record write (:mod:`hil.record`), ordered so a power cut between any
two flash writes leaves the previous model running after the next boot: a new upload only ever
touches the inactive slot, activation marks the new slot "testing" with the old one as fallback,
and a boot that finds a slot still testing reverts to the fallback.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from device_agent.link.model_group import ModelRc
from firmware_bundles import ArchiveError, Manifest, SchemaError, open_bundle
from hil.errors import Refusal
from hil.flash import Flash
from hil.micro_runtime import MicroRuntime, load_runtime
from hil.record import DeviceRecord, SlotRecord, save_record
from hil.secondary import Verified
from hil.tflm_runtime import TflmRuntime

SLOT_REGIONS = ("model-0", "model-1")


@dataclass
class UploadSession:
    """An upload in progress into the inactive slot (RAM only: gone after a reboot)."""

    slot: int
    bundle_sha256: bytes
    length: int
    off: int = 0
    match: bool | None = None
    _hasher: Any = field(default_factory=hashlib.sha256)

    @property
    def complete(self) -> bool:
        return self.off == self.length


@dataclass
class StoreStats:
    """Counters a test or the rig can read (never sent to clients)."""

    upload_sessions: int = 0
    resumed_sessions: int = 0
    upload_bytes_written: int = 0


@dataclass
class Running:
    """The active model, loaded."""

    slot: int
    manifest: Manifest
    bundle_sha256: str
    runtime: MicroRuntime | TflmRuntime


class ModelStore:
    """Slots of one emulated device.

    Args:
        flash: The device's flash.
        record: Its persistent record (saved through :func:`hil.record.save_record`).
        slot_bytes: Capacity of each slot: the target's bundle budget.
        arena_bytes: The tensor arena the runtime gets: the target's RAM budget.
    """

    def __init__(
        self, flash: Flash, record: DeviceRecord, slot_bytes: int, arena_bytes: int
    ) -> None:
        self.flash = flash
        self.arena_bytes = arena_bytes
        self.record = record
        self.slot_bytes = slot_bytes
        self.session: UploadSession | None = None
        self.running: Running | None = None
        self.stats = StoreStats()

    # --- boot ---------------------------------------------------------------------------

    def boot(self) -> None:
        """Recover from an interrupted install, then load the active model."""
        record = self.record
        if record.active is not None and not record.confirmed:
            self._revert(f"slot {record.active} was never confirmed")
        elif record.active is not None:
            self._run_active()

    def _run_active(self) -> None:
        """Load the active slot; a slot that no longer verifies is marked failed."""
        record = self.record
        assert record.active is not None
        try:
            self.running = self._load(record.active)
        except Refusal:
            self.running = None
            record.slots[record.active].state = "failed"
            record.active = None
            save_record(self.flash, record)

    def _load(self, slot: int) -> Running:
        info = self.record.slots[slot]
        data = self.staged_bytes(slot, info.length)
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256:
            raise Refusal(ModelRc.HASH_MISMATCH, f"slot {slot} no longer matches its sha256")
        try:
            contents = open_bundle(data)
        except (ArchiveError, SchemaError) as exc:
            raise Refusal(ModelRc.BUNDLE_INVALID, f"slot {slot}: {exc}") from exc
        manifest = contents.manifest
        model = bytes(contents.files[manifest.runtime.model_file])
        runtime = load_runtime(manifest, model, self.arena_bytes)
        return Running(slot, manifest, digest, runtime)

    # --- upload -------------------------------------------------------------------------

    @property
    def inactive(self) -> int:
        return 0 if self.record.active is None else 1 - self.record.active

    def upload(
        self, off: int, data: bytes, length: int | None, bundle_sha256: bytes | None
    ) -> dict[str, Any]:
        """Apply one upload request; returns the response fields.

        Raises:
            Refusal: TOO_LARGE, BUSY, NO_SESSION, BAD_REQUEST.
            PowerCut: If the power goes at a flash write.
        """
        if off == 0:
            started = self._start(data, length, bundle_sha256)
            if started is not None:
                return started
        session = self.session
        if session is None:
            raise Refusal(ModelRc.NO_SESSION, "no upload in progress; start at offset 0")
        if session.complete:
            return {"off": session.length, "match": session.match}
        if off != session.off:
            return {"off": session.off}
        if off + len(data) > session.length:
            raise Refusal(
                ModelRc.BAD_REQUEST,
                f"{len(data)} bytes at {off} run past the bundle's {session.length}",
            )
        if data:
            self.flash.write(SLOT_REGIONS[session.slot], off, data)
            session._hasher.update(data)
            session.off += len(data)
            self.stats.upload_bytes_written += len(data)
        if session.complete:
            session.match = session._hasher.digest() == session.bundle_sha256
            return {"off": session.off, "match": session.match}
        return {"off": session.off}

    def _start(
        self, data: bytes, length: int | None, bundle_sha256: bytes | None
    ) -> dict[str, Any] | None:
        """Resume or start a session at offset 0; None means "write ``data`` now"."""
        if length is None or bundle_sha256 is None or len(bundle_sha256) != 32:
            raise Refusal(ModelRc.BAD_REQUEST, "offset 0 needs len and a 32-byte sha")
        current = self.session
        # A finished upload that did not match its SHA-256 is never resumed: it starts over.
        resumable = current is not None and not (current.complete and not current.match)
        if (
            resumable
            and current is not None
            and (current.bundle_sha256, current.length) == (bundle_sha256, length)
        ):
            if current.off > 0:
                self.stats.resumed_sessions += 1
            if current.complete:
                return {"off": current.length, "match": current.match}
            return {"off": current.off} if current.off > 0 else None
        if length <= 0:
            raise Refusal(ModelRc.BAD_REQUEST, "len must be positive")
        if length > self.slot_bytes:
            raise Refusal(
                ModelRc.TOO_LARGE,
                f"bundle is {length} bytes, over the {self.slot_bytes} byte budget by"
                f" {length - self.slot_bytes}",
            )
        slot = self.inactive
        if not self.record.confirmed and slot == self.record.fallback:
            raise Refusal(ModelRc.BUSY, f"slot {slot} is the fallback of an unconfirmed activation")
        self.session = None
        if self.record.slots[slot].state != "empty":
            self.record.slots[slot] = SlotRecord()
            save_record(self.flash, self.record)
        self.flash.erase(SLOT_REGIONS[slot])
        self.session = UploadSession(slot, bundle_sha256, length)
        self.stats.upload_sessions += 1
        return None

    # --- activation ---------------------------------------------------------------------

    def staged(self) -> bytes:
        """The completed upload's bytes, re-read from flash; with no upload session, the
        standby slot's bytes (going back to the previous model without an upload).

        Raises:
            Refusal: NO_BUNDLE if nothing complete is staged and the inactive slot is not a
                standby.
        """
        session = self.session
        if session is None:
            standby = self.record.slots[self.inactive]
            if standby.state == "standby" and standby.length > 0:
                return self.staged_bytes(self.inactive, standby.length)
        if session is None or not session.complete or session.slot != self.inactive:
            raise Refusal(
                ModelRc.NO_BUNDLE, "no completed upload and no standby model in the inactive slot"
            )
        return self.staged_bytes(session.slot, session.length)

    def staged_bytes(self, slot: int, length: int) -> bytes:
        return self.flash.read(SLOT_REGIONS[slot], 0, length)

    def activate(self, verified: Verified) -> dict[str, Any]:
        """Switch to the verified staged bundle (or the standby slot), unconfirmed, the old
        slot as fallback, keeping the counters the verification heard."""
        slot = self.inactive if self.session is None else self.session.slot
        assignment = verified.assignment
        record = self.record
        record.keep(verified.counters)
        previous = record.active
        record.slots[slot] = SlotRecord(
            state="testing",
            model=assignment.model,
            version=assignment.version,
            sha256=assignment.bundle_sha256,
            length=assignment.bundle_length,
            release_counter=assignment.release_counter,
        )
        if previous is not None:
            record.slots[previous].state = "standby"
        record.active, record.confirmed, record.fallback = slot, False, previous
        save_record(self.flash, record)
        self.session = None
        manifest = verified.contents.manifest
        self.running = Running(slot, manifest, assignment.bundle_sha256, verified.runtime)
        return {
            "slot": slot,
            "model": assignment.model,
            "model_version": assignment.version,
            "release_counter": assignment.release_counter,
            "state": "testing",
        }

    def confirm(self) -> None:
        """Make the testing slot permanent (self-tested) and count it as installed; the floor
        rises only as far as the server confirmed (docs/rollback.md)."""
        record = self.record
        assert record.active is not None
        info = record.slots[record.active]
        info.state = "active"
        if info.model is not None:
            counters = record.release_counters().record_installed(info.model, info.release_counter)
            record.keep(counters)
        record.confirmed, record.fallback = True, None
        save_record(self.flash, record)

    def revert(self, why: str) -> str:
        """Return to the fallback slot; returns a sentence saying what happened."""
        return self._revert(why)

    def _revert(self, why: str) -> str:
        record = self.record
        failed = record.active
        assert failed is not None
        record.slots[failed].state = "failed"
        record.active, record.confirmed = record.fallback, True
        record.fallback = None
        if record.active is not None:
            record.slots[record.active].state = "active"
        save_record(self.flash, record)
        self.running = None
        if record.active is None:
            return f"{why}; no previous model to revert to"
        self._run_active()
        return f"{why}; reverted to slot {record.active}"

    def report(self) -> dict[str, Any]:
        """The ``slots`` response fields."""
        slots = []
        for index, info in enumerate(self.record.slots):
            entry: dict[str, Any] = {"slot": index, "state": info.state}
            if info.model is not None:
                entry.update(
                    model=info.model,
                    version=info.version,
                    sha=bytes.fromhex(info.sha256 or ""),
                    len=info.length,
                    release_counter=info.release_counter,
                )
            session = self.session
            if session is not None and session.slot == index:
                entry = {"slot": index, "sha": session.bundle_sha256, "len": session.length}
                if session.complete:
                    entry["state"] = "uploaded" if session.match else "corrupt"
                else:
                    entry.update(state="uploading", off=session.off)
            slots.append(entry)
        return {
            "slots": slots,
            "active": self.record.active,
            "confirmed": self.record.confirmed,
            "counters": dict(self.record.counters),
        }
