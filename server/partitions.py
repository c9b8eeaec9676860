"""PostgreSQL day partitions of ``telemetry_window``: made as windows for a new event-time day
arrive, and dropped whole by retention once every window in them is folded.

One partition per UTC day, ``telemetry_window_pYYYYMMDD`` (migration 0009 partitions the table).
SQLite has no partitions: there ingest needs nothing made and retention deletes rows.
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from collections.abc import Iterable
from datetime import date, timedelta

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

log = logging.getLogger("edgefleet.server.partitions")

_NAME = re.compile(r"^telemetry_window_p(\d{8})$")
#: Days known to have a partition, per engine URL (a process makes each at most once, unless
#: retention dropped it since; :func:`forget` clears the memory after an insert finds one gone).
_known: dict[str, set[date]] = {}
#: Each engine's key in ``_known`` (its URL as text, so engines on one database share what they
#: know), kept: rendering a URL costs as much as the rest of a lookup, once per upload.
_keys: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()


def _key(engine: Engine) -> str:
    key = _keys.get(engine)
    if key is None:
        key = _keys[engine] = str(engine.url)
    return key


_lock = threading.Lock()


def name(day: date) -> str:
    return f"telemetry_window_p{day:%Y%m%d}"


def is_partitioned(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def ensure(engine: Engine, days: Iterable[date]) -> None:
    """Make the partitions of ``days`` that this process has not seen yet (PostgreSQL).

    Runs on its own connection, outside the caller's transaction: ``CREATE TABLE ... PARTITION OF``
    locks the parent briefly, and must not wait on (or hold) the caller's locks.
    """
    if not is_partitioned(engine):
        return
    key = _key(engine)
    with _lock:
        known = _known.setdefault(key, set())
        missing = sorted(set(days) - known)
    if not missing:
        return
    with engine.connect() as conn:
        for day in missing:
            _create(conn, day)
    with _lock:
        known.update(missing)


def unknown(engine: Engine, days: Iterable[date]) -> bool:
    """Whether any of ``days`` may lack a partition (none this process made or saw yet)."""
    if not is_partitioned(engine):
        return False
    with _lock:
        return not set(days) <= _known.get(_key(engine), set())


def create_statement(day: date) -> str:
    """The SQL that makes ``day``'s partition unless it exists."""
    return (
        f"CREATE TABLE IF NOT EXISTS {name(day)} PARTITION OF telemetry_window"
        f" FOR VALUES FROM ('{day.isoformat()} 00:00:00+00')"
        f" TO ('{(day + timedelta(days=1)).isoformat()} 00:00:00+00')"
    )


def _create(conn: Connection, day: date) -> None:
    try:
        # The create's locks taken first, in the order every upload's append takes them
        # (batch records, then windows), each in the mode the create needs anyway: SHARE ROW
        # EXCLUSIVE on telemetry_batch (the new partition's foreign key) and ACCESS EXCLUSIVE on
        # the parent. Taken by the create itself, in its own order or by upgrading a weaker
        # lock, they deadlocked with appends in flight (seen under bench/bench_server.py and
        # bench/load_fleet.py) and with a fold. Taken this way, the create waits for the
        # transactions in flight and new ones wait for its brief commit.
        conn.execute(text("LOCK TABLE telemetry_batch IN SHARE ROW EXCLUSIVE MODE"))
        conn.execute(text("LOCK TABLE telemetry_window IN ACCESS EXCLUSIVE MODE"))
        conn.execute(text(create_statement(day)))
        conn.commit()
    except DBAPIError:
        # Another process made it between IF NOT EXISTS's check and the create (a unique
        # violation in the catalogue): it exists now, which is all this wanted.
        conn.rollback()
        if not _exists(conn, day):
            raise


def _exists(conn: Connection, day: date) -> bool:
    return conn.execute(text("SELECT to_regclass(:n) IS NOT NULL"), {"n": name(day)}).scalar_one()


def forget(engine: Engine) -> None:
    """Forget which partitions exist (one was dropped under us: the next insert makes it again)."""
    with _lock:
        _known.pop(_key(engine), None)


def days(conn: Connection) -> list[date]:
    """The days that have a partition, oldest first."""
    rows = conn.execute(
        text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'telemetry_window'::regclass"
        )
    ).scalars()
    found = []
    for relname in rows:
        match = _NAME.match(relname)
        if match:
            found.append(date(int(match[1][:4]), int(match[1][4:6]), int(match[1][6:])))
    return sorted(found)


def drop_before(engine: Engine, cutoff: date) -> tuple[int, list[date]]:
    """Drop each day partition wholly before ``cutoff`` whose windows are all folded; returns how
    many windows went, and the days kept because windows there still wait to be folded.

    Each partition is locked before it is checked, so no window can arrive in it between the
    check and the drop (a late upload waiting on the lock fails and is retried by its device:
    see :mod:`server.ingest_store`).
    """
    dropped, waiting = 0, []
    with engine.connect() as conn:
        old = [d for d in days(conn) if d < cutoff]
        conn.rollback()
        for day in old:
            table = name(day)
            with conn.begin():
                conn.execute(text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
                unfolded = conn.execute(
                    text(f"SELECT count(*) FROM {table} WHERE NOT folded")
                ).scalar_one()
                if unfolded:
                    waiting.append(day)
                    continue
                dropped += conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
                conn.execute(text(f"DROP TABLE {table}"))
    if old:
        forget(engine)
    return dropped, waiting
