"""The migrations build the schema the models declare, on SQLite and PostgreSQL, 0004 goes
down and up again, and 0011 fills in the batch counts' hardware ids."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import IntegrityError
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


def test_0011_gives_stored_batch_counts_their_devices_hardware_id(database_url: str) -> None:
    command.upgrade(alembic_config(database_url), "0010")
    engine = create_engine(database_url)
    device = (
        "INSERT INTO device (id, hardware_id, generation, platform, firmware_version,"
        " free_flash_bytes, free_ram_bytes, credential_hash, revoked, enrolled_at)"
        " VALUES (:id, :hw, 'g', 'p', '1.0.0', 1, 1, :id, false, '2026-11-01 00:00:00')"
    )
    count = (
        "INSERT INTO telemetry_batch_count (device_id, boot_epoch, received, top_sequence)"
        " VALUES (:id, :epoch, :received, :top)"
    )
    try:
        with engine.begin() as conn:
            conn.execute(text(device), [{"id": "ring-1", "hw": "ring-gen3"}])
            conn.execute(text(device), [{"id": "phone-1", "hw": "phone-android"}])
            conn.execute(
                text(count),
                [
                    {"id": "ring-1", "epoch": 1, "received": 3, "top": 4},
                    {"id": "ring-1", "epoch": 2, "received": 1, "top": 0},
                    {"id": "phone-1", "epoch": 1, "received": 7, "top": 6},
                    {"id": "gone", "epoch": 1, "received": 2, "top": 2},
                ],
            )
        upgrade(database_url)
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT device_id, boot_epoch, hardware_id, received, top_sequence"
                    " FROM telemetry_batch_count ORDER BY device_id, boot_epoch"
                )
            ).all()
        assert [tuple(r) for r in rows] == [
            ("gone", 1, "", 2, 2),
            ("phone-1", 1, "phone-android", 7, 6),
            ("ring-1", 1, "ring-gen3", 3, 4),
            ("ring-1", 2, "ring-gen3", 1, 0),
        ]
        # Every count has one from now on.
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(text(count), [{"id": "phone-1", "epoch": 9, "received": 1, "top": 0}])
    finally:
        engine.dispose()
