"""PostgreSQL for tests: the local server at 127.0.0.1:5432 (database ``test``), and a
fresh schema per fixture, dropped afterwards.

Without a reachable server a PostgreSQL test is skipped on a developer's machine; under
CI (``CI`` set, as ``.ci/run`` does after starting the server) it fails instead, so a
missing database can never pass as a green run.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

__all__ = ["POSTGRES_URL", "fresh_schema", "postgres_available", "require_postgres"]


@functools.cache
def postgres_available() -> bool:
    engine = create_engine(POSTGRES_URL)
    try:
        with engine.connect():
            return True
    except OperationalError:
        return False
    finally:
        engine.dispose()


def require_postgres() -> None:
    """Skip the calling test when the server is down (fail under CI)."""
    if postgres_available():
        return
    message = "PostgreSQL is not reachable at 127.0.0.1:5432"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; .ci/run starts it, check pg_ctlcluster", pytrace=False)
    pytest.skip(message)


@contextlib.contextmanager
def fresh_schema(prefix: str) -> Iterator[str]:
    """A database URL whose search path is a new, empty schema (dropped on exit)."""
    require_postgres()
    schema = f"{prefix}_{secrets.token_hex(6)}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        try:
            yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
        finally:
            with admin.connect() as conn:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    finally:
        admin.dispose()
