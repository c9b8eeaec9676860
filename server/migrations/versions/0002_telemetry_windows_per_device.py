"""telemetry kept per device: accepted windows, and rollups per device and day

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 06:00:00

Rollups were kept per model version x generation x platform x day, with no device; they cannot
be attributed to devices, so they are dropped (no fleet ran on a release with them) and rebuilt
from uploads from now on. Counts become BIGINT: a rollup adds up many windows' 32-bit counts.
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_S = sqlmodel.sql.sqltypes.AutoString


def upgrade() -> None:
    with op.batch_alter_table("telemetry_rollup", schema=None) as batch_op:
        batch_op.drop_index("ix_telemetry_rollup_model")
    op.drop_table("telemetry_rollup")
    op.create_table(
        "telemetry_rollup",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", _S(), nullable=False),
        sa.Column("hardware_id", _S(), nullable=False),
        sa.Column("generation", _S(), nullable=False),
        sa.Column("platform", _S(), nullable=False),
        sa.Column("model", _S(), nullable=False),
        sa.Column("version", _S(), nullable=False),
        sa.Column("day", _S(), nullable=False),
        sa.Column("inference_count", sa.BigInteger(), nullable=False),
        sa.Column("error_count", sa.BigInteger(), nullable=False),
        sa.Column("selftest_failure_count", sa.BigInteger(), nullable=False),
        sa.Column("window_count", sa.BigInteger(), nullable=False),
        sa.Column("latency", sa.JSON(), nullable=True),
        sa.Column("outputs", sa.JSON(), nullable=True),
        sa.Column("inputs", sa.JSON(), nullable=True),
        sa.Column("feedback", sa.JSON(), nullable=True),
        sa.Column("labels", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device_id", "model", "version", "day"),
    )
    with op.batch_alter_table("telemetry_rollup", schema=None) as batch_op:
        batch_op.create_index("ix_telemetry_rollup_device_id", ["device_id"], unique=False)
        batch_op.create_index(
            "ix_telemetry_rollup_version_day", ["model", "version", "day"], unique=False
        )
    op.create_table(
        "telemetry_window",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=False),
        sa.Column("device_id", _S(), nullable=False),
        sa.Column("hardware_id", _S(), nullable=False),
        sa.Column("model", _S(), nullable=False),
        sa.Column("version", _S(), nullable=False),
        sa.Column("bundle_sha256", _S(), nullable=False),
        sa.Column("window_start", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("window_s", sa.Integer(), nullable=False),
        sa.Column("aggregate", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["batch_id"], ["telemetry_batch.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("telemetry_window", schema=None) as batch_op:
        batch_op.create_index("ix_telemetry_window_batch_id", ["batch_id"], unique=False)
        batch_op.create_index("ix_telemetry_window_device_id", ["device_id"], unique=False)
        batch_op.create_index("ix_telemetry_window_window_start", ["window_start"], unique=False)
        batch_op.create_index(
            "ix_telemetry_window_version_start", ["model", "version", "window_start"], unique=False
        )


def downgrade() -> None:
    op.drop_table("telemetry_window")
    op.drop_table("telemetry_rollup")
    op.create_table(
        "telemetry_rollup",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model", _S(), nullable=False),
        sa.Column("version", _S(), nullable=False),
        sa.Column("generation", _S(), nullable=False),
        sa.Column("platform", _S(), nullable=False),
        sa.Column("day", _S(), nullable=False),
        sa.Column("inference_count", sa.Integer(), nullable=False),
        sa.Column("error_count", sa.Integer(), nullable=False),
        sa.Column("selftest_failure_count", sa.Integer(), nullable=False),
        sa.Column("window_count", sa.Integer(), nullable=False),
        sa.Column("latency", sa.JSON(), nullable=True),
        sa.Column("outputs", sa.JSON(), nullable=True),
        sa.Column("inputs", sa.JSON(), nullable=True),
        sa.Column("feedback", sa.JSON(), nullable=True),
        sa.Column("labels", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model", "version", "generation", "platform", "day"),
    )
    with op.batch_alter_table("telemetry_rollup", schema=None) as batch_op:
        batch_op.create_index("ix_telemetry_rollup_model", ["model"], unique=False)
