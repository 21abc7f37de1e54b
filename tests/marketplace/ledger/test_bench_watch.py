"""The ledger benchmark's stall watcher: another process that times its own 1 ms sleeps."""

from __future__ import annotations

import time

from marketplace.ledger.bench import _StallWatch


def test_the_watcher_reports_its_worst_late_wake_up() -> None:
    watch = _StallWatch()
    watch.start()
    time.sleep(0.2)  # ~200 of its 1 ms sleeps
    worst_ms, over_5ms = watch.stop()
    assert 0.0 <= worst_ms < 10_000
    assert over_5ms >= 0
    assert watch._process.returncode == 0
