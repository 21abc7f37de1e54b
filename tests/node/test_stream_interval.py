"""The vLLM backend's stream interval: tokens gathered per delta as the engine gets busy."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.engine.registry import build_engine
from node.engine.vllm_engine import VllmEngine
from node.settings import NodeSettings


def _engine(maximum: int, step: int) -> VllmEngine:
    return VllmEngine(
        "/nowhere", "m", stream_interval_max=maximum, stream_interval_step_requests=step
    )


@pytest.mark.parametrize(
    ("running", "interval"), [(0, 1), (7, 1), (8, 2), (15, 2), (16, 3), (24, 4), (31, 4), (999, 4)]
)
def test_one_more_token_per_step_of_running_requests_up_to_the_maximum(
    running: int, interval: int
) -> None:
    assert _engine(4, 8).stream_interval(running) == interval


def test_a_maximum_of_one_streams_every_token() -> None:
    assert {_engine(1, 8).stream_interval(r) for r in range(100)} == {1}


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="stream_interval"):
        _engine(0, 8)
    with pytest.raises(ValueError, match="stream_interval"):
        _engine(4, 0)


def test_settings_reach_the_engine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MERCATO_NODE_STREAM_INTERVAL_MAX", "2")
    monkeypatch.setenv("MERCATO_NODE_STREAM_INTERVAL_STEP_REQUESTS", "4")
    engine = build_engine(NodeSettings(), tmp_path)  # built, not started: nothing loads
    assert isinstance(engine, VllmEngine)
    assert [engine.stream_interval(r) for r in (0, 3, 4, 100)] == [1, 1, 2, 2]
    with pytest.raises(ValueError):
        NodeSettings(stream_interval_max=0)
