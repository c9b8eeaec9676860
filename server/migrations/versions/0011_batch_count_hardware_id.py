"""batch counts carry their device's hardware id, so the Fleet page adds completeness up per
hardware id from ``telemetry_batch_count`` alone, without joining ``device``; the index of
installed versions covers the install outcome

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 18:00:00

The stored counts get their device's hardware id (which never changes); a count whose device row
is missing (none is ever deleted) gets an empty one, as :func:`server.batch_counts.rebuild`
gives it. Only rows are filled in, none is added or lost: remembered completeness figures
(``server/contributor_cache.py``) stay right. ``ix_device_installed_version`` gains
``last_install`` (as ``ix_device_installed_version_outcome``), so the pages count devices per
version and outcome from the index alone.
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("telemetry_batch_count", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("hardware_id", sqlmodel.sql.sqltypes.AutoString(), nullable=True)
        )
    op.execute(
        "UPDATE telemetry_batch_count SET hardware_id = COALESCE("
        "(SELECT d.hardware_id FROM device AS d WHERE d.id = telemetry_batch_count.device_id),"
        " '')"
    )
    with op.batch_alter_table("telemetry_batch_count", schema=None) as batch_op:
        batch_op.alter_column(
            "hardware_id", existing_type=sqlmodel.sql.sqltypes.AutoString(), nullable=False
        )
    op.create_index(
        "ix_device_installed_version_outcome",
        "device_installed",
        ["model", "version", "hardware_id", "last_install"],
        unique=False,
    )
    op.drop_index("ix_device_installed_version", table_name="device_installed")


def downgrade() -> None:
    op.create_index(
        "ix_device_installed_version",
        "device_installed",
        ["model", "version", "hardware_id"],
        unique=False,
    )
    op.drop_index("ix_device_installed_version_outcome", table_name="device_installed")
    with op.batch_alter_table("telemetry_batch_count", schema=None) as batch_op:
        batch_op.drop_column("hardware_id")
