"""Who contributed to whole days of a figures query, remembered while nothing it rests on changes.

Counting who contributed to a span of whole days (distinct devices, those with a self-test
failure, and their telemetry batches received and expected, in total and per day:
:mod:`server.fleet_reads`) reads every device's rollup row of the span and joins its batch counts:
at 100,000 devices some 600,000 index entries per version and week, the Model page's costliest
part. The answer depends on two things only, and each request checks both before a remembered
answer is used:

- the devices' rollup rows of the span's keys, which change only where their fleet rollups change
  (:mod:`server.fleet_rollup`: in the same transaction, each fold adds at least one window to a
  fleet row or makes a new one, and erasing or replacing rows writes the fleet rows anew): the
  fleet rows the request read (ids, device and window counts) are part of the check;
- the devices' batch counts (``telemetry_batch_count``): a row is only added, or grows (each new
  batch adds one to ``received``), except when a device's telemetry is erased, which bumps
  :class:`~server.models.BatchCountGeneration` in the same transaction (the table is also rebuilt
  from the batch records, by migrations and the bench's seeding, where no server runs). So the
  table's row count, the sum of ``received`` and the generation read the same only if no count
  changed (one scan of one row per device and boot epoch).

An answer is stored under the checks read before it was computed; it may come from a later
state, but is only used again while the checks still read the same, so it is never stale. Each
process keeps its own (``serve --workers N`` needs no notification); a fleet that uploads
changes batch counts at every upload, and then the answer is computed again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

from sqlalchemy import Engine, func, update
from sqlmodel import Session, col, select

from server.models import BatchCountGeneration, FleetRollup, TelemetryBatchCount

#: A span's key: model, version, hardware id (None for all), its whole days.
Key = tuple[str, str, str | None, tuple[str, ...]]
#: How many spans each process remembers per database (the most recently used).
KEPT = 64


@dataclass
class Answer:
    """Who contributed to a span: devices, those with a self-test failure, and (filled as asked)
    batches received and expected per day and, under None, in total."""

    devices: int
    selftest_failed: int
    batches: dict[str | None, tuple[int, int]]


@dataclass(frozen=True)
class _Entry:
    checks: tuple[Any, ...]
    answer: Answer


#: Per engine (a database: tests and the bench open several in one process), newest last.
_entries: WeakKeyDictionary[Engine, OrderedDict[Key, _Entry]] = WeakKeyDictionary()
_lock = threading.Lock()


def _of(session: Session) -> OrderedDict[Key, _Entry]:
    bind = session.get_bind()
    engine = bind if isinstance(bind, Engine) else bind.engine
    found = _entries.get(engine)
    if found is None:
        found = _entries[engine] = OrderedDict()
    return found


def fleet_check(rows: Iterable[FleetRollup]) -> tuple[Any, ...]:
    """What the span's fleet rollups say about its devices' rows (see the module's docstring)."""
    return tuple(
        sorted(
            (r.id, r.device_count, r.selftest_failed_devices, r.skipped_rows, r.window_count)
            for r in rows
        )
    )


def batch_check(session: Session) -> tuple[int, int, int, int]:
    """The batch counts' row count, sums of ``received`` and ``top_sequence``, and generation."""
    generation = (
        select(BatchCountGeneration.generation)
        .where(BatchCountGeneration.id == 1)
        .scalar_subquery()
    )
    rows, received, top, gen = session.exec(
        select(
            func.count(),
            func.coalesce(func.sum(TelemetryBatchCount.received), 0),
            func.coalesce(func.sum(TelemetryBatchCount.top_sequence), 0),
            func.coalesce(generation, 0),
        ).select_from(TelemetryBatchCount)
    ).one()
    return int(rows), int(received), int(top), int(gen)


def get(session: Session, key: Key, checks: tuple[Any, ...]) -> Answer | None:
    """The answer remembered for ``key`` in ``session``'s database if it was stored under the
    same checks."""
    with _lock:
        entries = _of(session)
        entry = entries.get(key)
        if entry is None or entry.checks != checks:
            return None
        entries.move_to_end(key)
        return entry.answer


def put(session: Session, key: Key, checks: tuple[Any, ...], answer: Answer) -> None:
    """Remember ``answer`` (its ``batches`` may be filled in later, by the same request)."""
    with _lock:
        entries = _of(session)
        entries[key] = _Entry(checks, answer)
        entries.move_to_end(key)
        while len(entries) > KEPT:
            entries.popitem(last=False)


def bump_generation(session: Session) -> None:
    """Say, in the caller's transaction, that batch counts lost rows (see the docstring)."""
    bumped = session.exec(
        update(BatchCountGeneration)
        .where(col(BatchCountGeneration.id) == 1)
        .values(generation=BatchCountGeneration.generation + 1)
    ).rowcount
    if not bumped:  # a schema made without the migration's row
        session.add(BatchCountGeneration(id=1, generation=1))
        session.flush()
