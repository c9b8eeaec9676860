"""device events, the state they were recorded from, and what each device runs

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 09:00:00

Devices enrolled before this revision have no recorded state: the first check-in of each records
one ``reported`` event with the state it reports.
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_S = sqlmodel.sql.sqltypes.AutoString
_T = sqlmodel.sql.sqltypes.UTCDateTime


def upgrade() -> None:
    op.create_table(
        "device_event",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("device_id", _S(), nullable=False),
        sa.Column("at", _T(), nullable=False),
        sa.Column("kind", _S(), nullable=False),
        sa.Column("model", _S(), nullable=True),
        sa.Column("version", _S(), nullable=True),
        sa.Column("bundle_sha256", _S(), nullable=True),
        sa.Column("outcome", _S(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("device_event", schema=None) as batch_op:
        batch_op.create_index("ix_device_event_device_at", ["device_id", "at", "id"], unique=False)
        # Install outcomes per day (the Fleet page) read the index alone.
        batch_op.create_index("ix_device_event_kind_at", ["kind", "at", "outcome"], unique=False)
    op.create_table(
        "device_state",
        sa.Column("device_id", _S(), nullable=False),
        sa.Column("state_hash", _S(), nullable=False),
        sa.Column("firmware_version", _S(), nullable=False),
        sa.Column("installed", sa.JSON(), nullable=True),
        sa.Column("recorded_at", _T(), nullable=False),
        sa.PrimaryKeyConstraint("device_id"),
    )
    op.create_table(
        "device_installed",
        sa.Column("device_id", _S(), nullable=False),
        sa.Column("model", _S(), nullable=False),
        sa.Column("hardware_id", _S(), nullable=False),
        sa.Column("version", _S(), nullable=True),
        sa.Column("bundle_sha256", _S(), nullable=True),
        sa.Column("last_install", _S(), nullable=True),
        sa.PrimaryKeyConstraint("device_id", "model"),
    )
    with op.batch_alter_table("device_installed", schema=None) as batch_op:
        batch_op.create_index(
            "ix_device_installed_version", ["model", "version", "hardware_id"], unique=False
        )


def downgrade() -> None:
    op.drop_table("device_installed")
    op.drop_table("device_state")
    op.drop_table("device_event")
