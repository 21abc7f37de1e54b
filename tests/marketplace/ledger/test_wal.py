"""SQLite's write-ahead log stays bounded under sustained writes.

SQLite starts the WAL again from its beginning only when a write transaction begins
with every frame already copied into the database file. Under load the background
checkpoint finishes while the writer is already in its next batch, so it never gets
there alone; the writer finishes each checkpoint itself once the WAL is long enough
(``writer.Committer._restart_wal``). Without that, the WAL grew for as long as the load
lasted. The test runs each checkpoint inside the next batch, as load makes it happen.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from marketplace.ledger import LedgerSettings, LedgerStore
from marketplace.ledger import writer as writer_module
from marketplace.ledger.operations import HoldResult, PlaceHold, ReleaseHold
from marketplace.ledger.writer import Committer

from .conftest import make_client

PAGE_FRAME_BYTES = 4096 + 24  # a WAL frame: its page and a 24-byte header
EXPIRES_MS = 10**15
_APPLY_BATCH = writer_module.apply_batch


def _write_for_a_while(
    folder: Path, monkeypatch: pytest.MonkeyPatch, *, restart: bool
) -> tuple[int, int, int]:
    """600 commits of 10 operations, each running a checkpoint of what came before it
    while its own transaction is open; (frames in the WAL, its size in bytes, restarts)."""
    folder.mkdir()
    database = folder / "ledger.db"
    store = LedgerStore.open(
        LedgerSettings(database_url=f"sqlite:///{database}", intent_log_dir=folder / "i")
    )
    committer = Committer(store.engine)
    if not restart:
        committer._restart_wal = lambda conn: None  # type: ignore[method-assign]

    def checkpoint_then_apply(*args: Any, **kwargs: Any) -> Any:
        committer._checkpoint_wal()  # the background checkpoint, landing mid-batch
        return _APPLY_BATCH(*args, **kwargs)

    monkeypatch.setattr(writer_module, "apply_batch", checkpoint_then_apply)
    try:
        client = make_client(store, deposit=10**9)
        for batch in range(300):
            ids = [f"req-{batch}-{i}" for i in range(10)]
            committer.commit([PlaceHold(r, client, 100, EXPIRES_MS, "t") for r in ids])
            committer.commit([ReleaseHold(r) for r in ids])
        with store.engine.connect() as conn:  # a passive checkpoint reports the WAL's length
            _busy, frames, _copied = writer_module._passive_checkpoint(conn)
        wal_bytes = (folder / "ledger.db-wal").stat().st_size
        return frames, wal_bytes, committer.wal_restarts
    finally:
        committer.close()
        store.close()


def test_the_wal_restarts_under_sustained_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "_CHECKPOINT_EVERY_OPS", 10**9)  # no background ones
    monkeypatch.setattr(writer_module, "_WAL_RESTART_FRAMES", 64)
    # The same load without the writer's restarts: the control that shows the WAL grows.
    grown, grown_bytes, _ = _write_for_a_while(tmp_path / "control", monkeypatch, restart=False)
    frames, wal_bytes, restarts = _write_for_a_while(tmp_path / "writer", monkeypatch, restart=True)
    print(f"control: {grown} frames, {grown_bytes} bytes; writer: {frames}, {wal_bytes}")
    assert grown > 2_000, f"the control wrote only {grown} frames: the load is too light"
    assert restarts > 0
    # A restarted WAL holds only what came after the last restart (64 frames, plus the
    # checkpoint's lag), and its file is reused rather than extended.
    assert frames < 500, f"the WAL kept {frames} frames of {grown}: it was never restarted"
    assert wal_bytes < grown_bytes / 4


def test_a_failing_catch_up_does_not_fail_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catch-up is upkeep: if SQLite refuses it, the batch after it still commits."""
    store = LedgerStore.open(
        LedgerSettings(database_url=f"sqlite:///{tmp_path / 'l.db'}", intent_log_dir=tmp_path)
    )
    committer = Committer(store.engine)
    try:
        client = make_client(store, deposit=10**6)

        def refused(conn: Any) -> tuple[int, int, int]:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(writer_module, "_passive_checkpoint", refused)
        committer._restart_due = True
        answers, _ = committer.commit([PlaceHold("r-1", client, 100, EXPIRES_MS, "t")])
        [answer] = answers
        assert isinstance(answer, HoldResult) and answer.created
        assert committer.wal_restarts == 0
    finally:
        committer.close()
        store.close()
