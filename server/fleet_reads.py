"""Whole days of a figures query (:mod:`server.metrics`) from the fleet rollups
(:mod:`server.fleet_rollup`): their aggregates, and who contributed counted by the database.

A few rows per day instead of one per device; a key whose fleet rollup left a device's row out is
handed back to be read from the devices' rows, so answers equal those the devices' rows give.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from server import aggregate, contributor_cache, fold
from server.models import FleetRollup, TelemetryBatchCount, TelemetryRollup

if TYPE_CHECKING:
    from server.metrics import Collected, Span


@dataclass
class Counted:
    """Who contributed to a group of whole days read from fleet rollups, counted by the database
    instead of listed: devices, those with a self-test failure, and (asked for once per span, for
    every day and the total) their telemetry batches received and expected."""

    devices: int
    selftest_failed: int
    #: The span's days' batch counts, filled on first use: per day, and the total under None.
    batches: dict[str | None, tuple[int, int]]
    day: str | None
    span: Span
    whole: list[str]

    def completeness(self, session: Session) -> dict[str, Any]:
        if self.day not in self.batches:
            self.batches.update(_contributor_batches(session, self.span, self.whole))
        received, expected = self.batches[self.day]
        return {
            "batches_received": received,
            "batches_expected": expected,
            "ratio": received / expected if expected else None,
        }


def _rollup_filter(span: Span, days: list[str]) -> list[Any]:
    """The devices' rollup rows of ``span``'s version (and hardware id) on ``days``."""
    where = [
        TelemetryRollup.model == span.model,
        TelemetryRollup.version == span.version,
        col(TelemetryRollup.day).in_(days),
    ]
    if span.hardware_id:
        where.append(TelemetryRollup.hardware_id == span.hardware_id)
    return where


def take(
    session: Session,
    span: Span,
    whole: list[str],
    found: Collected,
    *,
    listed: bool,
) -> set[tuple[str, str]]:
    """Add the fleet rollups of ``whole`` days into ``found``; returns the (hardware id, day)
    pairs whose fleet rollup left a device's row out (it failed its checks) or where windows wait
    to be folded (:func:`server.fold.unfolded_keys`): those are read from the devices' rows plus
    their waiting windows (:func:`server.fold.day_rows`), as without fleet rollups.

    Who contributed is counted by the database when every pair is answered and nothing else is
    in the span (``listed`` False: no cut day); else it is listed from the devices' rows' index.
    """
    query = select(FleetRollup).where(
        FleetRollup.model == span.model,
        FleetRollup.version == span.version,
        col(FleetRollup.day).in_(whole),
    )
    if span.hardware_id:
        query = query.where(FleetRollup.hardware_id == span.hardware_id)
    # Read before the fleet rollups: a fold committing in between then only adds newer data to a
    # key read from them, and never moves a waiting window out of a key's sight.
    per_device = fold.unfolded_keys(
        session,
        model=span.model,
        version=span.version,
        hardware_id=span.hardware_id or None,
        days=whole,
    )
    added: dict[tuple[str, str], FleetRollup] = {}
    for row in session.exec(query.order_by(col(FleetRollup.id))):
        if (row.hardware_id, row.day) in per_device:
            continue
        if row.skipped_rows or aggregate.problem(row, found.relative_accuracy) is not None:
            per_device.add((row.hardware_id, row.day))
            continue
        values = aggregate.values(row)
        aggregate.add(found.day(row.day).aggregate, values)
        aggregate.add(found.total.aggregate, values)
        added[(row.hardware_id, row.day)] = row
    if not listed and not per_device and _count_contributors(session, span, whole, found, added):
        return per_device
    contributors = select(
        TelemetryRollup.hardware_id,
        TelemetryRollup.day,
        TelemetryRollup.device_id,
        TelemetryRollup.selftest_failure_count,
    ).where(*_rollup_filter(span, whole))
    for hardware_id, day, device_id, selftest_failures in session.exec(contributors):
        if (hardware_id, day) not in added:
            per_device.add((hardware_id, day))  # no fleet rollup (yet): the devices' rows
            continue
        for group in (found.days[day], found.total):
            group.devices.add(device_id)
            if selftest_failures:
                group.selftest_failed_devices.add(device_id)
    return per_device


def _count_contributors(
    session: Session,
    span: Span,
    whole: list[str],
    found: Collected,
    added: Mapping[tuple[str, str], FleetRollup],
) -> bool:
    """Count who contributed to ``found`` (whole days only, all from fleet rollups) in the
    database; False, counting nothing, if the devices' rows disagree with the fleet rollups'
    device counts (then they are listed instead)."""
    per_day: dict[str, list[int]] = {}
    for (_, day), row in added.items():
        tally = per_day.setdefault(day, [0, 0])
        tally[0] += row.device_count
        tally[1] += row.selftest_failed_devices
    batches: dict[str | None, tuple[int, int]] = {}
    if len(whole) == 1:  # a device has one row per version and day: its fleet rollups count it
        devices, failing = per_day.get(whole[0], [0, 0])
    else:
        key: contributor_cache.Key = (span.model, span.version, span.hardware_id, tuple(whole))
        checks = (
            contributor_cache.fleet_check(added.values()),
            contributor_cache.batch_check(session),
        )
        known = contributor_cache.get(session, key, checks)
        if known is None:
            known = _contributors(session, span, whole, added)
            if known is None:
                return False
            contributor_cache.put(session, key, checks, known)
        devices, failing, batches = known.devices, known.selftest_failed, known.batches
    found.total.counted = Counted(devices, failing, batches, None, span, whole)
    for day, (n, f) in per_day.items():
        found.days[day].counted = Counted(n, f, batches, day, span, whole)
    return True


def _contributors(
    session: Session, span: Span, whole: list[str], added: Mapping[tuple[str, str], FleetRollup]
) -> contributor_cache.Answer | None:
    """Who contributed to ``whole`` days (more than one), counted by the database; None if the
    devices' rows disagree with the fleet rollups' device counts."""
    # One pass over the rollups' index, a row per device, joined to its batch counts.
    contributors = (
        select(
            TelemetryRollup.device_id,
            func.count().label("rows"),
            func.max(TelemetryRollup.selftest_failure_count).label("failures"),
        )
        .where(*_rollup_filter(span, whole))
        .group_by(col(TelemetryRollup.device_id))
        .subquery()
    )
    per_device = _batches_per_device()
    rows, devices, failing, received, expected = session.exec(
        select(  # type: ignore[call-overload]
            func.coalesce(func.sum(contributors.c.rows), 0),
            func.count(),
            func.count().filter(contributors.c.failures > 0),
            func.coalesce(func.sum(per_device.c.received), 0),
            func.coalesce(func.sum(per_device.c.expected), 0),
        ).select_from(
            contributors.outerjoin(per_device, per_device.c.device_id == contributors.c.device_id)
        )
    ).one()
    if rows != sum(r.device_count for r in added.values()):
        return None
    return contributor_cache.Answer(
        int(devices), int(failing), {None: (int(received), int(expected))}
    )


def _batches_per_device() -> Any:
    """Per device: batches received and expected over its boot epochs (a subquery)."""
    return (
        select(
            TelemetryBatchCount.device_id,
            func.sum(TelemetryBatchCount.received).label("received"),
            func.sum(TelemetryBatchCount.top_sequence + 1).label("expected"),
        )
        .group_by(col(TelemetryBatchCount.device_id))
        .subquery()
    )


def _contributor_batches(
    session: Session, span: Span, whole: list[str]
) -> dict[str | None, tuple[int, int]]:
    """Batches received and expected of the devices contributing to each of ``whole`` days of
    ``span`` (and, for a one-day span, to the span under None), added up by the database."""
    batches = _batches_per_device()
    found: dict[str | None, tuple[int, int]] = {day: (0, 0) for day in whole}
    for day, received, expected in session.exec(
        select(
            TelemetryRollup.day,
            func.coalesce(func.sum(batches.c.received), 0),
            func.coalesce(func.sum(batches.c.expected), 0),
        )
        .join(batches, batches.c.device_id == TelemetryRollup.device_id)
        .where(*_rollup_filter(span, whole))
        .group_by(col(TelemetryRollup.day))
    ):
        found[day] = (int(received), int(expected))
    if len(whole) == 1:
        found[None] = found[whole[0]]
    return found
