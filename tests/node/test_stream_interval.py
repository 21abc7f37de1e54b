"""The stream interval: tokens gathered per delta as the engine gets busy (both backends)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from node.engine import FakeEngine, GenerationRequest
from node.engine.base import StreamInterval
from node.engine.registry import build_engine
from node.engine.vllm_engine import VllmEngine
from node.settings import EngineBackend, NodeSettings


def _engine(maximum: int, step: int) -> VllmEngine:
    return VllmEngine("/nowhere", "m", stream_interval=StreamInterval(maximum, step))


@pytest.mark.parametrize(
    ("running", "interval"), [(0, 1), (7, 1), (8, 2), (15, 2), (16, 3), (24, 4), (31, 4), (999, 4)]
)
def test_one_more_token_per_step_of_running_requests_up_to_the_maximum(
    running: int, interval: int
) -> None:
    assert _engine(4, 8).stream_interval.tokens_per_delta(running) == interval


def test_a_maximum_of_one_streams_every_token() -> None:
    assert {_engine(1, 8).stream_interval.tokens_per_delta(r) for r in range(100)} == {1}


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
    assert [engine.stream_interval.tokens_per_delta(r) for r in (0, 3, 4, 100)] == [1, 1, 2, 2]
    with pytest.raises(ValueError):
        NodeSettings(stream_interval_max=0)


def test_the_fake_engine_follows_the_node_settings_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MERCATO_NODE_STREAM_INTERVAL_MAX", "3")
    monkeypatch.setenv("MERCATO_NODE_STREAM_INTERVAL_STEP_REQUESTS", "2")
    engine = build_engine(NodeSettings(engine=EngineBackend.FAKE), None)
    assert isinstance(engine, FakeEngine)
    assert engine.stream_interval == StreamInterval(3, 2)


async def _deltas(engine: FakeEngine, request: GenerationRequest) -> list:
    return [delta async for delta in engine.generate(request)]


@contextlib.asynccontextmanager
async def _busy_engine(interval: StreamInterval, running: int) -> AsyncIterator[FakeEngine]:
    """A started fake engine with ``running`` other requests generating (paused)."""
    engine = FakeEngine(tokens_per_s=0, stream_interval=interval)
    await engine.start(timeout_s=1)
    streams = []
    try:
        for i in range(running):
            stream = engine.generate(GenerationRequest(f"busy-{i}", prompt="x", max_tokens=50))
            await anext(stream)  # now counted as running
            streams.append(stream)
        yield engine
    finally:
        for stream in streams:
            await stream.aclose()


async def _idle_deltas(request: GenerationRequest) -> list:
    idle = FakeEngine(tokens_per_s=0)
    await idle.start(timeout_s=1)
    return await _deltas(idle, request)


async def test_a_busy_fake_engine_sends_the_first_token_alone_then_gathers() -> None:
    request = GenerationRequest("r", prompt="hello", max_tokens=10)
    async with _busy_engine(StreamInterval(maximum=4, step_requests=2), running=6) as engine:
        deltas = await _deltas(engine, request)
    # 6 running -> 1 + 6 // 2 = 4 tokens per delta: the first alone, the rest of 10 last.
    assert [len(d.token_ids) for d in deltas] == [1, 4, 4, 1]
    assert deltas[-1].finish_reason is not None
    assert all(d.finish_reason is None for d in deltas[:-1])
    # The same tokens and text that an idle engine streams one by one.
    one_by_one = await _idle_deltas(request)
    assert [len(d.token_ids) for d in one_by_one] == [1] * 10
    assert [t for d in deltas for t in d.token_ids] == [t for d in one_by_one for t in d.token_ids]
    assert "".join(d.text for d in deltas) == "".join(d.text for d in one_by_one)


async def test_a_stop_string_inside_a_gathered_delta_cuts_the_text_there() -> None:
    probe = await _idle_deltas(GenerationRequest("p", prompt="hello", max_tokens=10))
    text = "".join(d.text for d in probe)
    third_word = probe[2].text.strip()
    request = GenerationRequest("p", prompt="hello", max_tokens=10, stop=(third_word,))
    async with _busy_engine(StreamInterval(maximum=4, step_requests=1), running=3) as engine:
        deltas = await _deltas(engine, request)
    assert len(deltas) == 2  # the first token alone, then the gathered one with the stop
    assert "".join(d.text for d in deltas) == text[: text.index(third_word)]
    assert deltas[-1].finish_reason is not None
