"""The durable telemetry outbox: windows and upload batches in SQLite (WAL) under the state dir.

Open windows are rewritten as inferences are flushed into them; closed windows wait for upload.
A batch takes up to ``max_windows`` closed windows of one device and gets that device's next
sequence number in this boot epoch; the batch's bytes are stored before the first attempt, so a
retry, even after a restart, re-sends the same idempotency key (device, boot epoch, sequence) and
the same windows, and the server's dedup makes it a no-op if the first attempt landed.

Boot epoch: at each open, ``max(previous + 1, seconds since 2024-01-01)``, so it grows across
restarts and stays new even if the database was lost (sequences restart at 0 in each epoch, as
the server's completeness ratio expects).

A phone also keeps its ring's telemetry here (:meth:`Outbox.put_relayed`): batches keyed as the
ring made them (ring id, its boot epoch and sequence), sent by
:func:`device_agent.telemetry_upload.upload_pending` like the phone's own.

The outbox also remembers every model version this device ran (:meth:`Outbox.remember_version`):
its bundle and label classes, so a label that arrives after the device moved on is counted for the
version that made the prediction, across restarts and version switches.

Disk is bounded by ``max_bytes`` of stored window and batch bodies: past it the oldest closed
windows (then the oldest pending batches) are deleted, counted per device, reported in the next
batch's ``dropped_windows`` (a relayed ring's drops show as gaps in its sequence instead) and
in :meth:`Outbox.stats`. Open windows are never dropped.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.errors import OutboxError
from firmware_bundles.messages import TelemetryBatch

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    next_sequence INTEGER NOT NULL DEFAULT 0,
    dropped_unreported INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS windows (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    window_start INTEGER NOT NULL,
    closed INTEGER NOT NULL DEFAULT 0,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS windows_closed ON windows (closed, window_start, id);
CREATE TABLE IF NOT EXISTS batches (
    device_id TEXT NOT NULL,
    boot_epoch INTEGER NOT NULL,
    sequence INTEGER NOT NULL,
    window_count INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (device_id, boot_epoch, sequence)
);
CREATE TABLE IF NOT EXISTS relayed (device_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS versions (
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    classes TEXT,
    first_run REAL NOT NULL,
    PRIMARY KEY (model, version)
) WITHOUT ROWID;
"""
#: Boot epochs count seconds from 2024-01-01T00:00:00Z, not from 1970, so they stay within the
#: server's 32-bit column until 2092; a clock set far ahead is capped and epochs then grow by one.
BOOT_EPOCH_BASE_S = 1_704_067_200
_MAX_CLOCK_EPOCH = 2**30


@dataclass(frozen=True)
class RanVersion:
    """A model version this device ran: its bundle, and its label classes (None: any name)."""

    model: str
    version: str
    bundle_sha256: str
    classes: frozenset[str] | None


@dataclass(frozen=True)
class StoredWindow:
    """A window row: its id, device, start, and the TelemetryWindow JSON bytes."""

    row_id: int
    device_id: str
    window_start: int
    body: bytes


class Outbox:
    """Telemetry windows and batches in one SQLite file; thread-safe.

    Args:
        path: The database file (created with its directory).
        max_bytes: Bound on stored window and batch bodies.
        wall_clock: Unix time in seconds, for the boot epoch.

    Raises:
        OutboxError: If the database cannot be opened or written.
    """

    def __init__(
        self, path: Path, max_bytes: int, *, wall_clock: Callable[[], float] = time.time
    ) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.RLock()
        self._last_rejection: str | None = None
        #: Where a database that SQLite could not read was moved, if that happened at open.
        self.set_aside: Path | None = None
        try:
            self._open(wall_clock)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) or not self.path.exists():
                raise OutboxError(f"cannot open the telemetry outbox {self.path}: {exc}") from exc
            # Not a database (bad flash, a truncated copy): keep it for a post-mortem and start
            # afresh, so telemetry (and the agent) keep working; stats() says so.
            self._db.close()
            self.set_aside = self._set_aside()
            try:
                self._open(wall_clock)
            except sqlite3.Error as again:
                raise OutboxError(
                    f"cannot open the telemetry outbox {self.path}: {again}"
                ) from again

    def _set_aside(self) -> Path:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.time_ns()}")
        try:
            for suffix in ("", "-wal", "-shm"):
                part = Path(f"{self.path}{suffix}")
                if part.exists():
                    part.rename(Path(f"{aside}{suffix}"))
        except OSError as exc:
            raise OutboxError(
                f"cannot move the unreadable outbox {self.path} aside: {exc}"
            ) from exc
        return aside

    def _open(self, wall_clock: Callable[[], float]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(f"cannot create {self.path.parent}: {exc}") from exc
        self._db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=10
        )
        # Set before the first table exists, so deleted rows give pages back to the file.
        self._db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        self._db.execute("PRAGMA journal_mode = WAL")
        # NORMAL: a commit survives a process crash; a power cut may lose the last window flushes
        # but never corrupts. Sequence numbers and boot epochs are committed with FULL (_durable).
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute("PRAGMA journal_size_limit = 1048576")
        self._db.executescript(_SCHEMA)
        with self._durable():
            previous = self._meta("boot_epoch", -1)
            since_base = int(wall_clock()) - BOOT_EPOCH_BASE_S
            self.boot_epoch = max(previous + 1, min(max(since_base, 0), _MAX_CLOCK_EPOCH))
            self._set_meta("boot_epoch", self.boot_epoch)
            self._db.execute("UPDATE devices SET next_sequence = 0")
        self._bytes = self._stored_bytes()

    # -- plumbing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise OutboxError(f"telemetry outbox {self.path}: {exc}") from exc

    @contextlib.contextmanager
    def _durable(self) -> Iterator[sqlite3.Connection]:
        """A transaction fsynced at commit: for sequence numbers and boot epochs, which must
        never be reused for other content after a power cut."""
        with self._lock:
            self._db.execute("PRAGMA synchronous = FULL")
            try:
                with self._transaction() as db:
                    yield db
            finally:
                self._db.execute("PRAGMA synchronous = NORMAL")

    def _meta(self, key: str, default: int) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else int(row[0])

    def _set_meta(self, key: str, value: int) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _select(self, sql: str, *params: Any) -> list[Any]:
        """Every row ``sql`` selects, read under the lock."""
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # -- windows ----------------------------------------------------------------------------

    def open_windows(self, device_id: str) -> list[StoredWindow]:
        """Windows of ``device_id`` still open (to continue them after a restart)."""
        rows = self._select(
            "SELECT id, device_id, window_start, body FROM windows"
            " WHERE closed = 0 AND device_id = ? ORDER BY id",
            device_id,
        )
        return [StoredWindow(int(r[0]), r[1], int(r[2]), bytes(r[3])) for r in rows]

    def save_windows(
        self, windows: list[tuple[int | None, str, int, bytes]], *, close: bool = False
    ) -> list[int]:
        """Insert or rewrite windows ``(row id or None, device id, start, body)``; their row ids.

        With ``close`` they are closed too (ready for upload). Past ``max_bytes``, the oldest
        closed windows are dropped and counted.

        Raises:
            OutboxError: If the database cannot be written.
        """
        ids = []
        with self._transaction() as db:
            for row_id, device_id, start, body in windows:
                if row_id is None:
                    cursor = db.execute(
                        "INSERT INTO windows (device_id, window_start, closed, body)"
                        " VALUES (?, ?, ?, ?)",
                        (device_id, start, int(close), body),
                    )
                    self._bytes += len(body)
                    ids.append(int(cursor.lastrowid or 0))
                else:
                    old = db.execute("SELECT LENGTH(body) FROM windows WHERE id = ?", (row_id,))
                    previous = old.fetchone()
                    db.execute(
                        "UPDATE windows SET body = ?, closed = MAX(closed, ?) WHERE id = ?",
                        (body, int(close), row_id),
                    )
                    self._bytes += len(body) - (int(previous[0]) if previous else 0)
                    ids.append(row_id)
            dropped = self._enforce_budget(db)
        if dropped:
            self._compact()
        return ids

    def close_windows(self, row_ids: list[int]) -> None:
        """Mark windows closed: they go into the next batches."""
        with self._transaction() as db:
            db.executemany("UPDATE windows SET closed = 1 WHERE id = ?", [(i,) for i in row_ids])

    def _enforce_budget(self, db: sqlite3.Connection) -> int:
        dropped = 0
        while self._bytes > self.max_bytes:
            row = db.execute(
                "SELECT id, device_id, LENGTH(body) FROM windows WHERE closed = 1"
                " ORDER BY window_start, id LIMIT 1"
            ).fetchone()
            if row is not None:
                db.execute("DELETE FROM windows WHERE id = ?", (row[0],))
                self._count_dropped(db, row[1], 1)
                self._bytes -= int(row[2])
                dropped += 1
                continue
            batch = db.execute(
                # Oldest stored first: a relayed ring's boot epochs are not on our scale.
                "SELECT device_id, boot_epoch, sequence, window_count, LENGTH(body) FROM batches"
                " ORDER BY rowid LIMIT 1"
            ).fetchone()
            if batch is None:
                break  # only open windows are left; they are never dropped
            db.execute(
                "DELETE FROM batches WHERE device_id = ? AND boot_epoch = ? AND sequence = ?",
                batch[:3],
            )
            self._count_dropped(db, batch[0], int(batch[3]))
            self._bytes -= int(batch[4])
            dropped += int(batch[3])
        return dropped

    def _count_dropped(self, db: sqlite3.Connection, device_id: str, count: int) -> None:
        relayed = db.execute("SELECT 1 FROM relayed WHERE device_id = ?", (device_id,)).fetchone()
        # A relayed device's drops reach the server as gaps in its own sequence; a batch of ours
        # reporting them would start a sequence under its id that the device never had.
        if relayed is None:
            db.execute(
                "INSERT INTO devices (device_id, dropped_unreported) VALUES (?, ?)"
                " ON CONFLICT (device_id) DO UPDATE"
                " SET dropped_unreported = dropped_unreported + excluded.dropped_unreported",
                (device_id, count),
            )
        self._set_meta("dropped_total", self._meta("dropped_total", 0) + count)

    def _compact(self) -> None:
        # Give freed pages back to the file system, and keep the WAL file from holding them.
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA incremental_vacuum")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- versions ran -----------------------------------------------------------------------

    def remember_version(self, ran: RanVersion) -> None:
        """Record that this device ran ``ran`` (again: its bundle and classes are refreshed).

        Raises:
            OutboxError: If the database cannot be written.
        """
        classes = None if ran.classes is None else json.dumps(sorted(ran.classes))
        with self._transaction() as db:
            db.execute(
                "INSERT INTO versions (model, version, bundle_sha256, classes, first_run)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (model, version) DO UPDATE"
                " SET bundle_sha256 = excluded.bundle_sha256, classes = excluded.classes",
                (ran.model, ran.version, ran.bundle_sha256, classes, time.time()),
            )

    def ran_versions(self, model: str) -> dict[str, RanVersion]:
        """Every version of ``model`` this device ran, by version."""
        rows = self._select(
            "SELECT version, bundle_sha256, classes FROM versions"
            " WHERE model = ? ORDER BY first_run",
            model,
        )
        return {
            str(r[0]): RanVersion(
                model, str(r[0]), str(r[1]), None if r[2] is None else frozenset(json.loads(r[2]))
            )
            for r in rows
        }

    # -- batches ----------------------------------------------------------------------------

    def next_batch(self, max_windows: int, device_id: str | None = None) -> TelemetryBatch | None:
        """The oldest pending batch, else a new one of up to ``max_windows`` closed windows of one
        device (``device_id`` if given), or None when there is nothing to send.

        A new batch carries the device's windows dropped since its last batch; it may hold no
        windows at all when dropping is all there is to report.

        Raises:
            OutboxError: If the database cannot be written.
        """
        body = self.next_batch_bytes(max_windows, device_id)
        return None if body is None else TelemetryBatch.from_bytes(body)

    def next_batch_bytes(self, max_windows: int, device_id: str | None = None) -> bytes | None:
        """:meth:`next_batch` as the exact bytes to send."""
        if max_windows < 1:
            raise ValueError("max_windows must be at least 1")
        with self._lock:
            pending = self._pending(device_id)
            if pending is not None:
                return pending
            with self._durable() as db:
                if device_id is None:
                    row = db.execute(
                        "SELECT device_id FROM windows WHERE closed = 1"
                        " ORDER BY window_start, id LIMIT 1"
                    ).fetchone()
                    if row is None:
                        row = db.execute(
                            "SELECT device_id FROM devices WHERE dropped_unreported > 0 LIMIT 1"
                        ).fetchone()
                    if row is None:
                        return None
                    device_id = str(row[0])
                rows = db.execute(
                    "SELECT id, body FROM windows WHERE closed = 1 AND device_id = ?"
                    " ORDER BY window_start, id LIMIT ?",
                    (device_id, max_windows),
                ).fetchall()
                state = db.execute(
                    "SELECT next_sequence, dropped_unreported FROM devices WHERE device_id = ?",
                    (device_id,),
                ).fetchone()
                sequence, dropped = (int(state[0]), int(state[1])) if state else (0, 0)
                if not rows and not dropped:
                    return None
                body = _batch_bytes(device_id, self.boot_epoch, sequence, rows, dropped)
                db.execute(
                    "INSERT INTO batches (device_id, boot_epoch, sequence, window_count, body)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (device_id, self.boot_epoch, sequence, len(rows), body),
                )
                db.executemany("DELETE FROM windows WHERE id = ?", [(r[0],) for r in rows])
                db.execute(
                    "INSERT INTO devices (device_id, next_sequence, dropped_unreported)"
                    " VALUES (?, ?, 0) ON CONFLICT (device_id) DO UPDATE"
                    " SET next_sequence = excluded.next_sequence, dropped_unreported = 0",
                    (device_id, sequence + 1),
                )
                self._bytes += len(body) - sum(len(r[1]) for r in rows)
            return body

    def _pending(self, device_id: str | None) -> bytes | None:
        query = "SELECT body FROM batches"
        args: tuple[Any, ...] = ()
        if device_id is not None:
            query += " WHERE device_id = ?"
            args = (device_id,)
        row = self._db.execute(query + " ORDER BY boot_epoch, sequence LIMIT 1", args).fetchone()
        return None if row is None else bytes(row[0])

    def put_relayed(self, batch: TelemetryBatch) -> None:
        """Store a batch another device made (the ring this phone relays for), keyed as it came.

        The device's id, boot epoch and sequence are kept, so the server drops a piece it already
        has however often the ring is read; storing a key again replaces its body. Committed
        with fsync before it returns: the ring may forget the piece once this returns.

        Raises:
            OutboxError: If the database cannot be written.
        """
        body = batch.to_bytes()
        with self._durable() as db:
            db.execute("INSERT OR IGNORE INTO relayed (device_id) VALUES (?)", (batch.device_id,))
            key = "device_id = ? AND boot_epoch = ? AND sequence = ?"
            old = db.execute(f"SELECT LENGTH(body) FROM batches WHERE {key}", batch.idempotency_key)
            previous = old.fetchone()
            db.execute(
                "INSERT INTO batches (device_id, boot_epoch, sequence, window_count, body)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (device_id, boot_epoch, sequence) DO UPDATE"
                " SET window_count = excluded.window_count, body = excluded.body",
                (*batch.idempotency_key, len(batch.windows), body),
            )
            self._bytes += len(body) - (int(previous[0]) if previous else 0)
            dropped = self._enforce_budget(db)
        if dropped:
            self._compact()

    def relayed_devices(self) -> list[str]:
        """Ids of the devices whose batches :meth:`put_relayed` has stored, in id order."""
        return [str(r[0]) for r in self._select("SELECT device_id FROM relayed ORDER BY device_id")]

    def acknowledge(self, batch: TelemetryBatch) -> None:
        """Forget a batch the server accepted (or recognised as a replay)."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT LENGTH(body) FROM batches"
                " WHERE device_id = ? AND boot_epoch = ? AND sequence = ?",
                batch.idempotency_key,
            ).fetchone()
            db.execute(
                "DELETE FROM batches WHERE device_id = ? AND boot_epoch = ? AND sequence = ?",
                batch.idempotency_key,
            )
            if row is not None:
                self._bytes -= int(row[0])

    def reject(self, batch: TelemetryBatch, reason: str) -> None:
        """Drop a batch the server will never accept, counting its windows as dropped."""
        with self._transaction() as db:
            db.execute(
                "DELETE FROM batches WHERE device_id = ? AND boot_epoch = ? AND sequence = ?",
                batch.idempotency_key,
            )
            self._count_dropped(db, batch.device_id, len(batch.windows))
            self._set_meta("rejected_batches", self._meta("rejected_batches", 0) + 1)
        self._last_rejection = reason
        self._bytes = self._stored_bytes()

    def _stored_bytes(self) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT (SELECT COALESCE(SUM(LENGTH(body)), 0) FROM windows)"
                " + (SELECT COALESCE(SUM(LENGTH(body)), 0) FROM batches)"
            ).fetchone()
        return int(row[0])

    def stats(self) -> dict[str, Any]:
        """JSON-able counts: windows, batches, bytes against the bound, what was dropped."""
        with self._lock:
            db = self._db
            open_, closed = (
                int(db.execute("SELECT COUNT(*) FROM windows WHERE closed = ?", (c,)).fetchone()[0])
                for c in (0, 1)
            )
            pending = int(db.execute("SELECT COUNT(*) FROM batches").fetchone()[0])
            unreported = int(
                db.execute("SELECT COALESCE(SUM(dropped_unreported), 0) FROM devices").fetchone()[0]
            )
            return {
                "open_windows": open_,
                "closed_windows": closed,
                "pending_batches": pending,
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "dropped_windows": self._meta("dropped_total", 0),
                "dropped_unreported": unreported,
                "rejected_batches": self._meta("rejected_batches", 0),
                "last_rejection": self._last_rejection,
                "boot_epoch": self.boot_epoch,
                "set_aside": None if self.set_aside is None else str(self.set_aside),
            }

    def close(self) -> None:
        """Close the database (a checkpoint folds the WAL into the main file)."""
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()


def _batch_bytes(
    device_id: str, boot_epoch: int, sequence: int, rows: list[Any], dropped: int
) -> bytes:
    # Validated here, so a bad row fails on the device, not at the server; the canonical bytes
    # are then kept for every retry.
    batch = TelemetryBatch.from_dict(
        {
            "device_id": device_id,
            "boot_epoch": boot_epoch,
            "sequence": sequence,
            "windows": [json.loads(bytes(r[1])) for r in rows],
            "dropped_windows": dropped,
        }
    )
    return batch.to_bytes()
