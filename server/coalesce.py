"""Requests that arrive while a database statement is in flight share the next one; and the
asyncio connection pool the hot paths' PostgreSQL statements run on.

Check-in (:mod:`server.checkin_store`) and telemetry ingest (:mod:`server.ingest_store`) write
one small row set per request; one statement (and, for ingest, one durable commit) per request
would spend most of its time in round trips and WAL flushes. A :class:`Coalescer` queues what
arrives while ``max_in_flight`` statements are running and hands the queue, up to ``max_batch``
items, to the next call of ``execute``: every request is still written before it is answered,
and the more arrive at once, the fewer statements they cost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from sqlalchemy import Engine

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """Queue items; run ``execute`` on as many as are waiting, a few statements at a time.

    ``execute`` gets the waiting items in arrival order and returns one result per item, in the
    same order; a result that is an exception is raised to that item's caller alone. An
    exception ``execute`` raises reaches every caller of that group.
    """

    def __init__(
        self,
        execute: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        max_batch: int = 256,
        max_in_flight: int = 2,
    ) -> None:
        self._execute = execute
        self.max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._slots: asyncio.Semaphore | None = None
        #: Flushes running (held so the loop's weak references never lose one).
        self._flushes: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        """``item``'s result, once a statement carrying it has run."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if len(self._pending) == 1:
            self._start_flush()
        return await future

    def _start_flush(self) -> None:
        task = asyncio.get_running_loop().create_task(self._flush())
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max_in_flight)
        async with self._slots:
            group, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            if self._pending:
                self._start_flush()
            if not group:
                return
            try:
                results = await self._execute([item for item, _ in group])
            except Exception as exc:  # the driver's error reaches each waiting request
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
                return
            for (_, future), result in zip(group, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)


class AsyncPool:
    """A psycopg asyncio pool of autocommit connections to ``engine``'s PostgreSQL database,
    opened on first use (in the serving loop, which the pool's tasks belong to) and closed at
    shutdown. ``options`` are the connections' server settings (``-c name=value``)."""

    def __init__(self, engine: Engine, *, max_size: int, options: str = "") -> None:
        self.engine = engine
        self._max_size = max_size
        self._options = options
        self._pool: Any = None
        self._lock: asyncio.Lock | None = None

    async def get(self) -> Any:
        """The open ``psycopg_pool.AsyncConnectionPool``."""
        if self._pool is not None:
            return self._pool
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._pool is None:
                from psycopg_pool import AsyncConnectionPool

                conninfo = self.engine.url.set(drivername="postgresql").render_as_string(
                    hide_password=False
                )
                kwargs: dict[str, Any] = {"autocommit": True}
                if self._options:
                    kwargs["options"] = self._options
                pool = AsyncConnectionPool(
                    conninfo, min_size=1, max_size=self._max_size, kwargs=kwargs, open=False
                )
                await pool.open()
                self._pool = pool
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
