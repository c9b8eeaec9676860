"""A page's independent reads run at once, each on a connection of its own (PostgreSQL), so the
page waits for its slowest query rather than for the sum of them (the Fleet page at 100,000
devices: docs/dashboard.md, "Scale").

The caller's session reads too, taking parts from the same queue as the helpers, and a helper
takes a part only once it holds a connection: when the pool or the helper threads are busy, the
caller reads every part itself, as if alone, and never waits for a connection another request
holds. SQLite (one pooled connection) reads each part in turn on the caller's session.

Each part sees the database as one statement does (PostgreSQL's read committed: the same as
reading the parts in turn in one transaction).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session

#: Helper threads (and so connections) in use at most at once by all requests of a process.
HELPERS = 3
_helpers = ThreadPoolExecutor(max_workers=HELPERS, thread_name_prefix="page-read")

Part = Callable[[Session], Any]


class _Queue:
    """The parts not yet taken, and what each taken part gave (or raised)."""

    def __init__(self, parts: Mapping[str, Part]) -> None:
        self.todo = deque(parts.items())
        self.results: dict[str, Any] = {}
        self.errors: list[BaseException] = []
        self.running = 0
        self.changed = threading.Condition()

    def read_on(self, session: Session) -> None:
        """Take parts and read each on ``session`` until none is left."""
        while True:
            with self.changed:
                if not self.todo or self.errors:
                    return
                name, part = self.todo.popleft()
                self.running += 1
            try:
                value = part(session)
            except BaseException as exc:  # handed to the caller, which raises it
                with self.changed:
                    self.errors.append(exc)
                    self.running -= 1
                    self.changed.notify_all()
                return
            with self.changed:
                self.results[name] = value
                self.running -= 1
                self.changed.notify_all()

    def wait(self) -> None:
        """Until every part taken has been read (the caller has taken the rest)."""
        with self.changed:
            self.changed.wait_for(lambda: self.running == 0)


def read_all(session: Session, parts: Mapping[str, Part]) -> dict[str, Any]:
    """Each part's answer under its name, read on ``session`` and (PostgreSQL) on up to
    :data:`HELPERS` sessions of its own engine at once.

    Raises:
        BaseException: What the first failing part raised (the others' answers are dropped).
    """
    queue = _Queue(parts)
    bind = session.get_bind()
    if bind.dialect.name == "postgresql" and len(parts) > 1:
        for _ in range(min(HELPERS, len(parts) - 1)):
            _helpers.submit(_help, bind.engine, queue)
    queue.read_on(session)
    queue.wait()
    if queue.errors:
        raise queue.errors[0]
    return queue.results


def _help(engine: Engine, queue: _Queue) -> None:
    if not queue.todo:
        return
    with Session(engine) as own:
        own.connection()  # a connection in hand before a part is taken
        queue.read_on(own)
