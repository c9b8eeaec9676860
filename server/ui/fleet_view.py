"""The Fleet page's data: devices by hardware id, platform, firmware and model version, when they
last checked in, telemetry completeness and install outcomes, from the same functions as the API
(``GET /v1/devices``, ``/v1/models``, ``/v1/rollouts``)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, time, timedelta
from typing import Any, NamedTuple

from sqlalchemy import column, func, or_, values
from sqlmodel import Session, col, select

from firmware_bundles.manifest import semver_key
from server import concurrent_reads, fleet_summary, installed_counts, registry, rollouts
from server.config import Settings
from server.device_events import FAILED_OUTCOMES
from server.fleet_summary import day_of, iso_day
from server.models import Device, DeviceEvent, DeviceInstalled, Rollout, TelemetryBatchCount
from server.ui import charts
from server.ui.device_view import check_order, days_between, span_of

#: How many days the "last check-in" chart covers, ending today (UTC).
LAST_SEEN_DAYS = 14
#: How many silent devices the page lists (the count covers them all).
SILENT_LISTED = 50
#: Install outcomes a device reports (``InstalledModel.last_install``); None is "not reported".
OUTCOMES = ("ok", "self-test-failed", "verify-failed", "download-failed")
#: Rollout states in which a rollout still acts on devices.
ACTIVE_ROLLOUT_STATES = ("draft", "running", "paused", "waiting-for-approval")
#: Install outcomes are counted over this many days up to today unless the page asks otherwise
#: (the fleet summary's span).
OUTCOME_DAYS = 30
#: Install outcomes over at most this many days are counted a day at a time (see
#: :func:`install_outcomes`).
DAYS_LISTED = 400
#: How many of the newest failed installs and reverts the page lists.
TROUBLE_LISTED = 20


def fleet_page(
    session: Session, settings: Settings, *, now: datetime, params: Mapping[str, str]
) -> dict[str, Any]:
    """Everything the Fleet page shows (its JSON twin), each part one aggregate query (the page
    costs the same round trips at any fleet size), the parts read at once on connections of
    their own (:mod:`server.concurrent_reads`; see docs/dashboard.md, "Scale"); ``from`` and
    ``to`` bound the install outcomes (default the last 30 days).

    Raises:
        ApiError: 400 for a bad ``from`` or ``to`` or an empty span.
    """
    start, end = span_of(params)
    today = now.astimezone(UTC).date()
    tomorrow = datetime.combine(today + timedelta(days=1), datetime.min.time(), UTC)
    end = end or tomorrow
    start = start or min(end, tomorrow) - timedelta(days=OUTCOME_DAYS)
    check_order(start, end)
    silent_before = now - timedelta(seconds=settings.ui_silent_after_s)
    is_silent = or_(col(Device.last_seen).is_(None), col(Device.last_seen) < silent_before)
    # Slowest first, so they start together.
    read = concurrent_reads.read_all(
        session,
        {
            "outcomes": lambda s: install_outcomes(s, start, end),
            "device_days": lambda s: _device_days(s, is_silent),
            "by_model_version": _by_model_version,
            "batches": _batches_by_hardware,
            "silent": lambda s: _silent(s, is_silent),
            "trouble": _trouble,
            "models": _models,
            "rollouts": _active_rollouts,
        },
    )
    outcomes, device_days = read["outcomes"], read["device_days"]
    groups = _device_groups(device_days)
    active_groups = [g for g in groups if not g.revoked]
    by_hardware = _by_hardware(read["batches"], active_groups)
    active_count = sum(row["devices"] for row in by_hardware)
    revoked = sum(g.devices for g in groups if g.revoked)
    never_seen = sum(g.never_seen for g in active_groups)
    silent = sum(g.silent for g in active_groups)
    firmware = Counter[tuple[str, str]]()
    for g in active_groups:
        firmware[(g.hardware_id, g.firmware_version)] += g.devices
    return {
        "generated_at": now.isoformat(),
        "devices": {
            "enrolled": active_count + int(revoked),
            "active": active_count,
            "revoked": int(revoked),
            "never_seen": int(never_seen),
            "silent": int(silent),
        },
        "silent_after_s": settings.ui_silent_after_s,
        "by_hardware": by_hardware,
        "by_firmware": [
            {"hardware_id": h, "firmware_version": f, "devices": int(n)}
            for (h, f), n in sorted(firmware.items(), key=lambda r: (r[0][0], version_key(r[0][1])))
        ],
        "by_model_version": read["by_model_version"],
        "silent": read["silent"],
        "models": read["models"],
        "rollouts": read["rollouts"],
        "outcomes_span": {"from": start.isoformat(), "to": end.isoformat()},
        "install_outcomes": outcomes,
        "trouble": read["trouble"],
        "charts": {
            "last_seen": _last_seen_chart(
                device_days, now, [r["hardware_id"] for r in by_hardware]
            ),
            "install_outcomes": _outcomes_chart(outcomes, start, end),
        },
    }


def version_key(version: str) -> tuple[int, tuple[int, int, int, int, str]]:
    """Semantic versions in order, anything else after them by name."""
    try:
        return (0, semver_key(version))
    except ValueError:
        return (1, (0, 0, 0, 0, version))


class _Group(NamedTuple):
    """Devices of one hardware id, firmware version and revocation state."""

    hardware_id: str
    firmware_version: str
    revoked: bool
    generation: str
    platform: str
    devices: int
    never_seen: int
    silent: int
    last_seen: datetime | None


class _DayGroup(NamedTuple):
    """Devices of one hardware id, firmware version and revocation state, last seen on one UTC
    day (None: never)."""

    group: _Group
    day: str | None


def _device_days(session: Session, is_silent: Any) -> list[_DayGroup]:
    """The device table in one pass, grouped also by the day of last contact: what the page's
    device counts and its last check-in chart are added up from."""
    day = fleet_summary.day_of(session, col(Device.last_seen))
    return [
        _DayGroup(
            _Group(h, f, bool(r), g, p, int(n), int(never), int(silent), last),
            None if seen is None else fleet_summary.iso_day(seen),
        )
        for h, f, r, seen, g, p, n, never, silent, last in session.exec(
            select(  # type: ignore[call-overload]
                Device.hardware_id,
                Device.firmware_version,
                Device.revoked,
                day,
                func.min(Device.generation),
                func.min(Device.platform),
                func.count(),
                func.count().filter(col(Device.last_seen).is_(None)),
                func.count().filter(is_silent),
                func.max(Device.last_seen),
            ).group_by(
                col(Device.hardware_id), col(Device.firmware_version), col(Device.revoked), day
            )
        )
    ]


def _device_groups(days: list[_DayGroup]) -> list[_Group]:
    """The day groups added up per hardware id, firmware version and revocation state."""
    found: dict[tuple[str, str, bool], _Group] = {}
    for d in days:
        g = d.group
        key = (g.hardware_id, g.firmware_version, g.revoked)
        have = found.get(key)
        if have is None:
            found[key] = g
            continue
        seen = [t for t in (have.last_seen, g.last_seen) if t is not None]
        found[key] = _Group(
            g.hardware_id,
            g.firmware_version,
            g.revoked,
            min(have.generation, g.generation),
            min(have.platform, g.platform),
            have.devices + g.devices,
            have.never_seen + g.never_seen,
            have.silent + g.silent,
            max(seen) if seen else None,
        )
    return list(found.values())


def _by_hardware(
    batches: Mapping[str, tuple[int, int]], groups: list[_Group]
) -> list[dict[str, Any]]:
    """Per hardware id: its devices, those never or not lately seen, the last contact, and the
    telemetry completeness of its devices (``batches``: received against those sent)."""
    per_hardware: dict[str, list[_Group]] = defaultdict(list)
    for g in groups:
        per_hardware[g.hardware_id].append(g)
    rows = []
    for hardware_id, members in sorted(per_hardware.items()):
        seen = [g.last_seen for g in members if g.last_seen is not None]
        last_seen = max(seen) if seen else None
        received, expected = batches.get(hardware_id, (0, 0))
        rows.append(
            {
                "hardware_id": hardware_id,
                "generation": min(g.generation for g in members),
                "platform": min(g.platform for g in members),
                "devices": sum(g.devices for g in members),
                "never_seen": sum(g.never_seen for g in members),
                "silent": sum(g.silent for g in members),
                "last_seen": last_seen and charts.utc(last_seen).isoformat(),
                "completeness": {
                    "batches_received": received,
                    "batches_expected": expected,
                    "ratio": received / expected if expected else None,
                },
            }
        )
    return rows


def _batches_by_hardware(session: Session) -> dict[str, tuple[int, int]]:
    """Per hardware id: batches received and expected of its devices not revoked, as all the
    batch counts (each carries its device's hardware id) minus the revoked devices' (a few rows
    through ``ix_device_revoked``): no pass over ``device``."""
    grouped = select(
        TelemetryBatchCount.hardware_id,
        func.sum(TelemetryBatchCount.received),
        func.sum(TelemetryBatchCount.top_sequence + 1),
    ).group_by(col(TelemetryBatchCount.hardware_id))
    found: dict[str, list[int]] = {}
    for hardware_id, received, expected in session.exec(grouped):
        found[hardware_id] = [int(received), int(expected)]
    revoked = grouped.join(Device, col(Device.id) == col(TelemetryBatchCount.device_id)).where(
        col(Device.revoked)
    )
    for hardware_id, received, expected in session.exec(revoked):
        found[hardware_id][0] -= int(received)
        found[hardware_id][1] -= int(expected)
    return {h: (received, expected) for h, (received, expected) in found.items()}


def _silent(session: Session, is_silent: Any) -> list[dict[str, Any]]:
    """The devices not revoked that have been silent longest (never seen first)."""
    rows = session.exec(
        select(Device.id, Device.hardware_id, Device.firmware_version, Device.last_seen)
        .where(col(Device.revoked).is_(False), is_silent)
        .order_by(col(Device.last_seen).asc().nulls_first(), col(Device.id))
        .limit(SILENT_LISTED)
    ).all()
    return [
        {
            "id": device_id,
            "hardware_id": hardware_id,
            "firmware_version": firmware_version,
            "last_seen": last_seen and charts.utc(last_seen).isoformat(),
        }
        for device_id, hardware_id, firmware_version, last_seen in rows
    ]


def _models(session: Session) -> list[dict[str, Any]]:
    """Each model's count of versions, its newest, and where each version is released."""
    return [
        {
            "name": m["name"],
            "versions": len(m["versions"]),
            "newest": m["versions"][0]["version"] if m["versions"] else None,
            "released": sorted(
                {f"{v['version']} on {t}" for v in m["versions"] for t in v["released_for"]}
            ),
        }
        for m in registry.list_models(session)
    ]


def _by_model_version(session: Session) -> list[dict[str, Any]]:
    """Per model, version and hardware id: devices running it and their last install outcome
    (from ``device_installed``, which mirrors each device's reported models)."""
    rows = installed_counts.active(
        session,
        [
            col(DeviceInstalled.model),
            col(DeviceInstalled.version),
            col(DeviceInstalled.hardware_id),
            col(DeviceInstalled.last_install),
        ],
    )
    groups: dict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)
    for (model, version, hardware_id, outcome), n in rows.items():
        key = (model or "?", version or "(none)", hardware_id)
        groups[key][outcome or "not reported"] += int(n)
    return [
        {
            "model": model,
            "version": version,
            "hardware_id": hardware_id,
            "devices": sum(outcomes.values()),
            "install": {o: outcomes.get(o, 0) for o in (*OUTCOMES, "not reported")},
        }
        for (model, version, hardware_id), outcomes in sorted(
            groups.items(),
            key=lambda item: (item[0][0], item[0][2], version_key(item[0][1])),
        )
    ]


def _active_rollouts(session: Session) -> list[dict[str, Any]]:
    found = session.exec(
        select(Rollout)
        .where(col(Rollout.state).in_(ACTIVE_ROLLOUT_STATES))
        .order_by(col(Rollout.id).desc())
    )
    rows = []
    for r in found:
        version = rollouts.version_of(session, r.version_id)
        rows.append(
            {
                "id": r.id,
                "model": r.model_name,
                "version": version.version if version else "?",
                "state": r.state,
                "stage": r.stage + 1,
                "percent": r.stages[r.stage]["percent"],
                "hardware_ids": r.selector.get("hardware_ids", []),
            }
        )
    return rows


def _last_seen_chart(
    device_days: list[_DayGroup], now: datetime, hardware_ids: list[str]
) -> dict[str, Any]:
    """Devices not revoked by the UTC day of their last check-in over the last days, per
    hardware id."""
    today = now.astimezone(UTC).date()
    days = [(today - timedelta(days=n)).isoformat() for n in range(LAST_SEEN_DAYS - 1, -1, -1)]
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for d in device_days:
        if not d.group.revoked and d.day is not None and d.day >= days[0]:
            counts[d.group.hardware_id][d.day] += d.group.devices
    return charts.chart(
        "last_seen",
        f"Devices by day of last check-in (last {LAST_SEEN_DAYS} days; older not shown)",
        x=[charts.day_x(day) for day in days],
        x_text=days,
        series=[(h, [counts[h].get(day, 0) for day in days]) for h in hardware_ids],
        y_label="devices",
    )


def install_outcomes(session: Session, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """Per UTC day in ``[start, end)``: install events by outcome (installed, failed) and
    reverts, counted as the fleet summary counts install outcomes.

    On PostgreSQL, up to :data:`DAYS_LISTED` days, each day's events are read as a range of the
    ``(kind, at, outcome)`` index, joined to a list of the days' bounds (no per-event day
    arithmetic: a third of the time at 260,000 events); longer spans, and SQLite (whose VALUES
    cannot name its columns), group by each event's day.
    """
    kinds = col(DeviceEvent.kind).in_(("install", "revert"))
    within = (col(DeviceEvent.at) >= start, col(DeviceEvent.at) < end)
    first = charts.utc(start).date()
    count = (charts.utc(end - timedelta(microseconds=1)).date() - first).days + 1
    if count <= DAYS_LISTED and session.get_bind().dialect.name == "postgresql":
        at_type = DeviceEvent.__table__.c.at.type  # type: ignore[attr-defined]
        begins = [datetime.combine(first + timedelta(days=i), time(), UTC) for i in range(count)]
        bounds = values(column("begins", at_type), column("ends", at_type), name="days").data(
            [(b, b + timedelta(days=1)) for b in begins]
        )
        day: Any = bounds.c.begins
        query = select(day, DeviceEvent.kind, DeviceEvent.outcome, func.count()).join_from(
            bounds,
            DeviceEvent,
            (col(DeviceEvent.at) >= day) & (col(DeviceEvent.at) < bounds.c.ends),
        )
    else:
        day = day_of(session, col(DeviceEvent.at))
        query = select(day, DeviceEvent.kind, DeviceEvent.outcome, func.count())
    rows = session.exec(
        query.where(kinds, *within).group_by(day, col(DeviceEvent.kind), col(DeviceEvent.outcome))
    ).all()
    days: dict[str, Counter[str]] = defaultdict(Counter)
    for when, kind, outcome, n in rows:
        key = charts.utc(when).date().isoformat() if isinstance(when, datetime) else iso_day(when)
        if kind == "revert":
            days[key]["reverted"] += int(n)
        elif outcome == "ok":
            days[key]["installed"] += int(n)
        elif outcome in FAILED_OUTCOMES:
            days[key]["failed"] += int(n)
    return [
        {"day": d, **{k: days[d][k] for k in ("installed", "failed", "reverted")}}
        for d in sorted(days)
    ]


def _outcomes_chart(rows: list[dict[str, Any]], start: datetime, end: datetime) -> dict[str, Any]:
    by_day = {r["day"]: r for r in rows}
    days = days_between(
        charts.utc(start).date(),
        charts.utc(end - timedelta(microseconds=1)).date(),
        list(by_day),
    )

    def count(label: str) -> Callable[[str], charts.Cell]:
        return lambda day: int(by_day[day][label]) if day in by_day else 0

    return charts.by_day(
        "install_outcomes",
        "Install outcomes per day (UTC): installed, failed (any step), reverted",
        days,
        [(label, count(label)) for label in ("installed", "failed", "reverted")],
        y_label="events",
    )


def _trouble(session: Session) -> list[dict[str, Any]]:
    """The newest failed installs and reverts, with the device they happened on: the newest of
    each kind read apart (each a short walk back along ``ix_device_event_kind_at``), then merged."""
    newest: list[tuple[DeviceEvent, str]] = []
    for kind in (
        col(DeviceEvent.kind) == "revert",
        (col(DeviceEvent.kind) == "install") & col(DeviceEvent.outcome).in_(FAILED_OUTCOMES),
    ):
        newest += session.exec(
            select(DeviceEvent, Device.hardware_id)
            .join(Device, col(Device.id) == col(DeviceEvent.device_id))
            .where(kind)
            .order_by(col(DeviceEvent.at).desc(), col(DeviceEvent.id).desc())
            .limit(TROUBLE_LISTED)
        ).all()
    newest.sort(key=lambda row: (charts.utc(row[0].at), row[0].id), reverse=True)
    found = newest[:TROUBLE_LISTED]
    return [
        {
            "device_id": e.device_id,
            "hardware_id": hardware_id,
            "at": charts.utc(e.at).isoformat(),
            "kind": e.kind,
            "outcome": e.outcome,
            "model": e.model,
            "version": e.version,
        }
        for e, hardware_id in found
    ]
