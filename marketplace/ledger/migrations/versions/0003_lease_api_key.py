"""lease api key

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23

``leases.api_key_id``: the API key that created the lease. Its prepaid price, less any
refund, now counts toward that key's spend (``key_spend``), so a key's spend limit also
bounds the leases made with it (before, a key with a spend limit could lease any node
for any number of hours). Leases created before this revision have no key and count
toward none.
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "leases",
        sa.Column("api_key_id", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
    )


def downgrade() -> None:
    with op.batch_alter_table("leases") as batch:
        batch.drop_column("api_key_id")
