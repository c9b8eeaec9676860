"""telemetry windows appended, folded into rollups later; PostgreSQL partitions them by day

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29 12:00:00

Ingest appends a batch's windows (``folded`` false) and a background job folds them into the day
rollups (``server/fold.py``). Windows already stored were added into their rollups at ingest, so
they start folded. On PostgreSQL ``telemetry_window`` becomes a table partitioned by event-time day
(``window_start``, UTC; one partition ``telemetry_window_pYYYYMMDD`` per day, made as windows
arrive), so retention drops whole partitions; its primary key becomes ``(id, window_start)``, as a
partitioned table's keys must hold the partition column, and ``id`` a BIGINT. The batch key stays
unique in ``telemetry_batch``. Downgrading refuses while windows wait to be folded (the earlier
schema has no way to say so): let the server fold them first.
"""

from __future__ import annotations

from datetime import date, timedelta

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_INDEXES = {
    "ix_telemetry_window_batch_id": "(batch_id)",
    "ix_telemetry_window_device_id": "(device_id)",
    "ix_telemetry_window_window_start": "(window_start)",
    "ix_telemetry_window_version_start": "(model, version, window_start)",
}
_UNFOLDED = "ix_telemetry_window_unfolded"
_COLUMNS = (
    "id, batch_id, device_id, hardware_id, model, version, bundle_sha256, window_start,"
    " window_s, aggregate"
)


def _create_window_table(id_type: str, partitioned: bool) -> None:
    """``telemetry_window`` (PostgreSQL) with its indexes, partitioned by day or not."""
    key = "PRIMARY KEY (id, window_start)" if partitioned else "PRIMARY KEY (id)"
    folded = ", folded BOOLEAN NOT NULL DEFAULT false" if partitioned else ""
    op.execute(
        f"CREATE TABLE telemetry_window (id {id_type} NOT NULL,"
        " batch_id INTEGER NOT NULL REFERENCES telemetry_batch (id),"
        " device_id VARCHAR NOT NULL, hardware_id VARCHAR NOT NULL, model VARCHAR NOT NULL,"
        " version VARCHAR NOT NULL, bundle_sha256 VARCHAR NOT NULL,"
        " window_start TIMESTAMP WITH TIME ZONE NOT NULL, window_s INTEGER NOT NULL,"
        f" aggregate JSON{folded}, {key})"
        + (" PARTITION BY RANGE (window_start)" if partitioned else "")
    )
    for name, columns in _INDEXES.items():
        op.execute(f"CREATE INDEX {name} ON telemetry_window {columns}")
    if partitioned:
        op.execute(
            f"CREATE INDEX {_UNFOLDED} ON telemetry_window (model, version, window_start)"
            " WHERE NOT folded"
        )


def _set_aside(old: str) -> None:
    """Rename the current table, its key and sequence to ``old`` and drop its indexes (their
    names are taken again by the new table)."""
    op.execute(f"ALTER TABLE telemetry_window RENAME TO {old}")
    op.execute(f"ALTER TABLE {old} RENAME CONSTRAINT telemetry_window_pkey TO {old}_pkey")
    op.execute(f"ALTER SEQUENCE telemetry_window_id_seq RENAME TO {old}_id_seq")
    for name in (*_INDEXES, _UNFOLDED):
        op.execute(f"DROP INDEX IF EXISTS {name}")


def _day_partition(day: date) -> None:
    """As ``server.partitions`` makes them (kept here so this revision never changes)."""
    op.execute(
        f"CREATE TABLE IF NOT EXISTS telemetry_window_p{day:%Y%m%d} PARTITION OF"
        f" telemetry_window FOR VALUES FROM ('{day.isoformat()} 00:00:00+00')"
        f" TO ('{(day + timedelta(days=1)).isoformat()} 00:00:00+00')"
    )


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        with op.batch_alter_table("telemetry_window", schema=None) as batch_op:
            batch_op.add_column(
                sa.Column("folded", sa.Boolean(), nullable=False, server_default=sa.false())
            )
        op.execute(sa.text("UPDATE telemetry_window SET folded = 1"))
        op.create_index(
            _UNFOLDED,
            "telemetry_window",
            ["model", "version", "window_start"],
            sqlite_where=sa.text("NOT folded"),
        )
        return
    _set_aside("telemetry_window_0008")
    _create_window_table("BIGSERIAL", partitioned=True)
    days = op.get_bind().execute(
        sa.text(
            "SELECT DISTINCT (window_start AT TIME ZONE 'UTC')::date FROM telemetry_window_0008"
        )
    )
    for (day,) in days.fetchall():
        _day_partition(day)
    op.execute(
        f"INSERT INTO telemetry_window ({_COLUMNS}, folded)"
        f" SELECT {_COLUMNS}, true FROM telemetry_window_0008"
    )
    op.execute(
        "SELECT setval('telemetry_window_id_seq',"
        " (SELECT coalesce(max(id), 0) + 1 FROM telemetry_window_0008), false)"
    )
    op.execute("DROP TABLE telemetry_window_0008")


def downgrade() -> None:
    waiting = op.get_bind().execute(
        sa.text("SELECT count(*) FROM telemetry_window WHERE NOT folded")
    )
    count = waiting.scalar_one()
    if count:
        raise RuntimeError(
            f"{count} telemetry windows are not folded into rollups yet; run the server until"
            " its fold job has folded them, then downgrade"
        )
    if op.get_bind().dialect.name != "postgresql":
        op.drop_index(_UNFOLDED, table_name="telemetry_window")
        with op.batch_alter_table("telemetry_window", schema=None) as batch_op:
            batch_op.drop_column("folded")
        return
    _set_aside("telemetry_window_0009")
    _create_window_table("SERIAL", partitioned=False)
    op.execute(
        f"INSERT INTO telemetry_window ({_COLUMNS}) SELECT {_COLUMNS} FROM telemetry_window_0009"
    )
    op.execute(
        "SELECT setval('telemetry_window_id_seq',"
        " (SELECT coalesce(max(id), 0) + 1 FROM telemetry_window_0009), false)"
    )
    op.execute("DROP TABLE telemetry_window_0009")
