"""staged rollouts, their decision log, job leases and confirmations

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 06:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_S = sqlmodel.sql.sqltypes.AutoString
_T = sqlmodel.sql.sqltypes.UTCDateTime


def upgrade() -> None:
    op.create_table(
        "rollout",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_name", _S(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("selector", sa.JSON(), nullable=True),
        sa.Column("stages", sa.JSON(), nullable=True),
        sa.Column("gates", sa.JSON(), nullable=True),
        sa.Column("previous", sa.JSON(), nullable=True),
        sa.Column("on_failure", _S(), nullable=False),
        sa.Column("state", _S(), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("created_by", _S(), nullable=False),
        sa.Column("created_at", _T(), nullable=False),
        sa.Column("started_at", _T(), nullable=True),
        sa.Column("stage_started_at", _T(), nullable=True),
        sa.Column("control_until", _T(), nullable=True),
        sa.Column("finished_at", _T(), nullable=True),
        sa.ForeignKeyConstraint(["version_id"], ["model_version.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("rollout", schema=None) as batch_op:
        batch_op.create_index("ix_rollout_model_name", ["model_name"], unique=False)
        batch_op.create_index("ix_rollout_state", ["state"], unique=False)
    op.create_table(
        "rollout_decision",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("at", _T(), nullable=False),
        sa.Column("actor", _S(), nullable=False),
        sa.Column("action", _S(), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("state_before", _S(), nullable=False),
        sa.Column("state_after", _S(), nullable=False),
        sa.Column("reason", _S(), nullable=False),
        sa.Column("figures", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollout.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("rollout_decision", schema=None) as batch_op:
        batch_op.create_index("ix_rollout_decision_rollout_id", ["rollout_id"], unique=False)
    op.create_table(
        "job_lock",
        sa.Column("name", _S(), nullable=False),
        sa.Column("holder", _S(), nullable=False),
        sa.Column("expires_at", _T(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "confirmation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_name", _S(), nullable=False),
        sa.Column("hardware_id", _S(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("release_counter", sa.Integer(), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=True),
        sa.Column("confirmed_at", _T(), nullable=False),
        sa.Column("confirmed_by", _S(), nullable=False),
        sa.ForeignKeyConstraint(["version_id"], ["model_version.id"]),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollout.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("confirmation", schema=None) as batch_op:
        batch_op.create_index("ix_confirmation_model_name", ["model_name"], unique=False)


def downgrade() -> None:
    op.drop_table("confirmation")
    op.drop_table("job_lock")
    op.drop_table("rollout_decision")
    op.drop_table("rollout")
