"""A device's history, as the Device page shows it: what decided its assignments (releases for
its hardware id, rollout arms, pins), every change it reported (installs and their outcomes,
self-test failures, switches, reverts), its pairing and its last telemetry.

:func:`load` reads what the history is made of; :func:`build` makes it, pure.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from server import device_events, telemetry
from server.arms import in_treatment
from server.event_schemas import (
    AssignmentPeriod,
    DeviceHistory,
    LastTelemetry,
    Pairing,
)
from server.fleet import get_device
from server.models import (
    Device,
    DeviceEvent,
    ModelVersion,
    Pin,
    Release,
    Rollout,
    TelemetryBatchRecord,
    TelemetryWindowRecord,
)
from server.offers import rollout_rules
from server.schemas import Completeness

_EARLIEST = datetime.min.replace(tzinfo=UTC)
#: The timeline holds at most this many events (the newest); the counts cover them all.
MAX_TIMELINE_EVENTS = 500


@dataclass(frozen=True)
class ReleaseEntry:
    model: str
    version: str
    released_at: datetime
    withdrawn: bool


@dataclass(frozen=True)
class RolloutArm:
    rollout_id: int
    model: str
    state: str
    started_at: datetime | None
    treatment: bool
    version: str | None


@dataclass
class HistoryInputs:
    """What a device's history is built from."""

    device: Device
    events: list[DeviceEvent]
    #: (kind, outcome) -> count over all the device's events.
    event_counts: dict[tuple[str, str | None], int]
    releases: list[ReleaseEntry]
    arms: list[RolloutArm]
    pins: dict[str, str]
    relays_for: list[str]
    last_window: TelemetryWindowRecord | None
    last_received_at: datetime | None
    completeness: dict[str, Any]


def load(session: Session, device_id: str) -> HistoryInputs:
    """Read a device's history inputs.

    Raises:
        ApiError: 404 for an unknown device.
    """
    device = get_device(session, device_id)
    newest = list(
        session.exec(
            select(DeviceEvent)
            .where(DeviceEvent.device_id == device_id)
            .order_by(col(DeviceEvent.at).desc(), col(DeviceEvent.id).desc())
            .limit(MAX_TIMELINE_EVENTS)
        )
    )
    counts = session.exec(
        select(DeviceEvent.kind, DeviceEvent.outcome, func.count())
        .where(DeviceEvent.device_id == device_id)
        .group_by(col(DeviceEvent.kind), col(DeviceEvent.outcome))
    ).all()
    releases = session.exec(
        select(Release, ModelVersion)
        .join(ModelVersion, col(ModelVersion.id) == col(Release.version_id))
        .where(Release.target_id == device.hardware_id)
        .order_by(col(Release.released_at), col(Release.id))
    ).all()
    pins = session.exec(
        select(Pin.model_name, ModelVersion.version)
        .join(ModelVersion, col(ModelVersion.id) == col(Pin.version_id))
        .where(Pin.device_id == device_id)
    ).all()
    return HistoryInputs(
        device=device,
        events=newest[::-1],
        event_counts={(kind, outcome): int(n) for kind, outcome, n in counts},
        releases=[
            ReleaseEntry(r.model_name, v.version, r.released_at, v.withdrawn) for r, v in releases
        ],
        arms=_arms(session, device),
        pins=dict(pins),
        relays_for=list(
            session.exec(
                select(Device.id).where(Device.relay_id == device_id).order_by(col(Device.id))
            )
        ),
        last_window=session.exec(
            select(TelemetryWindowRecord)
            .where(TelemetryWindowRecord.device_id == device_id)
            .order_by(col(TelemetryWindowRecord.window_start).desc())
            .limit(1)
        ).first(),
        last_received_at=session.exec(
            select(func.max(TelemetryBatchRecord.received_at)).where(
                TelemetryBatchRecord.device_id == device_id
            )
        ).one(),
        completeness=telemetry.completeness(session, device_id),
    )


def _arms(session: Session, device: Device) -> list[RolloutArm]:
    """The arm of each rollout that decides the device's offers (by the rollouts' own rule)."""
    found = []
    for rule in rollout_rules(session, device.hardware_id):
        if not rule.selects(device.id, device.firmware_version):
            continue
        treatment = in_treatment(rule.rollout_id, device.id, rule.percent)
        offer = rule.new if treatment else rule.previous
        rollout = session.get(Rollout, rule.rollout_id)
        found.append(
            RolloutArm(
                rollout_id=rule.rollout_id,
                model=rule.model,
                state=rule.state,
                started_at=None if rollout is None else rollout.started_at,
                treatment=treatment,
                version=None if offer is None else offer.version,
            )
        )
    return found


#: What the history repeats of the device's own row, as stored.
_DEVICE_FACTS = {
    "hardware_id",
    "generation",
    "platform",
    "firmware_version",
    "revoked",
    "enrolled_at",
    "last_seen",
}


def build(inputs: HistoryInputs) -> DeviceHistory:
    """A device's history from its inputs; pure."""
    device = inputs.device
    counts: Counter[tuple[str, str | None]] = Counter(inputs.event_counts)
    failed = sum(n for (kind, outcome), n in counts.items() if kind == "install" and outcome)
    return DeviceHistory(
        **device.model_dump(include=_DEVICE_FACTS),
        device_id=device.id,
        installed=[device_events.summary(m) for m in device.installed or []],
        pairing=Pairing(relay_id=device.relay_id, relays_for=inputs.relays_for),
        assignments=assignments(inputs),
        timeline=[device_events.public(e) for e in inputs.events],
        installs=counts[("install", "ok")],
        failed_installs=failed - counts[("install", "ok")],
        selftest_failures=counts[("install", "self-test-failed")],
        reverts=counts[("revert", None)],
        last_telemetry=LastTelemetry(
            window_start=None if inputs.last_window is None else inputs.last_window.window_start,
            model=None if inputs.last_window is None else inputs.last_window.model,
            version=None if inputs.last_window is None else inputs.last_window.version,
            received_at=inputs.last_received_at,
            completeness=Completeness.model_validate(inputs.completeness),
        ),
    )


def assignments(inputs: HistoryInputs) -> list[AssignmentPeriod]:
    """What decided each model's assignment, oldest first: each release for the device's
    hardware id (a withdrawn version's release counts no longer), each rollout arm the device is
    in, and its pins (in force now, so last)."""
    periods = [
        AssignmentPeriod(
            model=r.model,
            version=r.version,
            since=r.released_at,
            source="release",
            withdrawn=r.withdrawn,
        )
        for r in inputs.releases
    ]
    periods += [
        AssignmentPeriod(
            model=a.model,
            version=a.version,
            since=a.started_at,
            source="rollout-treatment" if a.treatment else "rollout-control",
            rollout_id=a.rollout_id,
            rollout_state=a.state,
        )
        for a in inputs.arms
    ]
    periods.sort(key=lambda p: (p.since is None, p.since or _EARLIEST, p.model))
    periods += [
        AssignmentPeriod(model=model, version=version, since=None, source="pin")
        for model, version in sorted(inputs.pins.items())
    ]
    return periods
