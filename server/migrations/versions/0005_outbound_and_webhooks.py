"""webhook subscriptions, the outbound delivery queue, threshold condition states

Revision ID: 0005
Revises: 0003
Create Date: 2026-12-01 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0005"
# 0004 (device events) is written on another branch; the merge re-chains this after it.
down_revision = "0004"
branch_labels = None
depends_on = None

_S = sqlmodel.sql.sqltypes.AutoString
_T = sqlmodel.sql.sqltypes.UTCDateTime


def upgrade() -> None:
    op.create_table(
        "webhook",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("url", _S(), nullable=False),
        sa.Column("events", sa.JSON(), nullable=True),
        sa.Column("model", _S(), nullable=True),
        sa.Column("secret", _S(), nullable=False),
        sa.Column("thresholds", sa.JSON(), nullable=True),
        sa.Column("created_by", _S(), nullable=False),
        sa.Column("created_at", _T(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("removed_at", _T(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("webhook", schema=None) as batch_op:
        batch_op.create_index("ix_webhook_active", ["active"], unique=False)
    op.create_table(
        "outbound",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sink", _S(), nullable=False),
        sa.Column("webhook_id", sa.Integer(), nullable=True),
        sa.Column("kind", _S(), nullable=False),
        sa.Column("event_id", _S(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("delivery_id", _S(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("state", _S(), nullable=False),
        sa.Column("created_at", _T(), nullable=False),
        sa.Column("next_attempt_at", _T(), nullable=False),
        sa.Column("last_attempt_at", _T(), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", _S(), nullable=True),
        sa.Column("delivered_at", _T(), nullable=True),
        sa.ForeignKeyConstraint(["webhook_id"], ["webhook.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("delivery_id"),
    )
    with op.batch_alter_table("outbound", schema=None) as batch_op:
        batch_op.create_index("ix_outbound_state_next", ["state", "next_attempt_at"], unique=False)
        batch_op.create_index("ix_outbound_webhook_id", ["webhook_id"], unique=False)
    op.create_table(
        "trigger_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("webhook_id", sa.Integer(), nullable=False),
        sa.Column("model", _S(), nullable=False),
        sa.Column("version", _S(), nullable=False),
        sa.Column("condition", _S(), nullable=False),
        sa.Column("subject", _S(), nullable=False),
        sa.Column("holding", sa.Boolean(), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("changed_at", _T(), nullable=False),
        sa.Column("checked_at", _T(), nullable=False),
        sa.ForeignKeyConstraint(["webhook_id"], ["webhook.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("webhook_id", "model", "version", "condition", "subject"),
    )
    with op.batch_alter_table("trigger_state", schema=None) as batch_op:
        batch_op.create_index("ix_trigger_state_webhook_id", ["webhook_id"], unique=False)


def downgrade() -> None:
    op.drop_table("trigger_state")
    op.drop_table("outbound")
    op.drop_table("webhook")
