"""The telemetry fold in a child process of the server, so its CPU never holds the API's GIL.

Folding is Python work (adding windows up) beside the database's; in a thread of the server it
takes the interpreter lock from the event loop that answers check-ins and uploads in turns, and
a morning sync wave, which brings the most windows to fold, then answered its slowest: in
``bench/load_fleet.py`` at 300 syncs/s on two cores, check-in p99 was 286 ms with the fold in a
thread, 91 ms with the same fold in its own process, 29 ms with no fold during the run
(docs/scaling.md, "Folding").

The server's fold job (:mod:`server.jobs`) hands each run to one child (``spawn``: a fresh
interpreter that imports only the fold, about 1 s once; nothing inherited from the server's
threads or connections) and waits for its count. The child is started at the first run that
finds a window waiting, so a server that is sent no telemetry never starts one. In the child, a
run is :func:`server.fold.fold_due` under the fold's lease, which the child gives up when the run
ends: any process may take the next run, one at a time. A child that dies is replaced at the
next run; its transaction rolled back, so nothing was counted. When the server stops or dies,
the child exits within a second (it watches its parent): a fold transaction in flight rolls
back whole, and its lease expires as after a crash.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from server import fold, leases
from server.models import UNFOLDED, TelemetryWindowRecord


def windows_waiting(session: Session) -> bool:
    """Whether any stored window is not yet folded. ``NOT folded``, the partial index's own
    condition, so the index answers (``folded IS false`` scanned every partition: 2.3 s on ten
    million windows, every second while none waited)."""
    first = session.exec(select(col(TelemetryWindowRecord.id)).where(UNFOLDED)).first()
    return first is not None


class FoldWorker:
    """Runs the fold job in one child process; :meth:`run` is called from the job's thread."""

    def __init__(
        self, engine: Engine, *, relative_accuracy: float, limit: int, lease_s: float, folders: int
    ) -> None:
        self._engine = engine
        self._relative_accuracy = relative_accuracy
        self._limit = limit
        self._lease_s = lease_s
        self._folders = folders
        self._pool: ProcessPoolExecutor | None = None
        #: The child's process id, as its last run reported it (None: no run finished since it
        #: started).
        self._child_pid: int | None = None
        self._lock = threading.Lock()

    def run(self) -> int:
        """One fold run in the child (started first if need be); the windows it folded."""
        with self._lock:
            if self._pool is None:
                with Session(self._engine) as session:
                    if not windows_waiting(session):
                        return 0
                self._pool = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_child,
                    initargs=(
                        self._engine.url.render_as_string(hide_password=False),
                        logging.getLogger("edgefleet").getEffectiveLevel(),
                        os.getpid(),
                    ),
                )
            pool = self._pool
        try:
            done = pool.submit(
                _fold_in_child,
                relative_accuracy=self._relative_accuracy,
                limit=self._limit,
                lease_s=self._lease_s,
                folders=self._folders,
            )
            child_pid, folded = done.result()
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:
                    self._pool = None  # the next run starts a new child
                    self._child_pid = None
            raise
        with self._lock:
            if self._pool is pool:
                self._child_pid = child_pid
        return folded

    def close(self) -> None:
        """Stop taking runs; a run in progress ends in the child, which then exits."""
        with self._lock:
            pool, self._pool, self._child_pid = self._pool, None, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    @property
    def child_pids(self) -> list[int]:
        """The child's process id, once a run in it has finished (for tests and diagnostics)."""
        child_pid = self._child_pid
        return [] if child_pid is None else [child_pid]


# -- in the child ---------------------------------------------------------------------------------

_engine: Engine | None = None


def _start_child(database_url: str, log_level: int, server_pid: int) -> None:
    global _engine
    from server.db import make_engine

    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    _engine = make_engine(database_url)
    # The server's id from the server: it may have died while this child was starting.
    threading.Thread(
        target=_exit_with, args=(server_pid,), name="watch-server", daemon=True
    ).start()


def _exit_with(parent: int) -> None:
    # The pool's queue never reports a dead server to its workers (each worker holds both ends
    # of its pipe), so a child would otherwise outlive the server, idle, holding connections.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _fold_in_child(
    *, relative_accuracy: float, limit: int, lease_s: float, folders: int
) -> tuple[int, int]:
    """One run; the child's process id, and the windows it folded."""
    assert _engine is not None, "the fold child was not started"
    with Session(_engine) as session:
        try:
            return os.getpid(), fold.fold_due(
                session,
                relative_accuracy=relative_accuracy,
                limit=limit,
                lease_s=lease_s,
                folders=folders,
            )
        finally:
            session.rollback()
            leases.release_leases(session, [fold.LEASE])
