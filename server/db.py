"""Engine, sessions and migrations: SQLite (WAL) by default, PostgreSQL by URL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, event
from sqlmodel import Session, create_engine

from server.errors import SchemaBehindError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def json_loads(data: str | bytes) -> Any:
    """JSON columns as read: orjson (several times the standard library's speed: the fold job
    reads every window's aggregate), and the standard library for what orjson refuses (``NaN``,
    integers past 64 bits), which an older row written by ``json.dumps`` could hold."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def make_engine(url: str) -> Engine:
    """An engine; SQLite gets WAL, a busy timeout and foreign keys; JSON columns are read with
    :func:`json_loads`."""
    if url.startswith("sqlite"):
        # One connection: SQLite has one writer, and threads contending for it hit the busy
        # handler, which sleeps; queueing for the pooled connection does not.
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=1,
            max_overflow=0,
            pool_timeout=60,
            json_deserializer=json_loads,
        )

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record):  # type: ignore[no-untyped-def]
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    # pool_recycle rather than pool_pre_ping: pre-ping costs a round trip on every checkout.
    return create_engine(
        url, pool_size=10, max_overflow=20, pool_recycle=1800, json_deserializer=json_loads
    )


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str) -> str:
    """Migrate the database at ``url`` to the newest schema; returns the revision."""
    command.upgrade(alembic_config(url), "head")
    return head_revision()


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def check_schema(engine: Engine) -> None:
    """Refuse a database whose schema is behind this server's migrations.

    Raises:
        SchemaBehindError: Saying which revision it is at and what to run.
    """
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    head = head_revision()
    if current != head:
        raise SchemaBehindError(
            f"database schema is at {current or 'nothing'}, this server needs {head};"
            " run `edgefleet db upgrade` (with the same --database-url)"
        )


def session_scope(engine: Engine) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session:
        yield session
