"""Two install slots per model and the crash-safe record of which one is active.

Layout: ``<state_dir>/models/<model>/{a,b}/bundle.efb`` and ``<state_dir>/models/<model>/
slots.json``. ``slots.json`` is only ever replaced whole (temp file, fsync, ``os.replace``, fsync
of the directory), so after a crash it is either the old record or the new one. The ``active``
slot changes only in :meth:`SlotStore.activate`, after the new bundle is fsynced and passed its
self-test; until then the previous active slot is what runs, whatever step a crash hit.

An install goes: :meth:`begin_install` (slot ``installing``) -> :meth:`write` -> :meth:`sync` ->
:meth:`begin_self_test` (slot ``self-test``, recorded as the trial) -> :meth:`activate` (slot
``active``, the old one ``standby``) or :meth:`revert` (slot ``failed``). Going back to the
standby slot skips the writing: :meth:`begin_switch_back` puts it on trial as it is.
:meth:`recover` at start-up reverts a trial a crash interrupted and empties a half-written slot.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from device_agent.errors import InstallError
from device_agent.fsutil import fsync_dir, write_atomic

SlotName = Literal["a", "b"]
SLOT_NAMES: tuple[SlotName, SlotName] = ("a", "b")
BUNDLE_FILE = "bundle.efb"
RECORD_FILE = "slots.json"
#: The shadow slot: ``<model>/shadow/bundle.efb`` and its record ``<model>/shadow.json``.
SHADOW_DIR = "shadow"
SHADOW_RECORD_FILE = "shadow.json"
_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_RECORD_FORMAT = 1
InstallOutcome = Literal["ok", "self-test-failed", "verify-failed", "download-failed"]


@dataclass(frozen=True)
class SlotInfo:
    """One slot of one model as recorded."""

    model: str
    slot: SlotName
    path: Path
    status: str
    version: str | None = None
    bundle_sha256: str | None = None
    release_counter: int = 0
    length: int = 0


@dataclass(frozen=True)
class ShadowInfo:
    """The candidate in one model's shadow slot."""

    model: str
    path: Path
    version: str
    bundle_sha256: str
    length: int
    sample_fraction: float


@dataclass
class ModelRecord:
    """The parsed ``slots.json`` of one model."""

    active: SlotName | None = None
    trial: SlotName | None = None
    slots: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_install: InstallOutcome | None = None
    last_error: str | None = None
    #: Bundles not to fetch or install again while still assigned: SHA-256 -> outcome.
    failed: dict[str, str] = field(default_factory=dict)
    #: Installs a crash interrupted during self-test: SHA-256 -> count.
    interrupted: dict[str, int] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "format": _RECORD_FORMAT,
                "active": self.active,
                "trial": self.trial,
                "slots": self.slots,
                "last_install": self.last_install,
                "last_error": self.last_error,
                "failed": self.failed,
                "interrupted": self.interrupted,
            },
            sort_keys=True,
            indent=1,
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes, model: str) -> ModelRecord:
        try:
            doc = json.loads(data)
            return cls(
                active=doc["active"],
                trial=doc["trial"],
                slots=dict(doc["slots"]),
                last_install=doc["last_install"],
                last_error=doc["last_error"],
                failed=dict(doc.get("failed", {})),
                interrupted=dict(doc.get("interrupted", {})),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise InstallError(f"slot record of {model} is unreadable: {exc}", model) from exc


class SlotStore:
    """The slots of every model under ``<state_dir>/models``."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "models"

    def _dir(self, model: str) -> Path:
        if not _MODEL_NAME.match(model):
            raise InstallError(f"model name {model!r} is not a safe directory name", model)
        return self.root / model

    def bundle_path(self, model: str, slot: SlotName) -> Path:
        """Where slot ``slot`` of ``model`` keeps its bundle."""
        return self._dir(model) / slot / BUNDLE_FILE

    def models(self) -> list[str]:
        """Every model with a slot record."""
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob(f"*/{RECORD_FILE}"))

    def record(self, model: str) -> ModelRecord:
        """The record of ``model`` (empty if it has none yet).

        Raises:
            InstallError: If the record exists but cannot be read.
        """
        path = self._dir(model) / RECORD_FILE
        try:
            return ModelRecord.from_bytes(path.read_bytes(), model)
        except FileNotFoundError:
            return ModelRecord()

    def save(self, model: str, record: ModelRecord) -> None:
        """Replace the record of ``model`` atomically and durably."""
        directory = self._dir(model)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(directory / RECORD_FILE, record.to_bytes())

    def _info(self, model: str, slot: SlotName, entry: dict[str, Any]) -> SlotInfo:
        return SlotInfo(
            model=model,
            slot=slot,
            path=self.bundle_path(model, slot),
            status=str(entry.get("status", "empty")),
            version=entry.get("version"),
            bundle_sha256=entry.get("sha256"),
            release_counter=int(entry.get("release_counter", 0)),
            length=int(entry.get("length", 0)),
        )

    # -- the shadow slot: a third slot beside a and b, never activated from -----------------------

    def shadow(self, model: str) -> ShadowInfo | None:
        """The candidate in ``model``'s shadow slot, if one is installed intact."""
        try:
            doc = json.loads((self._dir(model) / SHADOW_RECORD_FILE).read_bytes())
            info = ShadowInfo(
                model=model,
                path=self._dir(model) / SHADOW_DIR / BUNDLE_FILE,
                version=str(doc["version"]),
                bundle_sha256=str(doc["sha256"]),
                length=int(doc["length"]),
                sample_fraction=float(doc["sample_fraction"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not info.path.is_file() or info.path.stat().st_size != info.length:
            return None
        return info

    def install_shadow(
        self, model: str, data: bytes, *, version: str, bundle_sha256: str, sample_fraction: float
    ) -> ShadowInfo:
        """Write a candidate into ``model``'s shadow slot (durably) and record it; the A/B
        slots are not touched."""
        self.clear_shadow(model)
        path = self._dir(model) / SHADOW_DIR / BUNDLE_FILE
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(path, data)
        record = {
            "version": version,
            "sha256": bundle_sha256,
            "length": len(data),
            "sample_fraction": sample_fraction,
        }
        write_atomic(
            self._dir(model) / SHADOW_RECORD_FILE, json.dumps(record, sort_keys=True).encode()
        )
        info = self.shadow(model)
        if info is None:
            raise InstallError(f"shadow slot of {model} did not keep its bundle", model)
        return info

    def clear_shadow(self, model: str) -> bool:
        """Empty ``model``'s shadow slot; whether there was anything in it."""
        directory = self._dir(model)
        had = False
        for path in (directory / SHADOW_RECORD_FILE, directory / SHADOW_DIR / BUNDLE_FILE):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                had = True
        return had

    def slot(self, model: str, slot: SlotName) -> SlotInfo:
        """Slot ``slot`` of ``model`` as recorded."""
        return self._info(model, slot, self.record(model).slots.get(slot, {}))

    def active(self, model: str) -> SlotInfo | None:
        """The slot ``model`` runs from, or None if nothing is active."""
        record = self.record(model)
        if record.active is None:
            return None
        return self._info(model, record.active, record.slots.get(record.active, {}))

    def inactive(self, model: str) -> SlotName:
        """The slot a new bundle of ``model`` is written to: the one not active."""
        active = self.record(model).active
        return "b" if active == "a" else "a"

    def find(self, model: str, bundle_sha256: str) -> SlotInfo | None:
        """A slot holding bundle ``bundle_sha256`` intact (active or standby), if any."""
        record = self.record(model)
        for name in SLOT_NAMES:
            entry = record.slots.get(name, {})
            info = self._info(model, name, entry)
            if (
                info.bundle_sha256 == bundle_sha256
                and info.status in ("active", "standby")
                and info.path.is_file()
                and info.path.stat().st_size == info.length
            ):
                return info
        return None

    def begin_install(
        self,
        model: str,
        slot: SlotName,
        *,
        bundle_sha256: str,
        version: str,
        release_counter: int,
        length: int,
    ) -> None:
        """Record that ``slot`` is being overwritten, before any byte of it changes."""
        record = self.record(model)
        if slot == record.active:
            raise InstallError(f"refusing to overwrite the active slot {slot} of {model}", model)
        record.slots[slot] = {
            "status": "installing",
            "sha256": bundle_sha256,
            "version": version,
            "release_counter": release_counter,
            "length": length,
        }
        if record.trial == slot:
            record.trial = None
        self.save(model, record)

    def write(self, model: str, slot: SlotName, data: bytes) -> Path:
        """Write the bundle bytes into ``slot`` (not yet durable: see :meth:`sync`)."""
        path = self.bundle_path(model, slot)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(path, "wb") as out:
            out.write(data)
        return path

    def sync(self, model: str, slot: SlotName) -> None:
        """Make ``slot``'s bundle file durable (file and directory fsync)."""
        path = self.bundle_path(model, slot)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path.parent)

    def begin_self_test(self, model: str, slot: SlotName) -> None:
        """Switch the record to ``slot`` under trial; the active slot still runs."""
        record = self.record(model)
        self._expect(record, model, slot, "installing")
        record.slots[slot]["status"] = "self-test"
        record.trial = slot
        self.save(model, record)

    def begin_switch_back(self, model: str, slot: SlotName) -> None:
        """Put the intact ``standby`` slot on trial again, with no byte of it rewritten (going
        back to the previous version, docs/rollback.md); the active slot still runs. A crash
        during this trial leaves the slot ``standby`` again."""
        record = self.record(model)
        self._expect(record, model, slot, "standby")
        record.slots[slot]["status"] = "self-test"
        record.slots[slot]["switch_back"] = True
        record.trial = slot
        self.save(model, record)

    def activate(self, model: str, slot: SlotName) -> SlotInfo:
        """Make the trial ``slot`` active; the previous active slot becomes standby."""
        record = self.record(model)
        self._expect(record, model, slot, "self-test")
        previous = record.active
        if previous is not None and previous != slot and previous in record.slots:
            record.slots[previous]["status"] = "standby"
        record.slots[slot]["status"] = "active"
        record.slots[slot].pop("switch_back", None)
        record.active = slot
        record.trial = None
        record.last_install = "ok"
        record.last_error = None
        record.interrupted.pop(str(record.slots[slot].get("sha256")), None)
        self.save(model, record)
        return self._info(model, slot, record.slots[slot])

    def revert(self, model: str, slot: SlotName, outcome: InstallOutcome, error: str) -> None:
        """End the trial of ``slot`` as failed, remember its bundle as failed; the active slot
        keeps running."""
        record = self.record(model)
        entry = record.slots.setdefault(slot, {})
        entry["status"] = "failed"
        entry.pop("switch_back", None)
        if record.trial == slot:
            record.trial = None
        record.last_install = outcome
        record.last_error = error
        bundle_sha256 = entry.get("sha256")
        if isinstance(bundle_sha256, str):
            record.failed[bundle_sha256] = outcome
            record.interrupted.pop(bundle_sha256, None)
        self.save(model, record)

    def note_failure(
        self,
        model: str,
        outcome: InstallOutcome | None,
        error: str,
        *,
        bundle_sha256: str | None = None,
    ) -> None:
        """Record an install that failed outside a self-test (download, verification, disk);
        with ``bundle_sha256``, that bundle is not fetched again while it stays assigned."""
        record = self.record(model)
        if outcome is not None:
            record.last_install = outcome
        record.last_error = error
        if bundle_sha256 is not None:
            record.failed[bundle_sha256] = outcome or "failed"
        self.save(model, record)

    def forget_failures(self, model: str, keep: set[str]) -> None:
        """Drop failed-bundle marks except ``keep`` (the SHA-256s still assigned)."""
        record = self.record(model)
        stale = [h for h in record.failed if h not in keep]
        if stale:
            for bundle_sha256 in stale:
                del record.failed[bundle_sha256]
            self.save(model, record)

    def recover(self) -> list[tuple[str, str, int]]:
        """Repair what a crash left, at start-up, before anything runs.

        A trial (a crash between switching to self-test and activating) is reverted: the
        previous active slot runs, as MCUboot reverts an unconfirmed image. A slot left
        ``installing`` is emptied. An active slot whose file is missing or of the wrong size
        falls back to an intact standby slot.

        Returns:
            ``(model, bundle_sha256, times interrupted)`` for each trial reverted.
        """
        reverted: list[tuple[str, str, int]] = []
        for model in self.models():
            record = self.record(model)
            changed = False
            if record.trial is not None:
                entry = record.slots.get(record.trial, {})
                bundle_sha256 = str(entry.get("sha256"))
                # A standby put back on trial was never rewritten: still a good fallback.
                intact = entry.pop("switch_back", False) and self._intact(
                    model, record, record.trial
                )
                entry["status"] = "standby" if intact else "reverted"
                record.interrupted[bundle_sha256] = record.interrupted.get(bundle_sha256, 0) + 1
                record.last_install = None
                record.last_error = (
                    f"install of {entry.get('version')} interrupted during self-test;"
                    " reverted to the previous slot"
                )
                reverted.append((model, bundle_sha256, record.interrupted[bundle_sha256]))
                record.trial = None
                changed = True
            for name in SLOT_NAMES:
                entry = record.slots.get(name, {})
                if entry.get("status") == "installing":
                    with contextlib.suppress(FileNotFoundError):
                        self.bundle_path(model, name).unlink()
                    record.slots[name] = {"status": "empty"}
                    changed = True
            if record.active is not None and not self._intact(model, record, record.active):
                standby = [
                    n
                    for n in SLOT_NAMES
                    if record.slots.get(n, {}).get("status") == "standby"
                    and self._intact(model, record, n)
                ]
                record.slots.setdefault(record.active, {})["status"] = "failed"
                record.active = standby[0] if standby else None
                if standby:
                    record.slots[standby[0]]["status"] = "active"
                record.last_error = "active slot's bundle was missing or damaged"
                changed = True
            if changed:
                self.save(model, record)
        return reverted

    def _intact(self, model: str, record: ModelRecord, slot: SlotName) -> bool:
        path = self.bundle_path(model, slot)
        length = int(record.slots.get(slot, {}).get("length", -1))
        return path.is_file() and path.stat().st_size == length

    def _expect(self, record: ModelRecord, model: str, slot: SlotName, status: str) -> None:
        got = record.slots.get(slot, {}).get("status")
        if got != status:
            raise InstallError(f"slot {slot} of {model} is {got}, expected {status}", model)
