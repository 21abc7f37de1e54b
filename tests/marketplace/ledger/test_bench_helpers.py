"""The ledger benchmark's helpers that explain a bad p99: the machine's stalls and
PostgreSQL's checkpoints in the measured window."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from marketplace.ledger.bench import _checkpoint_activity, _checkpoint_counters, _StallWatch
from tests.postgres import POSTGRES_URL, require_postgres


def test_the_watcher_reports_its_worst_late_wake_up() -> None:
    watch = _StallWatch()
    watch.start()
    time.sleep(0.2)  # ~200 of its 1 ms sleeps
    worst_ms, over_5ms = watch.stop()
    assert 0.0 <= worst_ms < 10_000
    assert over_5ms >= 0
    assert watch._process.returncode == 0


def test_checkpoint_counters_come_from_postgres_only(tmp_path: Path) -> None:
    sqlite = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        assert _checkpoint_counters(sqlite) is None
    finally:
        sqlite.dispose()
    assert _checkpoint_activity(None, (1, 2)) == {}


@pytest.mark.postgres
def test_a_checkpoint_in_the_window_is_counted() -> None:
    require_postgres()
    engine = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        before = _checkpoint_counters(engine)
        assert before is not None
        with engine.connect() as conn:
            conn.execute(text("CHECKPOINT"))
        after = _checkpoint_counters(engine)
        activity = _checkpoint_activity(before, after)
        assert activity["checkpoints_started"] >= 1
        assert activity["checkpoint_buffers_written"] >= 0
    finally:
        engine.dispose()
