"""The fleet at a glance, as the Fleet page shows it: devices by hardware id, platform and
firmware with their last contact, devices by the model version they report running, the devices
that have not checked in for a while, and install outcomes per day.

Each part is one aggregate query, so the summary costs the same whatever the fleet's size in
round trips: versions come from ``device_installed`` (what the event log recorded, written on
change), outcomes from ``device_event`` through its ``(kind, at, outcome)`` index.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Date, String, cast, func, or_
from sqlmodel import Session, col, select

from server.models import Device, DeviceEvent, DeviceInstalled

#: At most this many silent devices are listed (their count is always given).
MAX_SILENT_LISTED = 100


class DeviceGroup(BaseModel):
    """Devices of one hardware id, platform and firmware version."""

    hardware_id: str
    platform: str
    firmware_version: str
    devices: int
    #: Not seen since the summary's cutoff (or never).
    silent: int
    last_seen: datetime | None


class VersionCount(BaseModel):
    """Devices of a hardware id reporting a model version as running."""

    model: str
    version: str | None
    hardware_id: str
    devices: int


class SilentDevice(BaseModel):
    id: str
    hardware_id: str
    last_seen: datetime | None


class OutcomeCount(BaseModel):
    """Install events of one outcome on one day (UTC)."""

    day: str
    outcome: str
    count: int


class FleetSummary(BaseModel):
    """The fleet at ``at``: devices not revoked, grouped; silent means not seen for
    ``silent_after_s``."""

    at: datetime
    silent_after_s: int
    devices: int
    silent: int
    groups: list[DeviceGroup]
    versions: list[VersionCount]
    #: Oldest contact first, at most MAX_SILENT_LISTED.
    silent_devices: list[SilentDevice]
    install_outcomes: list[OutcomeCount]


def summary(
    session: Session, *, now: datetime, silent_after: timedelta, outcome_days: int = 30
) -> FleetSummary:
    """The fleet summary at ``now``."""
    cutoff = now - silent_after
    is_silent = or_(col(Device.last_seen) < cutoff, col(Device.last_seen).is_(None))
    groups = [
        DeviceGroup(
            hardware_id=hw,
            platform=platform,
            firmware_version=firmware,
            devices=int(n),
            silent=int(silent),
            last_seen=last,
        )
        for hw, platform, firmware, n, silent, last in session.exec(
            select(  # type: ignore[call-overload]
                Device.hardware_id,
                Device.platform,
                Device.firmware_version,
                func.count(),
                func.count().filter(is_silent),
                func.max(Device.last_seen),
            )
            .where(col(Device.revoked).is_(False))
            .group_by(col(Device.hardware_id), col(Device.platform), col(Device.firmware_version))
            .order_by(col(Device.hardware_id), col(Device.platform), col(Device.firmware_version))
        )
    ]
    silent_rows = session.exec(
        select(Device.id, Device.hardware_id, Device.last_seen)
        .where(col(Device.revoked).is_(False), is_silent)
        .order_by(col(Device.last_seen).asc().nulls_first(), col(Device.id))
        .limit(MAX_SILENT_LISTED)
    ).all()
    return FleetSummary(
        at=now,
        silent_after_s=int(silent_after.total_seconds()),
        devices=sum(g.devices for g in groups),
        silent=sum(g.silent for g in groups),
        groups=groups,
        versions=versions(session),
        silent_devices=[
            SilentDevice(id=i, hardware_id=hw, last_seen=seen) for i, hw, seen in silent_rows
        ],
        install_outcomes=install_outcomes(session, since=now - timedelta(days=outcome_days)),
    )


def versions(session: Session, model: str | None = None) -> list[VersionCount]:
    """Devices per model version and hardware id, as they report running it."""
    query = select(
        DeviceInstalled.model, DeviceInstalled.version, DeviceInstalled.hardware_id, func.count()
    )
    if model is not None:
        query = query.where(DeviceInstalled.model == model)
    keys = (
        col(DeviceInstalled.model),
        col(DeviceInstalled.version),
        col(DeviceInstalled.hardware_id),
    )
    return [
        VersionCount(model=m, version=v, hardware_id=hw, devices=int(n))
        for m, v, hw, n in session.exec(query.group_by(*keys).order_by(*keys))
    ]


def day_of(session: Session, column: Any) -> Any:
    """A stored timestamp's UTC day, in the database's dialect: PostgreSQL takes the date of the
    UTC wall time (cheaper per row than formatting, which the grouping then does for a few dozen
    days, and than ``date_trunc`` in a named zone: a third of the Fleet page's pass over
    ``device``), SQLite keeps UTC as ISO text."""
    if session.get_bind().dialect.name == "postgresql":
        return cast(func.timezone("UTC", column), Date)
    return func.substr(cast(column, String), 1, 10)


def iso_day(value: date | str) -> str:
    """A day as :func:`day_of` gives it, as ISO text."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).date().isoformat()
    return value.isoformat() if isinstance(value, date) else value


def install_outcomes(session: Session, *, since: datetime) -> list[OutcomeCount]:
    """Install events per day and outcome since ``since``."""
    day = day_of(session, col(DeviceEvent.at))
    rows = session.exec(
        select(day, DeviceEvent.outcome, func.count())
        .where(DeviceEvent.kind == "install", col(DeviceEvent.at) >= since)
        .group_by(day, col(DeviceEvent.outcome))
        .order_by(day, col(DeviceEvent.outcome))
    ).all()
    return [OutcomeCount(day=iso_day(d), outcome=o or "unknown", count=int(n)) for d, o, n in rows]
