"""Telemetry ingest's database work: who is uploading, and appending checked batches.

Every phone uploads on a timer and in bursts (a morning sync wave), so ingest avoids the ORM and
the threadpool where it can, as check-in does (:mod:`server.checkin_store`):

- **Who.** One ``SELECT`` finds the hardware id of the device a credential may upload for (itself,
  or the ring it relays for). PostgreSQL answers the lookups of all uploads waiting at once in one
  statement on an asyncio pool; SQLite reads on a connection of its own, in the event loop (WAL:
  reads never wait for writers). No row means a refusal; the caller works out which
  (:func:`server.deps.get_acting_for` words them), off the hot path.
- **Append.** The uploads that arrive while a statement is in flight are appended together
  (:class:`~server.coalesce.Coalescer`): each batch record (a stored key makes it a replay:
  nothing of it is written), its device's batch count (:mod:`server.batch_counts`) and its
  windows, in one transaction that commits durably (a synchronous commit on PostgreSQL: an
  answered upload survives a crash, and one WAL flush serves every batch in it). PostgreSQL
  does it in one statement (``INSERT ... SELECT FROM unnest(...)`` for each table, chained by
  ``RETURNING``); SQLite in a worker thread on a connection of the store's own, one short
  transaction.
  If a group fails, each of its uploads is tried alone, so one device's bad data never fails
  another's upload.

Windows are not folded into rollups here (:mod:`server.fold` does that later).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import pydantic_core
from anyio import to_thread
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from server import partitions
from server.coalesce import AsyncPool, Coalescer
from server.errors import ConfigError
from server.models import TelemetryBatchRecord, TelemetryWindowRecord
from server.telemetry import Upload

_BATCHES = TelemetryBatchRecord.__table__  # type: ignore[attr-defined]
_WINDOWS = TelemetryWindowRecord.__table__  # type: ignore[attr-defined]

#: The device a credential may upload for: itself, or the ring it is the paired relay of.
_WHO = """
SELECT t.hardware_id FROM device AS t JOIN device AS c ON c.id IN (t.id, t.relay_id)
WHERE t.id = ? AND c.credential_hash = ? AND NOT c.revoked AND NOT t.revoked
"""
_WHO_MANY = """
SELECT v.credential_hash, v.id, t.hardware_id
FROM json_to_recordset(%s::json) AS v(credential_hash varchar, id varchar)
JOIN device AS t ON t.id = v.id
JOIN device AS c ON c.id IN (t.id, t.relay_id) AND c.credential_hash = v.credential_hash
WHERE NOT c.revoked AND NOT t.revoked
"""

#: Batch records, their counts and their windows in one statement: the windows join the records
#: the statement inserted (a replayed key inserts none, so none of its windows), and the counts
#: add what was inserted. Rows go in key order, so two statements at once lock rows in one order.
#: The rows travel as two JSON documents (psycopg dumps a list parameter element by element in
#: Python, several times the cost of the whole statement; pydantic-core writes JSON in Rust).
_APPEND = """
WITH v AS (
  SELECT * FROM json_to_recordset(%s::json) AS v(device_id varchar, hardware_id varchar,
    boot_epoch integer, sequence integer, window_count integer, dropped_windows integer,
    received_at timestamptz)
), b AS (
  INSERT INTO telemetry_batch
    (device_id, boot_epoch, sequence, window_count, dropped_windows, received_at)
  SELECT device_id, boot_epoch, sequence, window_count, dropped_windows, received_at FROM v
  ON CONFLICT (device_id, boot_epoch, sequence) DO NOTHING
  RETURNING id, device_id, boot_epoch, sequence
), c AS (
  INSERT INTO telemetry_batch_count AS n (device_id, boot_epoch, hardware_id, received,
    top_sequence)
  SELECT b.device_id, b.boot_epoch, min(v.hardware_id), count(*), max(b.sequence)
  FROM b JOIN v USING (device_id, boot_epoch, sequence)
  GROUP BY b.device_id, b.boot_epoch ORDER BY b.device_id, b.boot_epoch
  ON CONFLICT (device_id, boot_epoch) DO UPDATE
  SET received = n.received + excluded.received,
      top_sequence = greatest(n.top_sequence, excluded.top_sequence)
), w AS (
  INSERT INTO telemetry_window (batch_id, device_id, hardware_id, model, version, bundle_sha256,
    window_start, window_s, aggregate, folded)
  SELECT b.id, x.device_id, x.hardware_id, x.model, x.version, x.bundle_sha256, x.window_start,
    x.window_s, x.aggregate, false
  FROM json_to_recordset(%s::json) AS x(device_id varchar, boot_epoch integer, sequence integer,
    hardware_id varchar, model varchar, version varchar, bundle_sha256 varchar,
    window_start timestamptz, window_s integer, aggregate json)
  JOIN b ON b.device_id = x.device_id AND b.boot_epoch = x.boot_epoch AND b.sequence = x.sequence
)
SELECT device_id, boot_epoch, sequence FROM b
"""


def make_store(engine: Engine) -> SqliteIngestStore | PostgresIngestStore:
    """The store for ``engine``'s database."""
    if engine.dialect.name == "sqlite":
        return SqliteIngestStore(engine)
    return PostgresIngestStore(engine)


class _Appends:
    """What both stores share: coalesced appends, each upload tried alone when its group fails."""

    engine: Engine

    def __init__(self, max_batch: int, max_in_flight: int) -> None:
        self._appends: Coalescer[Upload, bool] = Coalescer(
            self._append_group, max_batch=max_batch, max_in_flight=max_in_flight
        )

    async def append(self, upload: Upload) -> bool:
        """Store ``upload`` durably; False when its key was stored before (a replay).

        Raises:
            DBAPIError: If the database refuses it (and only it).
        """
        await self._partitions([upload])
        return await self._appends.submit(upload)

    async def _append_group(self, uploads: list[Upload]) -> list[bool | BaseException]:
        # One batch sent twice at once (a retry racing its original) goes in once; the copy is
        # a replay, as it would be a moment later (or fails with it).
        first: dict[tuple[str, int, int], int] = {}
        for i, upload in enumerate(uploads):
            first.setdefault(upload.key, i)
        unique = [uploads[i] for i in sorted(set(first.values()))]
        failed: dict[tuple[str, int, int], BaseException] = {}
        try:
            stored = await self._write(unique)
        except DBAPIError:
            stored = set()
            for upload in unique:
                try:
                    stored |= await self._alone(upload)
                except DBAPIError as exc:
                    failed[upload.key] = exc
        return [
            failed[u.key] if u.key in failed else (i == first[u.key] and u.key in stored)
            for i, u in enumerate(uploads)
        ]

    async def _alone(self, upload: Upload) -> set[tuple[str, int, int]]:
        try:
            return await self._write([upload])
        except DBAPIError:
            if not partitions.is_partitioned(self.engine):
                raise
            # Retention may have dropped a day partition since this process last saw it.
            partitions.forget(self.engine)
            await self._partitions([upload])
            return await self._write([upload])

    async def _partitions(self, uploads: Sequence[Upload]) -> None:
        """Make the day partitions the windows need (PostgreSQL; a thread when one is new)."""
        if not partitions.is_partitioned(self.engine):
            return
        days = {w["window_start"].date() for u in uploads for w in u.windows}
        if partitions.unknown(self.engine, days):
            await to_thread.run_sync(partitions.ensure, self.engine, days)

    async def _write(self, uploads: list[Upload]) -> set[tuple[str, int, int]]:
        raise NotImplementedError


class PostgresIngestStore(_Appends):
    """Lookups and appends on an asyncio pool of autocommit connections (opened on first use in
    the serving loop); each append statement commits synchronously."""

    def __init__(self, engine: Engine, max_batch: int = 128, max_in_flight: int = 1) -> None:
        super().__init__(max_batch, max_in_flight)
        self.engine = engine
        self._who: Coalescer[tuple[str, str], str | None] = Coalescer(
            self._who_group, max_batch=256, max_in_flight=1
        )
        self._pool = AsyncPool(engine, max_size=3)

    async def device(self, credential_hash: str, device_id: str) -> str | None:
        """The hardware id of ``device_id`` if the credential may upload for it, else None."""
        return await self._who.submit((credential_hash, device_id))

    async def _who_group(self, asks: list[tuple[str, str]]) -> list[str | None]:
        pool = await self._pool.get()
        async with pool.connection() as conn:
            document = pydantic_core.to_json([{"credential_hash": c, "id": d} for c, d in asks])
            cursor = await conn.execute(_WHO_MANY, (document.decode(),))
            found = {(r[0], r[1]): r[2] for r in await cursor.fetchall()}
        return [found.get(ask) for ask in asks]

    async def _write(self, uploads: list[Upload]) -> set[tuple[str, int, int]]:
        ordered = sorted(uploads, key=lambda u: u.key)
        batches = [
            {
                "device_id": u.device_id,
                "hardware_id": u.hardware_id,
                "boot_epoch": u.boot_epoch,
                "sequence": u.sequence,
                "window_count": u.window_count,
                "dropped_windows": u.dropped_windows,
                "received_at": u.received_at,
            }
            for u in ordered
        ]
        windows = [w for u in ordered for w in u.windows]
        params = (pydantic_core.to_json(batches).decode(), pydantic_core.to_json(windows).decode())
        pool = await self._pool.get()
        try:
            async with pool.connection() as conn:
                cursor = await conn.execute(_APPEND, params)
                rows = await cursor.fetchall()
        except Exception as exc:  # psycopg's errors, as the ORM path would raise them
            import psycopg

            if isinstance(exc, psycopg.Error):
                raise DBAPIError(_APPEND, None, exc) from exc
            raise
        return {(r[0], r[1], r[2]) for r in rows}

    async def close(self) -> None:
        """Close the pool (at application shutdown)."""
        await self._pool.close()


_SQLITE_RECORD = (
    "INSERT INTO telemetry_batch (device_id, boot_epoch, sequence, window_count, dropped_windows,"
    " received_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id"
)
_SQLITE_COUNT = (
    "INSERT INTO telemetry_batch_count (device_id, boot_epoch, hardware_id, received,"
    " top_sequence) VALUES (?, ?, ?, 1, ?) ON CONFLICT (device_id, boot_epoch) DO UPDATE"
    " SET received = received + 1, top_sequence = max(top_sequence, excluded.top_sequence)"
)
_SQLITE_WINDOWS = (
    "INSERT INTO telemetry_window (batch_id, device_id, hardware_id, model, version,"
    " bundle_sha256, window_start, window_s, aggregate, folded)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0)"
)


class SqliteIngestStore(_Appends):
    """Lookups on a read-only connection in the event loop; appends in a worker thread on a
    write connection, one transaction per group (``BEGIN IMMEDIATE``: it queues for SQLite's
    write lock in the busy handler, off the event loop). Both connections are the store's own.
    Times are stored as the ORM stores them (the columns' own bind processors); aggregates as
    JSON text, which the column's JSON type reads.

    Raises:
        ConfigError: If the database is not a file (a second connection could not share it).
    """

    def __init__(self, engine: Engine, max_batch: int = 128, busy_timeout_s: float = 30.0) -> None:
        super().__init__(max_batch, max_in_flight=1)
        self.engine = engine
        database = engine.url.database
        if not database or database == ":memory:" or database.startswith("file:"):
            raise ConfigError(f"the SQLite database must be a file path, not {database!r}")
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            database, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA query_only=ON")
        self._writer: sqlite3.Connection | None = sqlite3.connect(
            database, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._writer.execute("PRAGMA journal_mode=WAL")
        self._writer.execute("PRAGMA synchronous=NORMAL")
        dialect = engine.dialect
        self._time = {
            name: table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
            for table, name in ((_BATCHES, "received_at"), (_WINDOWS, "window_start"))
        }

    async def device(self, credential_hash: str, device_id: str) -> str | None:
        """The hardware id of ``device_id`` if the credential may upload for it, else None."""
        if self._conn is None:
            raise ConfigError("the ingest store is closed")
        row = self._conn.execute(_WHO, (device_id, credential_hash)).fetchone()
        return None if row is None else str(row[0])

    async def _write(self, uploads: list[Upload]) -> set[tuple[str, int, int]]:
        # The rows are made here, so the worker thread runs little Python: a thread holding
        # the GIL would keep the event loop waiting for it at every socket write.
        received_at = self._time["received_at"] or (lambda v: v)
        window_start = self._time["window_start"] or (lambda v: v)
        rows = [
            (
                u.key,
                (
                    u.device_id,
                    u.boot_epoch,
                    u.sequence,
                    u.window_count,
                    u.dropped_windows,
                    received_at(u.received_at),
                ),
                (u.device_id, u.boot_epoch, u.hardware_id, u.sequence),
                [
                    (
                        w["device_id"],
                        w["hardware_id"],
                        w["model"],
                        w["version"],
                        w["bundle_sha256"],
                        window_start(w["window_start"]),
                        w["window_s"],
                        pydantic_core.to_json(w["aggregate"]).decode(),
                    )
                    for w in u.windows
                ],
            )
            for u in uploads
        ]
        return await to_thread.run_sync(self._write_rows, rows)

    def _write_rows(self, rows: list[tuple[Any, ...]]) -> set[tuple[str, int, int]]:
        conn = self._writer
        if conn is None:
            raise ConfigError("the ingest store is closed")
        stored = set()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for key, record, count, windows in rows:
                found = conn.execute(_SQLITE_RECORD, record).fetchone()
                if found is None:
                    continue  # a replay
                conn.execute(_SQLITE_COUNT, count)
                conn.executemany(_SQLITE_WINDOWS, [(found[0], *w) for w in windows])
                stored.add(key)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise DBAPIError(_SQLITE_WINDOWS, None, exc) from exc
        return stored

    async def close(self) -> None:
        """Close the store's own connections."""
        for conn in (self._conn, self._writer):
            if conn is not None:
                conn.close()
        self._conn = self._writer = None
