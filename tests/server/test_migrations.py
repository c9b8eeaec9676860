"""The migrations build the schema the models declare, on SQLite and PostgreSQL, and 0004 goes
down and up again."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlmodel import SQLModel

import server.models  # noqa: F401  (registers the tables)
from server.db import alembic_config, upgrade

NEW_IN_0004 = {"device_event", "device_state", "device_installed"}


def test_migrations_give_the_models_schema(database_url: str) -> None:
    upgrade(database_url)
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            differences = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
        assert differences == []
        command.downgrade(alembic_config(database_url), "0003")
        assert not NEW_IN_0004 & set(inspect(engine).get_table_names())
        upgrade(database_url)
        assert set(inspect(engine).get_table_names()) >= NEW_IN_0004
    finally:
        engine.dispose()
