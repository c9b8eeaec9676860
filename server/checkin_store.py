"""Check-in's one write: authenticate a device by credential hash and record its contact.

One ``UPDATE device ... RETURNING`` per check-in, on the raw driver connection rather than the ORM
(check-in is the busiest request); it also returns the state hash the event log last recorded for
the device, so only a changed state costs more (:mod:`server.device_events`). SQLite runs it in the
event loop on a connection of its own (see :class:`SqliteCheckInStore` for why not the pool's).
PostgreSQL coalesces the check-ins that arrive while a statement is in flight into the next one
(``UPDATE ... FROM json_to_recordset(...)``) on an asyncio pool, so the loop goes on serving while
the database works and the driver's per-statement cost is shared; every check-in is still recorded
before it is answered, with an asynchronous commit (:data:`ASYNC_COMMIT`).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import pydantic_core
from sqlalchemy import Engine, bindparam, select, update
from sqlmodel import col

from server.coalesce import AsyncPool, Coalescer
from server.errors import ConfigError
from server.models import Device, DeviceState

_STATE_COLUMNS = ["last_seen", "last_nonce", "firmware_version", "installed"]
_CAPS_COLUMNS = ["free_flash_bytes", "free_ram_bytes"]


class DeviceRow(NamedTuple):
    """What check-in needs to know of the device it authenticated."""

    hardware_id: str
    free_flash_bytes: int
    #: The state hash the event log last recorded for the device (None: none yet).
    recorded_state_hash: str | None


@dataclass
class Contact:
    """What one check-in records."""

    credential_hash: str
    device_id: str
    last_seen: datetime
    nonce: str
    firmware_version: str
    installed: list[dict[str, Any]]
    #: :func:`server.device_events.state_hash` of the reported firmware and models.
    state_hash: str
    free_flash_bytes: int | None = None
    free_ram_bytes: int | None = None


def make_store(engine: Engine) -> SqliteCheckInStore | PostgresCheckInStore:
    """The store for ``engine``'s database."""
    if engine.dialect.name == "sqlite":
        return SqliteCheckInStore(engine)
    return PostgresCheckInStore(engine)


def _update_self(columns: list[str]) -> Any:
    recorded = (
        select(col(DeviceState.state_hash))
        .where(col(DeviceState.device_id) == col(Device.id))
        .scalar_subquery()
    )
    return (
        update(Device)
        .where(
            col(Device.credential_hash) == bindparam("b_credential"),
            col(Device.id) == bindparam("b_device"),
            col(Device.revoked).is_(False),
        )
        .values({c: bindparam(c) for c in columns})
        .returning(col(Device.hardware_id), col(Device.free_flash_bytes), recorded)
    )


class SqliteCheckInStore:
    """The UPDATE compiled once, run with the columns' own bind processors (so values are stored
    exactly as the ORM stores and reads them) on a connection of its own, in autocommit.

    Its own connection, not one from the engine's pool: a sync route's session holds the pooled
    connection until its response is sent, which needs the event loop, so waiting for that
    connection on the loop deadlocked until the pool timed out. A second connection waits only
    for SQLite's write lock, which every writer releases at commit, inside its handler; WAL lets
    readers go on meanwhile.

    Raises:
        ConfigError: If the database is not a file (a second connection could not share it).
    """

    def __init__(self, engine: Engine, busy_timeout_s: float = 5.0) -> None:
        self.engine = engine
        dialect = engine.dialect
        table = Device.__table__  # type: ignore[attr-defined]
        self._processors = {
            c: p
            for c in _STATE_COLUMNS + _CAPS_COLUMNS
            if (p := table.c[c].type.dialect_impl(dialect).bind_processor(dialect)) is not None
        }
        self._statements = {}
        for caps in (False, True):
            compiled = _update_self(_STATE_COLUMNS + (_CAPS_COLUMNS if caps else [])).compile(
                dialect=dialect
            )
            self._statements[caps] = (compiled.string, list(compiled.positiontup or []))
        database = engine.url.database
        if not database or database == ":memory:" or database.startswith("file:"):
            raise ConfigError(f"the SQLite database must be a file path, not {database!r}")
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            database, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")

    async def record(self, contact: Contact) -> DeviceRow | None:
        """Authenticate and record; the device's hardware id and free flash, or None."""
        caps = contact.free_flash_bytes is not None
        sql, order = self._statements[caps]
        values = {
            "b_credential": contact.credential_hash,
            "b_device": contact.device_id,
            "last_seen": contact.last_seen,
            "last_nonce": contact.nonce,
            "firmware_version": contact.firmware_version,
            "installed": contact.installed,
            "free_flash_bytes": contact.free_flash_bytes,
            "free_ram_bytes": contact.free_ram_bytes,
        }
        for name, processor in self._processors.items():
            values[name] = processor(values[name])
        if self._conn is None:
            raise ConfigError("the check-in store is closed")
        # One statement in autocommit: atomic on its own, and no await while SQLite's write
        # lock is held.
        row = self._conn.execute(sql, tuple(values[name] for name in order)).fetchone()
        return None if row is None else DeviceRow(row[0], row[1], row[2])

    async def close(self) -> None:
        """Close the store's own connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# One statement for any number of check-ins; NULL capabilities keep the stored ones.
_BATCH_UPDATE = """
UPDATE device AS d SET
  last_seen = v.last_seen,
  last_nonce = v.nonce,
  firmware_version = v.firmware_version,
  installed = v.installed,
  free_flash_bytes = COALESCE(v.free_flash_bytes, d.free_flash_bytes),
  free_ram_bytes = COALESCE(v.free_ram_bytes, d.free_ram_bytes)
FROM json_to_recordset(%s::json) AS v(credential_hash varchar, id varchar, last_seen timestamptz,
  nonce varchar, firmware_version varchar, installed json, free_flash_bytes bigint,
  free_ram_bytes bigint)
LEFT JOIN device_state AS s ON s.device_id = v.id
WHERE d.credential_hash = v.credential_hash AND d.id = v.id AND NOT d.revoked
RETURNING d.credential_hash, d.id, d.hardware_id, d.free_flash_bytes, s.state_hash
"""


#: Check-in's contact record commits without waiting for its WAL flush: on a crash of
#: PostgreSQL the last fraction of a second of last-seen times can be lost (never half of a
#: statement; the device's next check-in records it again), and check-ins stop queueing behind
#: the disk's flushes (a large blob being stored, say). Install outcomes, reverts and every
#: other write keep synchronous commits.
ASYNC_COMMIT = "-c synchronous_commit=off"


class PostgresCheckInStore:
    """Check-ins coalesced into one ``UPDATE ... FROM json_to_recordset(...)`` per round trip.

    While statements are in flight, arriving check-ins queue; the next statement takes them all
    (up to ``max_batch``, :class:`~server.coalesce.Coalescer`). A device appearing twice in a
    batch is recorded once, with its latest contact. The psycopg pool of autocommit connections
    opens on first use in the serving loop.
    """

    def __init__(self, engine: Engine, max_batch: int = 256, max_in_flight: int = 2) -> None:
        self.engine = engine
        self._coalescer: Coalescer[Contact, DeviceRow | None] = Coalescer(
            self._execute, max_batch=max_batch, max_in_flight=max_in_flight
        )
        self._pool = AsyncPool(engine, max_size=max_in_flight, options=ASYNC_COMMIT)

    async def record(self, contact: Contact) -> DeviceRow | None:
        """Authenticate and record; the device's hardware id and free flash, or None."""
        return await self._coalescer.submit(contact)

    async def _execute(self, contacts: list[Contact]) -> list[DeviceRow | None]:
        latest: dict[tuple[str, str], Contact] = {}
        for contact in contacts:
            latest[(contact.credential_hash, contact.device_id)] = contact
        unique = list(latest.values())
        # One JSON document rather than a list per column: psycopg dumps lists element by
        # element in Python; pydantic-core writes the JSON in Rust.
        document = pydantic_core.to_json(
            [
                {
                    "credential_hash": c.credential_hash,
                    "id": c.device_id,
                    "last_seen": c.last_seen,
                    "nonce": c.nonce,
                    "firmware_version": c.firmware_version,
                    "installed": c.installed,
                    "free_flash_bytes": c.free_flash_bytes,
                    "free_ram_bytes": c.free_ram_bytes,
                }
                for c in unique
            ]
        ).decode()
        pool = await self._pool.get()
        async with pool.connection() as conn:
            cursor = await conn.execute(_BATCH_UPDATE, (document,))
            rows = await cursor.fetchall()
        found = {(r[0], r[1]): DeviceRow(r[2], r[3], r[4]) for r in rows}
        return [found.get((c.credential_hash, c.device_id)) for c in contacts]

    async def close(self) -> None:
        """Close the pool (at application shutdown)."""
        await self._pool.close()
