"""The stream interval: tokens gathered per delta as the engine gets busy (both backends)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from node.engine import FakeEngine, GenerationRequest
from node.engine.base import StreamInterval
from node.engine.registry import build_engine
from node.engine.vllm_engine import VllmEngine, _unfinished_requests, has_per_request_interval
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


class _OldSamplingParams:
    """vLLM 0.24's SamplingParams as far as the node can tell: no stream_interval field."""

    __struct_fields__ = ("n", "max_tokens", "temperature")

    def __init__(self, **kwargs: object) -> None:
        unknown = set(kwargs) - {"n", "max_tokens", "temperature", "top_p", "seed", "stop"}
        unknown -= {"output_kind", "detokenize"}
        if unknown:
            raise TypeError(f"Unexpected keyword argument {sorted(unknown)[0]!r}")
        self.kwargs = kwargs


def test_the_installed_vllm_takes_a_stream_interval_per_request() -> None:
    from vllm import SamplingParams

    assert has_per_request_interval(SamplingParams)
    assert not has_per_request_interval(_OldSamplingParams)


def test_without_a_per_request_interval_every_token_is_its_own_delta() -> None:
    # A node on the CUDA build of vLLM 0.24 failed every request: its SamplingParams
    # refuses stream_interval (seen on an H100; docs/benchmarks.md, "GPU").
    engine = _engine(4, 8)
    engine._sampling_params_cls = _OldSamplingParams
    engine._per_request_interval = False
    params = engine._sampling_params(GenerationRequest("r", prompt="hi", max_tokens=8))
    assert "stream_interval" not in params.kwargs
    assert params.kwargs["max_tokens"] == 8
    assert engine.stream_interval.tokens_per_delta(999) == 1  # what it will really do


def test_unfinished_requests_come_from_the_output_processor() -> None:
    class _Processor:
        def get_num_unfinished_requests(self) -> int:
            return 3

    class _Llm:  # what every vLLM v1 AsyncLLM has, 0.24 included
        output_processor = _Processor()

    assert _unfinished_requests(_Llm()) == 3
    assert _unfinished_requests(None) == 0


@pytest.mark.parametrize(
    ("gpus", "cuda_graphs", "eager"),
    [(0, "true", True), (0, "false", True), (1, "true", False), (1, "false", True)],
)
def test_cuda_graphs_on_a_gpu_node_unless_turned_off(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, gpus: int, cuda_graphs: str, eager: bool
) -> None:
    import node.hardware
    from node.hardware import GpuInfo

    found = tuple(GpuInfo(name="NVIDIA H100 80GB HBM3", memory_bytes=80 << 30) for _ in range(gpus))
    monkeypatch.setattr(node.hardware, "probe_nvidia_gpus", lambda: found)
    monkeypatch.setenv("MERCATO_NODE_CUDA_GRAPHS", cuda_graphs)
    engine = build_engine(NodeSettings(), tmp_path)  # built, not started: nothing loads
    assert isinstance(engine, VllmEngine)
    arguments = engine.engine_arguments()
    assert arguments["enforce_eager"] is eager
    assert ("gpu_memory_utilization" in arguments) is bool(gpus)
    if gpus:
        assert arguments["dtype"] == "bfloat16"
