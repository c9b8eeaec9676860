"""Fleet rollups: the devices' day rollups added up per model version x hardware id x day
(``telemetry_fleet_rollup``), so whole-day fleet figures read a few rows instead of one per device.

Kept exact where the per-device rollups change: :func:`add_changes` after the fold job's parts
are added into the devices' rollups (one call, beside that write: :func:`server.fold.fold`),
:func:`recompute` after a device's rollups are erased (a sketch's min and max cannot be
subtracted, so the affected keys are added up again from the rows that remain). Windows
expiring (retention) leave rollups, and so these, alone.

A device's row that fails its checks is left out and counted in ``skipped_rows``, as readers of the
per-device rows skip it; :mod:`server.metrics` reads such a key from the per-device rows, so its
answers are the same with or without this table.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, NamedTuple

from sqlalchemy import delete
from sqlmodel import Session, col, select

from server import aggregate, keyed_rows
from server.models import FleetRollup, TelemetryRollup

#: A fleet rollup's key: model, version, event-time day (UTC, ISO date), hardware id.
Key = tuple[str, str, str, str]
#: What a device's rollup row was before a fold added into it: none yet, a valid row, a row
#: that failed its checks (left out here, replaced by the part), or a valid row the part did not
#: line up with (replaced by the part: its key is added up again).
Was = Literal["new", "valid", "skipped", "replaced"]


class Change(NamedTuple):
    """What one fold added into one device's rollup row."""

    key: Key
    part: dict[str, Any]
    was: Was
    #: The device's row reported a self-test failure before this upload.
    failed_before: bool


def add_changes(session: Session, changes: list[Change], relative_accuracy: float) -> None:
    """Add a fold's changes into the fleet rollups (in the caller's transaction).

    The changes are added up per fleet key first; the fleet rows of those keys are then read at
    once (locked on PostgreSQL), updated in one statement and the missing ones inserted in
    another. A row another folder made meanwhile is read and added into like the others
    (:mod:`server.keyed_rows`), so two folders at once never fail on the unique key.
    """
    if not changes:
        return
    again = {c.key for c in changes if c.was == "replaced"}
    sums: dict[Key, dict[str, Any]] = {}
    # Per key: devices added, devices newly reporting a self-test failure, rows no longer skipped.
    tallies: dict[Key, list[int]] = {}
    for change in changes:
        if change.key in again:
            continue
        into = sums.get(change.key)
        if into is None:
            into = sums[change.key] = aggregate.empty(relative_accuracy)
            tallies[change.key] = [0, 0, 0]
        aggregate.add(into, change.part)
        tally = tallies[change.key]
        failed_now = change.part["selftest_failure_count"] > 0
        if change.was == "valid":
            tally[1] += int(failed_now and not change.failed_before)
        else:
            tally[0] += 1
            tally[1] += int(failed_now)
            tally[2] += int(change.was == "skipped")
    rows = keyed_rows.locked(session, _FLEET, _KEY, sums, _READ)
    updates = [_plus(rows[key], sums[key], tallies[key]) for key in rows]
    inserts = []
    for key in sums:
        if key not in rows:
            devices, failed, unskipped = tallies[key]
            inserts.append(
                {
                    **dict(zip(_KEY, key, strict=True)),
                    **sums[key],
                    "device_count": devices,
                    "selftest_failed_devices": failed,
                    "skipped_rows": -unskipped,
                }
            )
    while inserts:
        made = keyed_rows.insert_new(session, _FLEET, _KEY, inserts)
        taken = [row for row in inserts if _row_key(row) not in made]
        # Another folder made these rows since the read: add into them like the others.
        found = keyed_rows.locked(session, _FLEET, _KEY, [_row_key(r) for r in taken], _READ)
        updates += [_plus(row, sums[key], tallies[key]) for key, row in found.items()]
        inserts = [row for row in taken if _row_key(row) not in found]
    keyed_rows.update_by_id(session, _FLEET, updates)
    if again:
        recompute(session, again, relative_accuracy)


_FLEET = FleetRollup.__table__  # type: ignore[attr-defined]
_KEY = ("model", "version", "day", "hardware_id")
_TALLIES = ("device_count", "selftest_failed_devices", "skipped_rows")
#: What adding into a stored fleet row reads (besides its key).
_READ = ("id", *_TALLIES, *aggregate.FIELDS)


def _row_key(row: dict[str, Any]) -> Key:
    return (row["model"], row["version"], row["day"], row["hardware_id"])


def _plus(row: dict[str, Any], part: dict[str, Any], tally: list[int]) -> dict[str, Any]:
    """A stored fleet row's new values: ``part`` added, and the devices it tallies."""
    current = aggregate.copy({f: row[f] for f in aggregate.FIELDS})
    aggregate.add(current, part)
    devices, failed, unskipped = tally
    return {
        "id": row["id"],
        **current,
        "device_count": row["device_count"] + devices,
        "selftest_failed_devices": row["selftest_failed_devices"] + failed,
        "skipped_rows": row["skipped_rows"] - unskipped,
    }


def recompute(session: Session, keys: Iterable[Key], relative_accuracy: float) -> None:
    """Add the fleet rollups of ``keys`` up again from the devices' rollup rows (after the caller
    changed them in its transaction; rows already flushed are seen)."""
    for key in sorted(set(keys)):
        model, version, day, hardware_id = key
        session.exec(
            delete(FleetRollup).where(
                col(FleetRollup.model) == model,
                col(FleetRollup.version) == version,
                col(FleetRollup.day) == day,
                col(FleetRollup.hardware_id) == hardware_id,
            )
        )
        rows = session.exec(
            select(TelemetryRollup.device_id, *_columns(TelemetryRollup)).where(
                TelemetryRollup.model == model,
                TelemetryRollup.version == version,
                TelemetryRollup.day == day,
                TelemetryRollup.hardware_id == hardware_id,
            )
        )
        folded = fold(((key, row[1:]) for row in rows), relative_accuracy)
        for row in folded.values():
            session.add(row)
    session.flush()


def rebuild(session: Session, relative_accuracy: float, days: list[str] | None = None) -> int:
    """Add every stored device rollup (of ``days``, or all) up again into fresh fleet rollups
    (migration 0008; the bench's seeding, a process per group of days); returns how many fleet
    rows there are."""
    fleet_rows = delete(FleetRollup)
    query = select(
        TelemetryRollup.model,
        TelemetryRollup.version,
        TelemetryRollup.day,
        TelemetryRollup.hardware_id,
        *_columns(TelemetryRollup),
    )
    if days is not None:
        fleet_rows = fleet_rows.where(col(FleetRollup.day).in_(days))
        query = query.where(col(TelemetryRollup.day).in_(days))
    session.exec(fleet_rows)
    rows = session.exec(query.execution_options(yield_per=5000))
    folded = fold((((r[0], r[1], r[2], r[3]), tuple(r[4:])) for r in rows), relative_accuracy)
    session.add_all(folded.values())
    session.flush()
    return len(folded)


def device_keys(session: Session, device_id: str) -> list[Key]:
    """The fleet rollup keys a device's rollup rows count in (what erasing it changes)."""
    rows = session.exec(
        select(
            TelemetryRollup.model,
            TelemetryRollup.version,
            TelemetryRollup.day,
            TelemetryRollup.hardware_id,
        ).where(TelemetryRollup.device_id == device_id)
    ).all()
    return sorted({(m, v, d, h) for m, v, d, h in rows})


def fold(
    rows: Iterable[tuple[Key, tuple[Any, ...]]], relative_accuracy: float
) -> dict[Key, FleetRollup]:
    """Devices' rollup rows (a key, and the values of :data:`server.aggregate.FIELDS`) added up
    per key; rows that fail their checks, or do not line up with the rows before them, are
    counted in ``skipped_rows`` and left out. Plain dicts while adding (millions of rows in a
    migration), rows built at the end."""
    sums: dict[Key, dict[str, Any]] = {}
    # Per key: devices added, devices with a self-test failure, rows skipped.
    tallies: dict[Key, list[int]] = {}
    for key, values in rows:
        tally = tallies.get(key)
        if tally is None:
            tally = tallies[key] = [0, 0, 0]
            sums[key] = aggregate.empty(relative_accuracy)
        stored = dict(zip(aggregate.FIELDS, values, strict=True))
        into = sums[key]
        if aggregate.problem(stored, relative_accuracy) is not None or not _lines_up(into, stored):
            tally[2] += 1
            continue
        aggregate.add(into, stored)
        tally[0] += 1
        tally[1] += int(stored["selftest_failure_count"] > 0)
    found = {}
    for key, (devices, failed, skipped) in tallies.items():
        row = found[key] = _empty_row(key, relative_accuracy)
        for field, value in sums[key].items():
            setattr(row, field, value)
        row.device_count, row.selftest_failed_devices, row.skipped_rows = devices, failed, skipped
    return found


def _lines_up(into: dict[str, Any], part: dict[str, Any]) -> bool:
    """Whether ``part``'s histograms have the bins of those of the same name in ``into`` (so
    adding it cannot fail half-way; sketch accuracies were checked with the row)."""
    for side in ("outputs", "inputs"):
        for name, counts in part[side].items():
            have = into[side].get(name)
            if have and len(have) != len(counts):
                return False
    return True


def _columns(table: Any) -> list[Any]:
    return [col(getattr(table, f)) for f in aggregate.FIELDS]


def _empty_row(key: Key, relative_accuracy: float) -> FleetRollup:
    model, version, day, hardware_id = key
    return FleetRollup(
        model=model,
        version=version,
        day=day,
        hardware_id=hardware_id,
        **aggregate.empty(relative_accuracy),
    )
