"""open holds by key

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23

``ix_open_holds_api_key_id``: the settlement writer checks a key's spend limit against
its spend and every open hold of the key, whichever coordinator placed it (before, each
coordinator counted only its own holds, so N coordinators sharing one database could let
a key spend N times its limit). The index keeps that read to the key's own holds.
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_open_holds_api_key_id", "open_holds", ["api_key_id"])


def downgrade() -> None:
    op.drop_index("ix_open_holds_api_key_id", table_name="open_holds")
