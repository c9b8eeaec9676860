"""fleet rollups: the devices' day rollups added up per model version x hardware id x day, batch
counts per device and boot epoch, and the indexes the dashboard's pages read through

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29 12:00:00

The data step adds up the rollups already stored (at the server's default sketch accuracy: a
server merging at another accuracy finds every row counted in ``skipped_rows`` and reads the
per-device rows, as before, until the rows are added up again).
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op
from sqlmodel import Session

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_S = sqlmodel.sql.sqltypes.AutoString
_COUNTS = ("inference_count", "error_count", "selftest_failure_count", "window_count")
#: With 0007's data-quality and shadow fields (on another branch): the table has every field of
#: server.aggregate.FIELDS once the branches meet.
_AGGREGATES = ("latency", "outputs", "inputs", "feedback", "labels", "quality", "shadow")
#: (table, index, columns) added for the pages' queries.
_INDEXES = (
    ("device", "ix_device_last_seen", ["last_seen"]),
    (
        "telemetry_rollup",
        "ix_telemetry_rollup_version_day_devices",
        ["model", "version", "day", "hardware_id", "device_id", "selftest_failure_count"],
    ),
)


def upgrade() -> None:
    op.create_table(
        "telemetry_fleet_rollup",
        sa.Column("id", sa.Integer(), nullable=False),
        *(sa.Column(n, _S(), nullable=False) for n in ("model", "version", "day", "hardware_id")),
        *(
            sa.Column(n, sa.Integer(), nullable=False)
            for n in ("device_count", "selftest_failed_devices", "skipped_rows")
        ),
        *(sa.Column(n, sa.BigInteger(), nullable=False) for n in _COUNTS),
        *(sa.Column(n, sa.JSON(), nullable=True) for n in _AGGREGATES),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model", "version", "day", "hardware_id"),
    )
    op.create_table(
        "telemetry_batch_count",
        sa.Column("device_id", _S(), nullable=False),
        *(sa.Column(n, sa.Integer(), nullable=False) for n in ("boot_epoch", "received")),
        sa.Column("top_sequence", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "boot_epoch"),
    )
    for table, name, columns in _INDEXES:
        op.create_index(name, table, columns, unique=False)
    _add_up_stored_rows()


def _add_up_stored_rows() -> None:
    from server import fleet_rollup
    from server.config import Settings

    session = Session(bind=op.get_bind())
    fleet_rollup.rebuild(session, Settings.model_fields["telemetry_relative_accuracy"].default)
    session.flush()
    # The batch counts as this revision's table holds them (0011 adds the hardware id), so not
    # server.batch_counts.rebuild, which fills today's table.
    op.execute(
        "INSERT INTO telemetry_batch_count (device_id, boot_epoch, received, top_sequence)"
        " SELECT device_id, boot_epoch, count(*), max(sequence) FROM telemetry_batch"
        " WHERE sequence >= 0 GROUP BY device_id, boot_epoch"
    )


def downgrade() -> None:
    for table, name, _ in _INDEXES:
        op.drop_index(name, table_name=table)
    op.drop_table("telemetry_batch_count")
    op.drop_table("telemetry_fleet_rollup")
