"""What the device events and device history answer (one public model per answer, so OpenAPI
types every field)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from server.schemas import Completeness

EventKind = Literal[
    "enrolled",
    "reported",
    "firmware",
    "install",
    "switch",
    "revert",
    "removed",
    "paired",
    "unpaired",
    "revoked",
]
InstallOutcome = Literal["ok", "self-test-failed", "verify-failed", "download-failed"]


class ModelSummary(BaseModel):
    """One model as a device reported it: what runs, from which slot, and the slots' states."""

    model: str
    version: str | None = None
    bundle_sha256: str | None = None
    active_slot: str | None = None
    slots: dict[str, str] = {}
    last_install: str | None = None


class EventDetails(BaseModel):
    """What an event says beyond its kind, model, version, bundle and outcome; each kind sets
    the fields it has (docs/server-api.md lists them)."""

    model_config = ConfigDict(extra="forbid")

    #: ``install``: the bundle's release counter and the slot it went into.
    release_counter: int | None = None
    slot: str | None = None
    #: ``install``, ``switch``, ``revert``: the version and slot that ran before.
    from_version: str | None = None
    from_slot: str | None = None
    #: A failed install or a revert: the device's error text.
    error: str | None = None
    #: A failed install: the version the device still runs.
    running_version: str | None = None
    #: ``firmware``: before and after.
    from_firmware: str | None = None
    to_firmware: str | None = None
    #: ``enrolled``: what the device said it is.
    hardware_id: str | None = None
    firmware_version: str | None = None
    #: ``enrolled``, ``paired``, ``unpaired`` on a relayed device (a ring): its relay (phone).
    relay_id: str | None = None
    #: ``paired``, ``unpaired`` on a relay: the device it relays for.
    relayed_device_id: str | None = None
    #: ``unpaired``, ``removed``: why.
    reason: str | None = None
    #: ``reported``: the first state the event log knew of the device.
    installed: list[ModelSummary] | None = None


class DeviceEventPublic(BaseModel):
    """One change of a device: in what it reported at check-in, or in its enrolment and
    pairing."""

    id: int
    device_id: str
    at: datetime
    kind: EventKind
    model: str | None
    version: str | None
    bundle_sha256: str | None
    #: An install's outcome.
    outcome: InstallOutcome | None
    details: EventDetails


class DeviceEvents(BaseModel):
    """A device's events, newest first; ``next_cursor`` pages on (None: no more)."""

    device_id: str
    events: list[DeviceEventPublic]
    next_cursor: str | None


class AssignmentPeriod(BaseModel):
    """What decided a model's assignment for the device from ``since``: a release for its
    hardware id, a rollout's arm, or a pin."""

    model: str
    version: str | None
    since: datetime | None
    #: ``release``, ``rollout-treatment``, ``rollout-control`` or ``pin``.
    source: str
    #: A release of a version withdrawn since (it no longer decides anything).
    withdrawn: bool = False
    rollout_id: int | None = None
    rollout_state: str | None = None


class LastTelemetry(BaseModel):
    """The device's newest telemetry: its last window (by event time) and upload."""

    window_start: datetime | None
    model: str | None
    version: str | None
    received_at: datetime | None
    completeness: Completeness


class Pairing(BaseModel):
    """Who relays for the device (a ring's phone) and for whom it relays (a phone's rings)."""

    relay_id: str | None
    relays_for: list[str]


class DeviceHistory(BaseModel):
    """A device's story: what it is, what it was assigned, and every change it reported."""

    device_id: str
    hardware_id: str
    generation: str
    platform: str
    firmware_version: str
    revoked: bool
    enrolled_at: datetime
    last_seen: datetime | None
    installed: list[ModelSummary]
    pairing: Pairing
    assignments: list[AssignmentPeriod]
    #: Oldest first: installs (with their outcomes), switches, reverts, pairing changes.
    timeline: list[DeviceEventPublic]
    installs: int
    failed_installs: int
    selftest_failures: int
    reverts: int
    last_telemetry: LastTelemetry
