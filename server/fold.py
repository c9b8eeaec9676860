"""Folding appended telemetry windows into the per-device day rollups, and reading the two
together so every figure stays exact while windows wait.

Ingest appends windows with ``folded`` false (:mod:`server.ingest_store`). The fold job
(:func:`fold`, under the ``telemetry-fold`` lease, so one process at a time) claims a slice of
them, adds them up per (device, model, version, event-time day), adds each sum into its rollup
(:func:`write_rollups`) and the fleet rollups over it (:func:`server.fleet_rollup.add_changes`)
and marks the windows folded, all in one transaction: a window is in its
rollup exactly when it is marked, so a crash, a retry or a second folder counts nothing twice.
Readers take rollups plus the windows not yet folded, in one statement (one snapshot) so a fold
committing between two reads can neither drop nor double a window (:func:`day_rows`).
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, NamedTuple

from sqlalchemy import (
    JSON,
    BigInteger,
    String,
    cast,
    literal,
    null,
    select,
    text,
    union_all,
    update,
)
from sqlmodel import Session, col
from sqlmodel.sql.sqltypes import UTCDateTime

from server import aggregate, fleet_rollup, keyed_rows, leases
from server.models import UNFOLDED, Device, TelemetryRollup, TelemetryWindowRecord

log = logging.getLogger("edgefleet.server.fold")

LEASE = "telemetry-fold"
_WINDOWS = TelemetryWindowRecord.__table__  # type: ignore[attr-defined]
_ROLLUPS = TelemetryRollup.__table__  # type: ignore[attr-defined]

#: A device's rollup key: device, model, version, event-time day (UTC, ISO date).
RollupKey = tuple[str, str, str, str]
_KEY = ("device_id", "model", "version", "day")


class Folded(NamedTuple):
    """What one fold did."""

    windows: int
    rollups: int


def fold(session: Session, *, relative_accuracy: float, limit: int) -> Folded:
    """Fold up to ``limit`` windows not yet folded into their rollups, in one transaction.

    Two folders at once (say the lease expired under a slow one) claim disjoint windows on
    PostgreSQL (``SKIP LOCKED``) and queue on SQLite's one writer; if both make the same new
    rollup row, the second adds into the row the first made (:mod:`server.keyed_rows`).
    """
    with _cyclic_gc_paused():
        claimed = _claim(session, limit)
        parts, hardware = add_up(claimed, relative_accuracy)
        changes = write_rollups(session, parts, hardware, relative_accuracy)
        fleet_rollup.add_changes(session, changes, relative_accuracy)
        session.commit()
    return Folded(len(claimed), len(changes))


_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_thresholds = gc.get_threshold()
#: The young generation's threshold while a fold runs (Python's default is 700 allocations).
FOLD_GC_THRESHOLD = 50_000


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Python's cycle collector runs rarely while a fold runs (in any thread; as before after
    the last).

    A fold makes some 30 small dicts and lists per window and keeps them all until it commits;
    every 700 of those the collector runs, and its older generations walk everything alive, so a
    fold of 5,000 windows spent as long collecting as decoding (measured: 14 ms to decode the
    claimed windows without it, 15-150 ms with it). A fold makes no reference cycles; reference
    counting frees its objects either way. The collector is slowed, not turned off: the
    setting is the whole process's, so turned off during back-to-back folds under load it also
    let the serving thread's garbage pile up, for one long collection later in whichever
    thread came next (a suspect in bench/load_fleet.py's check-in p99 stalls).
    """
    global _gc_pauses, _gc_thresholds
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_thresholds = gc.get_threshold()
            gc.set_threshold(FOLD_GC_THRESHOLD, *_gc_thresholds[1:])
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0:
                gc.set_threshold(*_gc_thresholds)


def fold_due(
    session: Session, *, relative_accuracy: float, limit: int, lease_s: float, folders: int = 1
) -> int:
    """The periodic job: if this process holds the fold lease, fold until no window waits
    (renewing the lease between rounds of :func:`fold_round`); returns how many windows were
    folded.

    A run's first round has one folder; only when it comes back full (a backlog: more windows
    wait than one round takes) do the rounds after it use all ``folders``. Keeping up with a
    steady stream takes one folder, and the core the second would take stays with the requests
    (``bench/load_fleet.py --at 600``: check-in p99 114-217 ms with two folders from the start,
    97-107 ms this way; docs/scaling.md, "Folding"); a backlog still folds at full width.
    """
    if session.get_bind().dialect.name != "postgresql":
        folders = 1
    folded = 0
    width = 1
    while leases.take_lease(session, LEASE, now=datetime.now(UTC), ttl_s=lease_s):
        done = fold_round(session, relative_accuracy=relative_accuracy, limit=limit, folders=width)
        folded += done
        if done < limit * width:
            break
        width = folders  # a full round: a backlog, folded with every folder
    return folded


def fold_round(session: Session, *, relative_accuracy: float, limit: int, folders: int) -> int:
    """``folders`` folds at once on PostgreSQL, each in its own transaction on its own
    connection (one on SQLite, whose one writer would queue them); returns the windows folded.

    PostgreSQL spends about as long marking a fold's windows as Python spends adding them up, so
    while one fold waits on the database another adds up: two folders fold up to twice as fast
    on a machine with a core to spare. They claim disjoint windows, and lock the rows they add
    into in one order (:mod:`server.keyed_rows`), so neither counts anything twice or fails.
    """
    engine = session.get_bind()
    if folders <= 1 or engine.dialect.name != "postgresql":
        return fold(session, relative_accuracy=relative_accuracy, limit=limit).windows

    def one() -> int:
        with Session(engine) as own:
            return fold(own, relative_accuracy=relative_accuracy, limit=limit).windows

    with ThreadPoolExecutor(max_workers=folders, thread_name_prefix="fold") as pool:
        return sum(pool.map(lambda _: one(), range(folders)))


#: A claimed window: device, hardware id, model, version, event-time day (UTC, ISO), aggregate.
Claimed = tuple[str, str, str, str, str, Any]


def _claim(session: Session, limit: int) -> list[Claimed]:
    """Mark up to ``limit`` unfolded windows folded (uncommitted); returns what they hold.

    One statement: on SQLite it takes the write lock before reading, so no other writer can claim
    the same windows between the read and the mark; on PostgreSQL it locks the slice first,
    skipping what another folder holds, and answers with one JSON document (decoded in one call,
    not row by row).
    """
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        return conn.execute(_CLAIM_PG, {"limit": limit}).scalar() or []
    pending = select(_WINDOWS.c.id).where(UNFOLDED).limit(limit).scalar_subquery()
    columns = ("device_id", "hardware_id", "model", "version", "window_start", "aggregate")
    marked = (
        update(_WINDOWS)
        .where(UNFOLDED, _WINDOWS.c.id.in_(pending))
        .values(folded=True)
        .returning(*(_WINDOWS.c[c] for c in columns))
    )
    days: dict[date, str] = {}
    claimed = []
    for device_id, hardware_id, model, version, start, values in conn.execute(marked):
        day = start.astimezone(UTC).date()
        name = days.get(day)
        if name is None:
            name = days[day] = day.isoformat()
        claimed.append((device_id, hardware_id, model, version, name, values))
    return claimed


# The picked rows are joined back on the whole primary key (with the partition column), so each
# is found by one probe of its own day partition's key index.
_CLAIM_PG = text(
    "WITH picked AS (SELECT id, window_start FROM telemetry_window WHERE NOT folded"
    " LIMIT :limit FOR UPDATE SKIP LOCKED),"
    " claimed AS (UPDATE telemetry_window w SET folded = true FROM picked"
    " WHERE w.id = picked.id AND w.window_start = picked.window_start"
    " RETURNING w.device_id, w.hardware_id, w.model, w.version, w.window_start, w.aggregate)"
    " SELECT json_agg(json_build_array(device_id, hardware_id, model, version,"
    " to_char(window_start AT TIME ZONE 'UTC', 'YYYY-MM-DD'), aggregate)) FROM claimed"
)


def add_up(
    claimed: list[Claimed], relative_accuracy: float
) -> tuple[dict[RollupKey, dict[str, Any]], dict[str, str]]:
    """The claimed windows added up per rollup key, and each device's hardware id (as its
    windows recorded it). A window that cannot be added (stored by an earlier bug) is skipped
    and logged."""
    parts: dict[RollupKey, dict[str, Any]] = {}
    hardware: dict[str, str] = {}
    for device_id, hardware_id, model, version, day, values in claimed:
        key = (device_id, model, version, day)
        part = parts.get(key)
        if part is None:
            part = parts[key] = aggregate.empty(relative_accuracy)
        try:
            aggregate.add(part, values)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("telemetry window %s %s skipped by the fold: %s", key, values, exc)
        hardware[device_id] = hardware_id
    return parts, hardware


def write_rollups(
    session: Session,
    parts: dict[RollupKey, dict[str, Any]],
    hardware: dict[str, str],
    relative_accuracy: float,
) -> list[fleet_rollup.Change]:
    """Add each part into its device's day rollup (made when missing); returns what changed in
    each row written, for the fleet rollups (:func:`server.fleet_rollup.add_changes`, which the
    caller runs in the same transaction).

    The rows for the keys are read at once (locked on PostgreSQL), updated in one statement and
    the missing ones inserted in another; a row another folder made meanwhile is read and added
    into like the others (:mod:`server.keyed_rows`). A row that fails the checks (which reads
    skip) is replaced by the part, so one bad row never makes correct data bounce; what it held
    is logged. ``hardware`` gives each device's hardware id, as its windows recorded it.
    """
    if not parts:
        return []
    existing = keyed_rows.locked(session, _ROLLUPS, _KEY, parts, _READ)
    changes: list[fleet_rollup.Change] = []
    updates = _updates(existing, parts, relative_accuracy, changes)
    new = [key for key in parts if key not in existing]
    devices = device_platforms(session, {key[0] for key in new})
    inserts = []
    for key in new:
        device_id, model, version, day = key
        generation, platform = devices.get(device_id, ("", ""))
        inserts.append(
            {
                "device_id": device_id,
                "hardware_id": hardware[device_id],
                "generation": generation,
                "platform": platform,
                "model": model,
                "version": version,
                "day": day,
                **parts[key],
            }
        )
    while inserts:
        made = keyed_rows.insert_new(session, _ROLLUPS, _KEY, inserts)
        taken = {}
        for row in inserts:
            key = (row["device_id"], row["model"], row["version"], row["day"])
            if key in made:
                fleet_key = (key[1], key[2], key[3], row["hardware_id"])
                changes.append(fleet_rollup.Change(fleet_key, parts[key], "new", False))
            else:
                taken[key] = row
        # Another folder made these rows since the read: add into them like the others.
        rows = keyed_rows.locked(session, _ROLLUPS, _KEY, taken, _READ)
        updates += _updates(rows, parts, relative_accuracy, changes)
        inserts = [row for key, row in taken.items() if key not in rows]
    keyed_rows.update_by_id(session, _ROLLUPS, updates)
    return changes


#: The columns of a stored rollup that adding into it reads (besides its key).
_READ = ("id", "hardware_id", *aggregate.FIELDS)


def _updates(
    rows: dict[RollupKey, dict[str, Any]],
    parts: dict[RollupKey, dict[str, Any]],
    relative_accuracy: float,
    changes: list[fleet_rollup.Change],
) -> list[dict[str, Any]]:
    """Each stored row with its part added (appending what changed to ``changes``)."""
    updates = []
    for key, row in rows.items():
        part = parts[key]
        values, was, failed_before = _added(row, key, part, relative_accuracy)
        updates.append({"id": row["id"], **values})
        fleet_key = (key[1], key[2], key[3], row["hardware_id"])
        changes.append(fleet_rollup.Change(fleet_key, part, was, failed_before))
    return updates


def _added(
    row: dict[str, Any], key: RollupKey, part: dict[str, Any], relative_accuracy: float
) -> tuple[dict[str, Any], fleet_rollup.Was, bool]:
    """A stored rollup with ``part`` added (the part alone if the row fails its checks), what
    the row was (for the fleet rollups), and whether it reported a self-test failure before."""
    problem = aggregate.problem(row, relative_accuracy)
    current = aggregate.copy(_values(row)) if problem is None else None
    was: fleet_rollup.Was = "valid" if current is not None else "skipped"
    failed_before = current is not None and current["selftest_failure_count"] > 0
    if current is not None:
        try:
            aggregate.add(current, part)
        except ValueError as exc:  # a layout no manifest gives: written before the checks
            problem, current, was = str(exc), None, "replaced"
    if current is None:
        log.warning(
            "telemetry rollup %s %s fails its checks (%s); replaced by new data. It held: %s",
            row["id"],
            key,
            problem,
            _values(row),
        )
        current = part
    return current, was, failed_before


def _values(row: dict[str, Any]) -> dict[str, Any]:
    return {f: row[f] for f in aggregate.FIELDS}


def device_platforms(session: Session, device_ids: set[str]) -> dict[str, tuple[str, str]]:
    """Generation and platform of each device (new rollups record them)."""
    ids = sorted(device_ids)
    found: dict[str, tuple[str, str]] = {}
    for i in range(0, len(ids), 500):
        rows = session.execute(
            select(col(Device.id), col(Device.generation), col(Device.platform)).where(
                col(Device.id).in_(ids[i : i + 500])
            )
        )
        found.update({device_id: (g, p) for device_id, g, p in rows})
    return found


# -- reading rollups and waiting windows together ------------------------------------------------


class DayRow(NamedTuple):
    """One device's aggregate on one event-time day: a rollup, or one window not yet folded."""

    device_id: str
    model: str
    version: str
    hardware_id: str
    #: From the rollup; None for a window (its device's are read where needed).
    generation: str | None
    platform: str | None
    day: str
    values: dict[str, Any]


def day_rows(
    session: Session,
    *,
    model: str | None = None,
    version: str | None = None,
    hardware_id: str | None = None,
    days: Iterable[str] | None = None,
    since_day: str | None = None,
) -> Iterator[DayRow]:
    """Rollups and not-yet-folded windows matching the filters, in one statement (one snapshot):
    rollups first, each part in id order (float sums then add up the same way every time).

    ``days`` picks event-time days (ISO dates); ``since_day`` those on or after one.
    """
    wanted = sorted(set(days)) if days is not None else None
    if wanted == []:
        return
    r, w = _ROLLUPS.c, _WINDOWS.c
    rollups = select(
        literal(0).label("part"),
        r.id,
        r.device_id,
        r.model,
        r.version,
        r.hardware_id,
        r.generation,
        r.platform,
        r.day,
        cast(null(), UTCDateTime()).label("window_start"),
        *(r[f] for f in aggregate.FIELDS),
        cast(null(), JSON).label("aggregate"),
    )
    counts = {f: cast(null(), BigInteger).label(f) for f in aggregate.COUNT_FIELDS}
    windows = select(
        literal(1),
        w.id,
        w.device_id,
        w.model,
        w.version,
        w.hardware_id,
        cast(null(), String),
        cast(null(), String),
        cast(null(), String),
        w.window_start,
        *(counts[f] if f in counts else cast(null(), JSON).label(f) for f in aggregate.FIELDS),
        w.aggregate,
    ).where(UNFOLDED)
    for column, value in ((r.model, model), (r.version, version), (r.hardware_id, hardware_id)):
        if value is not None:
            rollups = rollups.where(column == value)
            windows = windows.where(w[column.name] == value)
    if wanted is not None:
        rollups = rollups.where(r.day.in_(wanted))
        windows = windows.where(*_starts_within(w.window_start, wanted[0], wanted[-1]))
    if since_day is not None:
        rollups = rollups.where(r.day >= since_day)
        windows = windows.where(*_starts_within(w.window_start, since_day, None))
    both = union_all(rollups, windows).subquery()
    keep = None if wanted is None else set(wanted)
    for row in session.execute(select(both).order_by(both.c.part, both.c.id)):
        if row.window_start is None:
            values = {f: row._mapping[f] for f in aggregate.FIELDS}
            day = row.day
        else:
            values = dict(row.aggregate)
            day = row.window_start.astimezone(UTC).date().isoformat()
            if keep is not None and day not in keep:
                continue
        yield DayRow(
            row.device_id,
            row.model,
            row.version,
            row.hardware_id,
            row.generation,
            row.platform,
            day,
            values,
        )


def unfolded_keys(
    session: Session, *, model: str, version: str, hardware_id: str | None, days: list[str]
) -> set[tuple[str, str]]:
    """The (hardware id, event-time day) pairs of ``days`` where windows of ``model`` ``version``
    wait to be folded: their day rollups (and the fleet rollups over them) are not yet whole."""
    wanted = sorted(set(days))
    if not wanted:
        return set()
    w = _WINDOWS.c
    query = (
        select(w.hardware_id, w.window_start)
        .distinct()
        .where(
            UNFOLDED,
            w.model == model,
            w.version == version,
            *_starts_within(w.window_start, wanted[0], wanted[-1]),
        )
    )
    if hardware_id is not None:
        query = query.where(w.hardware_id == hardware_id)
    keep = set(wanted)
    found = set()
    for hardware, start in session.execute(query):
        day = start.astimezone(UTC).date().isoformat()
        if day in keep:
            found.add((hardware, day))
    return found


def _starts_within(column: Any, first: str, last: str | None) -> list[Any]:
    """``column`` (a window start) on day ``first`` or later, up to the end of day ``last``."""
    begins = datetime.combine(date.fromisoformat(first), time(), UTC)
    conditions = [column >= begins]
    if last is not None:
        ends = datetime.combine(date.fromisoformat(last) + timedelta(days=1), time(), UTC)
        conditions.append(column < ends)
    return conditions
