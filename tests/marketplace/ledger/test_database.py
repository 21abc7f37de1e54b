"""The SQLite engine's parameter binding: the adapters that skip sqlite3's adapter search
must not change a stored value."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from marketplace.ledger.database import (
    SQLITE_VERSION_MIN,
    check_sqlite_version,
    create_ledger_engine,
    register_sqlite_binding,
)
from marketplace.ledger.errors import LedgerUnavailable
from marketplace.ledger.settings import LedgerSettings


def test_sqlite_engine_registers_the_binding_adapters(tmp_path: Path) -> None:
    engine = create_ledger_engine(LedgerSettings(database_url=f"sqlite:///{tmp_path / 'a.db'}"))
    engine.dispose()
    protocol = sqlite3.PrepareProtocol
    assert (type(None), protocol) in sqlite3.adapters
    assert (bytes, protocol) in sqlite3.adapters


def test_null_and_blob_round_trip_unchanged(tmp_path: Path) -> None:
    register_sqlite_binding()
    conn = sqlite3.connect(tmp_path / "b.db")
    blob = bytes(range(256)) + b"\x00tail"
    conn.execute("CREATE TABLE t (a, b, c, d)")
    conn.executemany(
        "INSERT INTO t VALUES (?, ?, ?, ?)", [(None, blob, b"", 7), (1, None, b"x", "")]
    )
    rows = conn.execute("SELECT typeof(a), typeof(b), typeof(c), a, b, c, d FROM t").fetchall()
    assert rows == [
        ("null", "blob", "blob", None, blob, b"", 7),
        ("integer", "null", "blob", 1, None, b"x", ""),
    ]
    # a stored BLOB still matches a bytes parameter, and NULL still matches IS NULL
    assert conn.execute("SELECT count(*) FROM t WHERE b = ?", (blob,)).fetchone() == (1,)
    assert conn.execute("SELECT count(*) FROM t WHERE a IS ?", (None,)).fetchone() == (1,)
    conn.close()


def test_an_sqlite_too_old_for_the_ledger_is_refused_with_what_to_do() -> None:
    check_sqlite_version()  # this machine's
    check_sqlite_version(SQLITE_VERSION_MIN)
    with pytest.raises(LedgerUnavailable, match=r"needs SQLite 3\.33\.0 or newer.*uses 3\.31\.1"):
        check_sqlite_version((3, 31, 1))
