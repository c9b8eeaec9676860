"""The Fleet page's data: devices by hardware id, platform, firmware and model version, when they
last checked in, telemetry completeness and install outcomes, from the same functions as the API
(``GET /v1/devices``, ``/v1/models``, ``/v1/rollouts``), and install outcomes and reverts per
day from the device event log (as ``GET /v1/fleet/summary`` counts them)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from firmware_bundles.manifest import semver_key
from server import fleet, metrics, registry, rollouts
from server.config import Settings
from server.device_events import FAILED_OUTCOMES
from server.fleet_summary import day_of
from server.models import Device, DeviceEvent, Rollout
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
#: How many of the newest failed installs and reverts the page lists.
TROUBLE_LISTED = 20


def fleet_page(
    session: Session, settings: Settings, *, now: datetime, params: Mapping[str, str]
) -> dict[str, Any]:
    """Everything the Fleet page shows (its JSON twin); ``from`` and ``to`` bound the install
    outcomes (default the last 30 days).

    Raises:
        ApiError: 400 for a bad ``from`` or ``to`` or an empty span.
    """
    start, end = span_of(params)
    today = now.astimezone(UTC).date()
    tomorrow = datetime.combine(today + timedelta(days=1), datetime.min.time(), UTC)
    end = end or tomorrow
    start = start or min(end, tomorrow) - timedelta(days=OUTCOME_DAYS)
    check_order(start, end)
    outcomes = install_outcomes(session, start, end)
    devices = fleet.list_devices(session)
    active = [d for d in devices if not d.revoked]
    silent_before = now - timedelta(seconds=settings.ui_silent_after_s)
    silent = sorted(
        (d for d in active if d.last_seen is None or charts.utc(d.last_seen) < silent_before),
        key=lambda d: (d.last_seen is not None, d.last_seen and charts.utc(d.last_seen), d.id),
    )
    return {
        "generated_at": now.isoformat(),
        "devices": {
            "enrolled": len(devices),
            "active": len(active),
            "revoked": len(devices) - len(active),
            "never_seen": sum(1 for d in active if d.last_seen is None),
            "silent": len(silent),
        },
        "silent_after_s": settings.ui_silent_after_s,
        "by_hardware": _by_hardware(session, active, silent_before),
        "by_firmware": [
            {"hardware_id": h, "firmware_version": f, "devices": n}
            for (h, f), n in sorted(
                Counter((d.hardware_id, d.firmware_version) for d in active).items(),
                key=lambda item: (item[0][0], version_key(item[0][1])),
            )
        ],
        "by_model_version": _by_model_version(active),
        "silent": [
            {
                "id": d.id,
                "hardware_id": d.hardware_id,
                "firmware_version": d.firmware_version,
                "last_seen": d.last_seen and charts.utc(d.last_seen).isoformat(),
            }
            for d in silent[:SILENT_LISTED]
        ],
        "models": [
            {
                "name": m["name"],
                "versions": len(m["versions"]),
                "newest": m["versions"][0]["version"] if m["versions"] else None,
                "released": sorted(
                    {f"{v['version']} on {t}" for v in m["versions"] for t in v["released_for"]}
                ),
            }
            for m in registry.list_models(session)
        ],
        "rollouts": _active_rollouts(session),
        "outcomes_span": {"from": start.isoformat(), "to": end.isoformat()},
        "install_outcomes": outcomes,
        "trouble": _trouble(session),
        "charts": {
            "last_seen": _last_seen_chart(active, now),
            "install_outcomes": _outcomes_chart(outcomes, start, end),
        },
    }


def version_key(version: str) -> tuple[int, tuple[int, int, int, int, str]]:
    """Semantic versions in order, anything else after them by name."""
    try:
        return (0, semver_key(version))
    except ValueError:
        return (1, (0, 0, 0, 0, version))


def _by_hardware(
    session: Session, devices: list[Device], silent_before: datetime
) -> list[dict[str, Any]]:
    groups: dict[str, list[Device]] = defaultdict(list)
    for d in devices:
        groups[d.hardware_id].append(d)
    rows = []
    for hardware_id, members in sorted(groups.items()):
        seen = [charts.utc(d.last_seen) for d in members if d.last_seen is not None]
        rows.append(
            {
                "hardware_id": hardware_id,
                "generation": members[0].generation,
                "platform": members[0].platform,
                "devices": len(members),
                "never_seen": len(members) - len(seen),
                "silent": sum(1 for s in seen if s < silent_before) + len(members) - len(seen),
                "last_seen": max(seen).isoformat() if seen else None,
                "completeness": metrics.completeness(session, [d.id for d in members]),
            }
        )
    return rows


def _by_model_version(devices: list[Device]) -> list[dict[str, Any]]:
    """Per model, version and hardware id: devices running it and their last install outcome."""
    groups: dict[tuple[str, str, str], Counter[str]] = defaultdict(Counter)
    for d in devices:
        for entry in d.installed or []:
            key = (entry.get("model") or "?", entry.get("version") or "(none)", d.hardware_id)
            groups[key][entry.get("last_install") or "not reported"] += 1
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


def _last_seen_chart(devices: list[Device], now: datetime) -> dict[str, Any]:
    """Devices by the UTC day of their last check-in over the last days, per hardware id."""
    today = now.astimezone(UTC).date()
    days = [(today - timedelta(days=n)).isoformat() for n in range(LAST_SEEN_DAYS - 1, -1, -1)]
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for d in devices:
        if d.last_seen is not None:
            counts[d.hardware_id][charts.utc(d.last_seen).date().isoformat()] += 1
    hardware_ids = sorted({d.hardware_id for d in devices})
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
    reverts, counted as the fleet summary counts install outcomes."""
    day = day_of(session, col(DeviceEvent.at))
    rows = session.exec(
        select(day, DeviceEvent.kind, DeviceEvent.outcome, func.count())
        .where(
            col(DeviceEvent.kind).in_(("install", "revert")),
            col(DeviceEvent.at) >= start,
            col(DeviceEvent.at) < end,
        )
        .group_by(day, col(DeviceEvent.kind), col(DeviceEvent.outcome))
    ).all()
    days: dict[str, Counter[str]] = defaultdict(Counter)
    for when, kind, outcome, n in rows:
        key = when.astimezone(UTC).date().isoformat() if isinstance(when, datetime) else when
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
    """The newest failed installs and reverts, with the device they happened on."""
    found = session.exec(
        select(DeviceEvent, Device.hardware_id)
        .join(Device, col(Device.id) == col(DeviceEvent.device_id))
        .where(
            (col(DeviceEvent.kind) == "revert")
            | ((col(DeviceEvent.kind) == "install") & col(DeviceEvent.outcome).in_(FAILED_OUTCOMES))
        )
        .order_by(col(DeviceEvent.at).desc(), col(DeviceEvent.id).desc())
        .limit(TROUBLE_LISTED)
    )
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
