"""open holds by limited key

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24

``open_holds.limited_key_id``: the hold's API key when that key has a spend limit, else
NULL; ``ix_open_holds_limited_key_id`` indexes only those rows (a partial index) and
replaces ``ix_open_holds_api_key_id``. The settlement writer reads a key's open holds
only to check its spend limit, and a key's limit is fixed when it is issued, so the
holds of keys without one need no index entry. Every hold used to insert one entry and
every settlement to delete it, each in a leaf of its own key: at 10,000 settlements/s on
SQLite that index alone cost about a tenth of the writer's time and a third of the p99
delay to durable (docs/benchmarks.md, seventeenth session). Holds open at the upgrade
get the column from their key's limit.
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_LIMITED = "limited_key_id IS NOT NULL"


def upgrade() -> None:
    op.add_column(
        "open_holds",
        sa.Column("limited_key_id", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
    )
    op.execute(
        "UPDATE open_holds SET limited_key_id = api_key_id WHERE api_key_id IN "
        "(SELECT id FROM api_keys WHERE spend_limit_micro_usd IS NOT NULL)"
    )
    op.drop_index("ix_open_holds_api_key_id", table_name="open_holds")
    op.create_index(
        "ix_open_holds_limited_key_id",
        "open_holds",
        ["limited_key_id"],
        sqlite_where=sa.text(_LIMITED),
        postgresql_where=sa.text(_LIMITED),
    )


def downgrade() -> None:
    op.drop_index("ix_open_holds_limited_key_id", table_name="open_holds")
    op.create_index("ix_open_holds_api_key_id", "open_holds", ["api_key_id"])
    with op.batch_alter_table("open_holds") as batch:
        batch.drop_column("limited_key_id")
