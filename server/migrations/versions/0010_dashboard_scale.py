"""dashboard at scale: a generation for the batch counts, so each process may remember who
contributed to whole days of a figures query while nothing it rests on changes; an index of the
revoked devices

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29 16:00:00

``telemetry_batch_count_generation`` holds one row, bumped when a device's telemetry is erased
(``server/contributor_cache.py`` says why that is enough). ``ix_device_revoked`` is a partial
index of the revoked devices' ids: the pages count active devices as all of them minus these.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "telemetry_batch_count_generation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(table, [{"id": 1, "generation": 0}])
    op.create_index(
        "ix_device_revoked",
        "device",
        ["id"],
        unique=False,
        postgresql_where=sa.text("revoked"),
        sqlite_where=sa.text("revoked"),
    )


def downgrade() -> None:
    op.drop_index("ix_device_revoked", table_name="device")
    op.drop_table("telemetry_batch_count_generation")
