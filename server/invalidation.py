"""What one server process changes, every process hears: PostgreSQL LISTEN/NOTIFY for the offer
cache (docs/scaling.md).

Each process keeps an :class:`~server.offers.OfferCache`. The process that commits a change to
what is offered drops its own cache after the commit; on PostgreSQL the same transaction also
sends ``NOTIFY edgefleet_offers`` (delivered at commit, dropped on rollback), and every process
listens on a connection of its own and drops its cache when a notification arrives. A listener
that loses its connection (a database restart) drops the cache, reconnects and listens again,
since it may have missed a notification. SQLite has one process, so it needs none of this.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

log = logging.getLogger("edgefleet.server.invalidation")

CHANNEL = "edgefleet_offers"
_SENT = "edgefleet.offers_notified"


def is_shared(engine: Engine) -> bool:
    """Whether several processes can share ``engine``'s database (PostgreSQL, not SQLite)."""
    return engine.dialect.name == "postgresql"


def notify_in(session: Session) -> None:
    """Send the change notification within ``session``'s transaction (once per transaction):
    PostgreSQL delivers it when the transaction commits, and never if it rolls back."""
    if session.info.get(_SENT):
        return
    connection = session.connection()
    if not is_shared(connection.engine):
        return
    connection.exec_driver_sql(f"NOTIFY {CHANNEL}")
    session.info[_SENT] = True


def forget_sent(session: Session) -> None:
    """After a commit or a rollback: the next transaction notifies again."""
    session.info.pop(_SENT, None)


def _conninfo(engine: Engine) -> str:
    url = make_url(engine.url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


class Listener:
    """A thread that calls ``on_change`` for each notification on :data:`CHANNEL`, and once
    after each (re)connection, until :meth:`stop`."""

    def __init__(
        self, engine: Engine, on_change: Callable[[], None], *, retry_s: float = 1.0
    ) -> None:
        self._conninfo = _conninfo(engine)
        self._on_change = on_change
        self._retry_s = retry_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="offer-listener", daemon=True)
        #: Set once the first LISTEN is in place (tests wait for it).
        self.listening = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    # Whatever changed while no one listened is unknown: start afresh.
                    self._on_change()
                    self.listening.set()
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=0.5, stop_after=64):
                            self._on_change()
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.warning("offer-change listener lost its connection (%s); reconnecting", exc)
                self._on_change()
                self._stop.wait(self._retry_s)


def listen(engine: Engine, on_change: Callable[[], None]) -> Listener | None:
    """A started :class:`Listener` on ``engine``'s database, or None where one process is all
    there is (SQLite)."""
    if not is_shared(engine):
        return None
    listener = Listener(engine, on_change)
    listener.start()
    return listener
