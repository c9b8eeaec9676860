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
#: A rollup's counts and its JSON aggregates, in 0001's table and in this one.
_COUNTS = ("inference_count", "error_count", "selftest_failure_count", "window_count")
_AGGREGATES = ("latency", "outputs", "inputs", "feedback", "labels")


def _strings(*names: str) -> list[sa.Column[str]]:
    """Required string columns."""
    return [sa.Column(name, _S(), nullable=False) for name in names]


def _rollup_figures(count_type: type[sa.Integer]) -> list[sa.Column[object]]:
    """The counts (of ``count_type``) and the nullable JSON aggregates of a rollup."""
    counts = [sa.Column(name, count_type(), nullable=False) for name in _COUNTS]
    return [*counts, *(sa.Column(name, sa.JSON(), nullable=True) for name in _AGGREGATES)]


def upgrade() -> None:
    with op.batch_alter_table("telemetry_rollup", schema=None) as batch_op:
        batch_op.drop_index("ix_telemetry_rollup_model")
    op.drop_table("telemetry_rollup")
    op.create_table(
        "telemetry_rollup",
        sa.Column("id", sa.Integer(), nullable=False),
        *_strings("device_id", "hardware_id", "generation", "platform", "model", "version", "day"),
        *_rollup_figures(sa.BigInteger),
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
        *_strings("device_id", "hardware_id", "model", "version", "bundle_sha256"),
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
    # 0001's table, as 0001 made it.
    op.create_table(
        "telemetry_rollup",
        sa.Column("id", sa.Integer(), nullable=False),
        *_strings("model", "version", "generation", "platform", "day"),
        *_rollup_figures(sa.Integer),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model", "version", "generation", "platform", "day"),
    )
    with op.batch_alter_table("telemetry_rollup", schema=None) as batch_op:
        batch_op.create_index("ix_telemetry_rollup_model", ["model"], unique=False)
