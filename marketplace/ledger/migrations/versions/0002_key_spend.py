"""key spend

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22

``key_spend``: what each API key has been charged, kept by the settlement writer in the
same transaction as each settlement, so a spend limit is checked against one row instead
of a sum over every settlement of the key (a scan of the whole settlements table, which
has no index by key). Filled from the settlements already recorded.
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "key_spend",
        sa.Column("api_key_id", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("spent_micro_usd", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("api_key_id"),
    )
    op.execute(
        "INSERT INTO key_spend (api_key_id, spent_micro_usd) "
        "SELECT api_key_id, SUM(cost_micro_usd) FROM settlements "
        "WHERE api_key_id IS NOT NULL GROUP BY api_key_id"
    )


def downgrade() -> None:
    op.drop_table("key_spend")
