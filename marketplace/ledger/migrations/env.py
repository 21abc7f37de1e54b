"""Alembic environment: runs on the connection handed in by ``database.migrate``."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

from marketplace.ledger import models  # noqa: F401  (registers the tables)

target_metadata = SQLModel.metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through marketplace.ledger.database.migrate()")
context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
