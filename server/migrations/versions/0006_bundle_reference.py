"""the reference file of format-3 bundles (manifest format 3, docs/bundle-format.md)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("bundle", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reference", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("bundle", schema=None) as batch_op:
        batch_op.drop_column("reference")
