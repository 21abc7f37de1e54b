"""The worker's coalescing of engine deltas (node.worker.coalesced).

Hand-driven sources make the timing explicit: a consumer that asks before the next delta
exists gets every delta alone (the very object); one that asks after several arrived
gets them merged, in order. Through gRPC and through the real engine the merged output
must equal the engine's own, byte for byte.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from node.engine import Delta, FakeEngine, FinishReason, GenerationRequest
from node.errors import EngineDeadError
from node.worker import coalesced

from .conftest import collect, start_harness


async def _listed(deltas: list[Delta], fail: Exception | None = None) -> AsyncIterator[Delta]:
    for delta in deltas:  # no await in between: all arrive during the consumer's first wait
        yield delta
    if fail is not None:
        raise fail


class _Fed:
    """A source the test feeds one delta at a time; records whether it was closed."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Delta] = asyncio.Queue()
        self.closed = asyncio.Event()

    async def stream(self) -> AsyncIterator[Delta]:
        try:
            while True:
                delta = await self.queue.get()
                self.queue.task_done()  # queue.join(): every fed delta was read
                yield delta
        finally:
            self.closed.set()


async def test_a_consumer_that_keeps_up_gets_every_delta_alone() -> None:
    fed = _Fed()
    sent = [Delta(f" t{i}", [i]) for i in range(5)]
    async with aclosing(coalesced(fed.stream())) as stream:
        for delta in sent:
            fed.queue.put_nowait(delta)
            assert await anext(stream) is delta


async def test_deltas_that_arrive_together_are_merged_in_order() -> None:
    source = [Delta(" a", [1]), Delta("", []), Delta(" bc", [2, 3]), Delta("d", [4])]
    source.append(Delta(" e", [5], FinishReason.LENGTH))
    received = [d async for d in coalesced(_listed(source))]
    assert received == [Delta(" a bcd e", [1, 2, 3, 4, 5], FinishReason.LENGTH)]


async def test_a_busy_consumer_gets_what_arrived_during_its_write() -> None:
    fed = _Fed()
    async with aclosing(coalesced(fed.stream())) as stream:
        fed.queue.put_nowait(Delta("x", [1]))
        assert await anext(stream) == Delta("x", [1])
        # The "write" of x is in flight while three more arrive.
        for i in range(2, 5):
            fed.queue.put_nowait(Delta(str(i), [i]))
        await fed.queue.join()
        assert await anext(stream) == Delta("234", [2, 3, 4])


async def test_an_engine_error_comes_after_the_deltas_before_it() -> None:
    stream = coalesced(_listed([Delta("a", [1]), Delta("b", [2])], EngineDeadError("gone")))
    assert await anext(stream) == Delta("ab", [1, 2])
    with pytest.raises(EngineDeadError, match="gone"):
        await anext(stream)


async def test_closing_early_closes_the_engine_stream() -> None:
    fed = _Fed()
    stream = coalesced(fed.stream())
    fed.queue.put_nowait(Delta("a", [1]))
    await anext(stream)
    await stream.aclose()
    assert fed.closed.is_set()


async def test_cancelling_the_consumer_closes_the_engine_stream() -> None:
    fed = _Fed()

    async def consume() -> None:
        async for _ in coalesced(fed.stream()):
            pass

    task = asyncio.create_task(consume())
    fed.queue.put_nowait(Delta("a", [1]))
    await fed.queue.join()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fed.closed.is_set()


async def test_streams_through_grpc_equal_the_engine_output_at_full_speed() -> None:
    """16 streams from an engine with no delay: writes fall behind, the output must not."""
    harness, server = await start_harness(tokens_per_s=0, max_concurrency=16, context_length=512)
    reference = FakeEngine("fake-model", tokens_per_s=0, context_length=512)
    await reference.start(timeout_s=1)
    try:
        from .conftest import chat_request

        prompts = [f"question {i}" for i in range(16)]
        results = await asyncio.gather(
            *(
                collect(harness.stub.Generate(chat_request(p, request_id=f"r{i}", max_tokens=300)))
                for i, p in enumerate(prompts)
            )
        )
        for prompt, (deltas, final) in zip(prompts, results, strict=True):
            expected = [
                d
                async for d in reference.generate(
                    GenerationRequest("x", messages=[("user", prompt)], max_tokens=300)
                )
            ]
            assert "".join(d.text for d in deltas) == "".join(d.text for d in expected)
            assert [t for d in deltas for t in d.token_ids] == [
                t for d in expected for t in d.token_ids
            ]
            assert final is not None and final.output_tokens == 300
            assert all(d.token_ids and d.text for d in deltas)
    finally:
        await harness.channel.close()
        await server.stop(0)


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*")
@pytest.mark.filterwarnings("ignore::FutureWarning:torch.*")
@pytest.mark.filterwarnings("ignore::DeprecationWarning:transformers.*")
async def test_merged_greedy_output_of_the_real_engine_is_byte_identical(vllm_engine) -> None:  # type: ignore[no-untyped-def]
    """A slow consumer over vLLM gets merged deltas whose concatenation is the direct output."""
    question = [("user", "Name three rivers of Europe and say one thing about each.")]

    def request(request_id: str) -> GenerationRequest:
        return GenerationRequest(request_id, messages=question, max_tokens=48, temperature=0)

    direct = [d async for d in vllm_engine.generate(request("direct"))]
    merged: list[Delta] = []
    async with aclosing(coalesced(vllm_engine.generate(request("merged")))) as stream:
        async for delta in stream:
            merged.append(delta)
            await asyncio.sleep(0.25)  # a write that falls far behind the engine's steps
    direct_ids = [t for d in direct for t in d.token_ids]
    assert [t for d in merged for t in d.token_ids] == direct_ids
    direct_text = "".join(d.text for d in direct).encode()
    assert "".join(d.text for d in merged).encode() == direct_text
    assert merged[-1].finish_reason == direct[-1].finish_reason
    assert len(merged) < len(direct), "the slow consumer should have received merged deltas"
