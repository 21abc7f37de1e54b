"""FakeEngine: deterministic, honours max_tokens and stop, aborts when the consumer leaves."""

from __future__ import annotations

from contextlib import aclosing

from node.engine import FakeEngine, FinishReason, GenerationRequest


async def _run(engine: FakeEngine, request: GenerationRequest) -> list:
    return [delta async for delta in engine.generate(request)]


async def test_same_request_same_tokens() -> None:
    engine = FakeEngine(tokens_per_s=0)
    await engine.start(timeout_s=1)
    request = GenerationRequest(request_id="a", prompt="hello", max_tokens=6)
    first, second = await _run(engine, request), await _run(engine, request)
    assert [d.token_ids for d in first] == [d.token_ids for d in second]
    assert len(first) == 6
    assert first[-1].finish_reason is FinishReason.LENGTH
    assert all(d.finish_reason is None for d in first[:-1])
    assert engine.finished_request_ids == ["a", "a"]


async def test_closing_the_stream_aborts_the_request() -> None:
    engine = FakeEngine(tokens_per_s=0)
    await engine.start(timeout_s=1)
    async with aclosing(engine.generate(GenerationRequest("b", prompt="x", max_tokens=50))) as s:
        async for _ in s:
            assert engine.load().running_requests == 1
            break
    assert engine.load().running_requests == 0
    assert engine.aborted_request_ids == ["b"]
