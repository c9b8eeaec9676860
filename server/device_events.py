"""Device events: what changed in a device's reported state, enrolment or pairing, and when.

Check-in stays one statement: it hashes the reported state (:func:`state_hash`) and the same
``UPDATE`` that records the contact returns the hash the event log last recorded for the device
(``device_state``). Only when the two differ does :func:`record_report` run: it locks the
device's recorded state, works out what changed (:func:`changes`, pure), writes the events and
the new state in one transaction. A write that fails leaves the recorded state as it was, so the
next check-in finds the difference again and the change is recorded then.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Engine, delete, tuple_
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Session, col, select

from server.errors import ApiError
from server.event_schemas import DeviceEventPublic, EventDetails, ModelSummary
from server.models import DeviceEvent, DeviceInstalled, DeviceState

log = logging.getLogger("edgefleet.server.device_events")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CURSOR = re.compile(r"(\d{1,17})-(\d{1,19})")

FAILED_OUTCOMES = frozenset({"self-test-failed", "verify-failed", "download-failed"})
#: At most this many events per page.
MAX_EVENTS_PER_PAGE = 1000


@dataclass(frozen=True)
class Reported:
    """A device's reported state: firmware and each model as ``InstalledModel.to_dict()``."""

    firmware_version: str
    installed: list[dict[str, Any]]


@dataclass(frozen=True)
class Assigned:
    """What the server assigns the device for a model now (named on a failed install)."""

    version: str
    bundle_sha256: str | None


@dataclass
class Change:
    """One event before it is stored."""

    kind: str
    model: str | None = None
    version: str | None = None
    bundle_sha256: str | None = None
    outcome: str | None = None
    details: EventDetails = field(default_factory=EventDetails)


def state_hash(firmware_version: str, installed: list[dict[str, Any]]) -> str:
    """The hash check-in compares: firmware and models (in model order), canonical JSON
    (``installed`` as :class:`~firmware_bundles.messages.InstalledModel` dumps them: no floats)."""
    ordered = sorted(installed, key=lambda m: str(m.get("model")))
    return hashlib.sha256(_ascii_json([firmware_version, ordered])).hexdigest()


def _ascii_json(value: Any) -> bytes:
    """``json.dumps(value, sort_keys=True, separators=(",", ":"))``, the hash's input since the
    first stored state, at orjson's speed where orjson writes the same: for float-free values
    whose output is printable ASCII (orjson leaves non-ASCII and DEL unescaped, which json
    escapes; every other escape is the same)."""
    try:
        out = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        if out.isascii() and b"\x7f" not in out:
            return out
    except TypeError:  # an integer past 64 bits, a lone surrogate: json's way
        pass
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def summary(entry: Mapping[str, Any]) -> ModelSummary:
    """One reported model, without its error text."""
    return ModelSummary(
        model=str(entry.get("model")),
        version=entry.get("version"),
        bundle_sha256=entry.get("bundle_sha256"),
        active_slot=entry.get("active_slot"),
        slots=dict(entry.get("slots") or {}),
        last_install=entry.get("last_install"),
    )


def changes(
    before: Reported | None, after: Reported, assigned: Mapping[str, Assigned]
) -> list[Change]:
    """What changed from ``before`` to ``after``; pure.

    Without ``before`` (a device the event log has no state for), one ``reported`` event
    carries the whole state. Per model: a new active bundle is an ``install`` (outcome ``ok``),
    or a ``switch`` when the slot that becomes active was the intact standby, or a ``revert``
    when that happens because the active slot failed; a new failure outcome (or error) is an
    ``install`` with that outcome, naming what the server assigns now; a slot newly
    ``reverted`` (a trial interrupted) is a ``revert``; a model no longer reported, or with no
    active bundle any more, is ``removed``.
    """
    if before is None:
        return [
            Change(
                "reported",
                details=EventDetails(
                    firmware_version=after.firmware_version,
                    installed=[summary(m) for m in after.installed],
                ),
            )
        ]
    found: list[Change] = []
    if before.firmware_version != after.firmware_version:
        found.append(
            Change(
                "firmware",
                details=EventDetails(
                    from_firmware=before.firmware_version, to_firmware=after.firmware_version
                ),
            )
        )
    old = {str(m.get("model")): m for m in before.installed}
    new = {str(m.get("model")): m for m in after.installed}
    for model in sorted(old.keys() | new.keys()):
        found += _model_changes(model, old.get(model), new.get(model), assigned.get(model))
    return found


def _model_changes(
    model: str,
    before: Mapping[str, Any] | None,
    after: Mapping[str, Any] | None,
    assigned: Assigned | None,
) -> list[Change]:
    b: Mapping[str, Any] = before or {}
    if after is None or (after.get("bundle_sha256") is None and after.get("version") is None):
        if b.get("bundle_sha256") is None and b.get("version") is None:
            return []
        reason = "no longer reported" if after is None else "no active bundle"
        return [
            Change(
                "removed",
                model,
                b.get("version"),
                b.get("bundle_sha256"),
                details=EventDetails(reason=reason),
            )
        ]
    found: list[Change] = []
    old_slots: Mapping[str, str] = b.get("slots") or {}
    new_slots: Mapping[str, str] = after.get("slots") or {}
    old_active, new_active = b.get("active_slot"), after.get("active_slot")
    running = (after.get("bundle_sha256"), after.get("version"))
    if running != (b.get("bundle_sha256"), b.get("version")):
        was_standby = new_active != old_active and old_slots.get(str(new_active)) == "standby"
        if was_standby and new_slots.get(str(old_active)) in ("failed", "reverted"):
            kind, outcome = "revert", None
        elif was_standby:
            kind, outcome = "switch", None
        else:
            kind, outcome = "install", "ok"
        found.append(
            Change(
                kind,
                model,
                after.get("version"),
                after.get("bundle_sha256"),
                outcome,
                EventDetails(
                    release_counter=after.get("release_counter") if kind == "install" else None,
                    slot=new_active,
                    from_version=b.get("version"),
                    from_slot=old_active,
                    error=after.get("last_error") if kind == "revert" else None,
                ),
            )
        )
    outcome = after.get("last_install")
    failure = (outcome, after.get("last_error"))
    if outcome in FAILED_OUTCOMES and failure != (b.get("last_install"), b.get("last_error")):
        found.append(
            Change(
                "install",
                model,
                assigned.version if assigned else None,
                assigned.bundle_sha256 if assigned else None,
                outcome,
                EventDetails(error=after.get("last_error"), running_version=after.get("version")),
            )
        )
    if not any(c.kind == "revert" for c in found):
        for slot, status in sorted(new_slots.items()):
            if status == "reverted" and old_slots.get(slot) != "reverted":
                found.append(
                    Change(
                        "revert",
                        model,
                        after.get("version"),
                        after.get("bundle_sha256"),
                        details=EventDetails(slot=slot, error=after.get("last_error")),
                    )
                )
    return found


def _row(device_id: str, at: datetime, change: Change) -> DeviceEvent:
    return DeviceEvent(
        device_id=device_id,
        at=at,
        kind=change.kind,
        model=change.model,
        version=change.version,
        bundle_sha256=change.bundle_sha256,
        outcome=change.outcome,
        details=change.details.model_dump(mode="json", exclude_none=True),
    )


def record_report(
    engine: Engine,
    device_id: str,
    hardware_id: str,
    reported: Reported,
    reported_hash: str,
    at: datetime,
    assigned: Mapping[str, Assigned],
) -> list[DeviceEvent]:
    """Record what changed since the state the log last recorded for the device; returns the
    events written (none when another check-in recorded this state first).

    The recorded state is read with a row lock, so two check-ins of one device that both saw a
    difference record it once; the first state of a device races only on its insert, and the
    loser reads again.
    """
    try:
        with Session(engine, expire_on_commit=False) as session:
            for attempt in range(2):
                recorded = session.exec(
                    select(DeviceState).where(DeviceState.device_id == device_id).with_for_update()
                ).first()
                if recorded is not None and recorded.state_hash == reported_hash:
                    return []
                before = (
                    None
                    if recorded is None
                    else Reported(recorded.firmware_version, list(recorded.installed or []))
                )
                rows = [_row(device_id, at, c) for c in changes(before, reported, assigned)]
                session.add_all(rows)
                _keep_state(session, recorded, device_id, reported, reported_hash, at)
                _keep_installed(session, device_id, hardware_id, reported)
                try:
                    session.commit()
                except IntegrityError:
                    session.rollback()
                    if attempt:
                        raise
                    continue
                return rows
    except SQLAlchemyError:
        # The check-in is recorded and answered all the same; the recorded state is unchanged,
        # so the next check-in records this change.
        log.warning("device %s: state change not recorded", device_id, exc_info=True)
    return []


def _keep_state(
    session: Session,
    recorded: DeviceState | None,
    device_id: str,
    reported: Reported,
    reported_hash: str,
    at: datetime,
) -> None:
    if recorded is None:
        recorded = DeviceState(
            device_id=device_id, state_hash="", firmware_version="", recorded_at=at
        )
    recorded.state_hash = reported_hash
    recorded.firmware_version = reported.firmware_version
    recorded.installed = reported.installed
    recorded.recorded_at = at
    session.add(recorded)


def _keep_installed(session: Session, device_id: str, hardware_id: str, reported: Reported) -> None:
    """Replace the device's :class:`DeviceInstalled` rows with what it reports now."""
    session.exec(delete(DeviceInstalled).where(col(DeviceInstalled.device_id) == device_id))
    by_model = {str(m.get("model")): m for m in reported.installed}
    for model, entry in sorted(by_model.items()):
        session.add(
            DeviceInstalled(
                device_id=device_id,
                model=model,
                hardware_id=hardware_id,
                version=entry.get("version"),
                bundle_sha256=entry.get("bundle_sha256"),
                last_install=entry.get("last_install"),
            )
        )


def add_enrolled(
    session: Session,
    *,
    device_id: str,
    hardware_id: str,
    firmware_version: str,
    relay_id: str | None,
    at: datetime,
) -> None:
    """Add (uncommitted) a new device's ``enrolled`` event and recorded state; with a relay,
    the relay's ``paired`` event too."""
    session.add(
        _row(
            device_id,
            at,
            Change(
                "enrolled",
                details=EventDetails(
                    hardware_id=hardware_id, firmware_version=firmware_version, relay_id=relay_id
                ),
            ),
        )
    )
    if relay_id is not None:
        session.add(
            _row(relay_id, at, Change("paired", details=EventDetails(relayed_device_id=device_id)))
        )
    session.add(
        DeviceState(
            device_id=device_id,
            state_hash=state_hash(firmware_version, []),
            firmware_version=firmware_version,
            installed=[],
            recorded_at=at,
        )
    )


def add_unpaired(
    session: Session, *, device_id: str, relay_id: str, reason: str, at: datetime
) -> None:
    """Add (uncommitted) the ``unpaired`` events of a device and its former relay."""
    session.add(
        _row(
            device_id,
            at,
            Change("unpaired", details=EventDetails(relay_id=relay_id, reason=reason)),
        )
    )
    session.add(
        _row(
            relay_id,
            at,
            Change("unpaired", details=EventDetails(relayed_device_id=device_id, reason=reason)),
        )
    )


def add_revoked(session: Session, *, device_id: str, at: datetime) -> None:
    """Add (uncommitted) a device's ``revoked`` event."""
    session.add(_row(device_id, at, Change("revoked")))


def public(event: DeviceEvent) -> DeviceEventPublic:
    """An event as the API shows it."""
    assert event.id is not None
    return DeviceEventPublic.model_validate(event.model_dump() | {"details": event.details or {}})


def cursor_of(event: DeviceEvent) -> str:
    """The cursor that pages on after ``event`` (to older ones): its time in microseconds since
    the epoch and its id."""
    micros = (event.at - _EPOCH) // timedelta(microseconds=1)
    return f"{micros}-{event.id}"


def _parse_cursor(cursor: str) -> tuple[datetime, int]:
    """Raises: ApiError 400 for a cursor no answer gave."""
    found = _CURSOR.fullmatch(cursor)
    if found is None:
        raise ApiError(400, f"'cursor' {cursor[:80]!r} is not one this server gave")
    return _EPOCH + timedelta(microseconds=int(found[1])), int(found[2])


def list_events(
    session: Session,
    device_id: str,
    *,
    start: datetime | None,
    end: datetime | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[DeviceEvent], str | None]:
    """A device's events in ``[start, end)``, newest first, after ``cursor``; and the cursor of
    the next page, if there are more.

    Raises:
        ApiError: 400 for a bad cursor or an empty span.
    """
    if start is not None and end is not None and start >= end:
        raise ApiError(400, f"'from' ({start.isoformat()}) must be before 'to' ({end.isoformat()})")
    query = select(DeviceEvent).where(DeviceEvent.device_id == device_id)
    if start is not None:
        query = query.where(col(DeviceEvent.at) >= start)
    if end is not None:
        query = query.where(col(DeviceEvent.at) < end)
    if cursor is not None:
        query = query.where(
            tuple_(col(DeviceEvent.at), col(DeviceEvent.id)) < _parse_cursor(cursor)
        )
    rows = list(
        session.exec(
            query.order_by(col(DeviceEvent.at).desc(), col(DeviceEvent.id).desc()).limit(limit + 1)
        )
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (cursor_of(rows[-1]) if more and rows else None)
