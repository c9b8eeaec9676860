"""A page's independent reads (:mod:`server.concurrent_reads`): on PostgreSQL they run at once on
connections of their own, and the caller reads them all itself when no connection is free; on
SQLite each runs in turn on the caller's session; a failing part's error reaches the caller."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlmodel import Session

from server import concurrent_reads
from server.db import make_engine
from tests.server.conftest import (  # noqa: F401 (fixtures used by name)
    database_url,
    pg_database_url,
    postgres_available,
)


@pytest.fixture()
def engine(database_url: str) -> Iterator[Engine]:  # noqa: F811 (the fixture imported above)
    found = make_engine(database_url)
    yield found
    found.dispose()


def _connection_of(session: Session) -> int:
    if session.get_bind().dialect.name == "postgresql":
        return int(session.execute(text("SELECT pg_backend_pid()")).scalar_one())
    return id(session.connection().connection.dbapi_connection)


def _doubled(n: int) -> concurrent_reads.Part:
    return lambda session: (n, session.execute(text(f"SELECT {n} * 2")).scalar_one())


def test_each_part_answers_under_its_name(engine: Engine) -> None:
    with Session(engine) as session:
        found = concurrent_reads.read_all(session, {f"part {n}": _doubled(n) for n in range(6)})
        assert found == {f"part {n}": (n, n * 2) for n in range(6)}
        on_sqlite = engine.dialect.name == "sqlite"
        connections = concurrent_reads.read_all(session, {"a": _connection_of, "b": _connection_of})
        if on_sqlite:  # one pooled connection: every part on the caller's
            assert connections["a"] == connections["b"] == _connection_of(session)


def test_a_failing_part_fails_the_read(engine: Engine) -> None:
    def broken(session: Session) -> None:
        session.execute(text("SELECT * FROM no_such_table"))

    with Session(engine) as session, pytest.raises(Exception, match="no_such_table"):
        concurrent_reads.read_all(session, {"fine": _connection_of, "broken": broken})


def test_parts_run_at_once_on_postgresql(pg_database_url: str) -> None:  # noqa: F811
    """Each part waits for all the others: only parts running at once can all pass."""
    engine = make_engine(pg_database_url)
    parts = concurrent_reads.HELPERS + 1
    together = threading.Barrier(parts, timeout=30)

    def part(session: Session) -> int:
        together.wait()
        return _connection_of(session)

    try:
        with Session(engine) as session:
            found = concurrent_reads.read_all(session, {f"p{n}": part for n in range(parts)})
        assert len(set(found.values())) == parts  # a connection each
    finally:
        engine.dispose()


def test_the_caller_reads_every_part_when_no_connection_is_free(
    pg_database_url: str,  # noqa: F811
) -> None:
    single = create_engine(pg_database_url, pool_size=1, max_overflow=0, pool_timeout=2)
    try:
        with Session(single) as session:
            mine = _connection_of(session)
            found = concurrent_reads.read_all(session, {f"p{n}": _connection_of for n in range(5)})
        assert set(found.values()) == {mine}
    finally:
        single.dispose()
