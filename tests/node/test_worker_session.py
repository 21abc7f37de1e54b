"""NodeWorkerService.Session: generations multiplexed on one stream, through a real
in-process grpc.aio server over the FakeEngine (the same NodeWorker as Generate)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from mercato.v1 import common_pb2, market_pb2, node_pb2

from marketplace.control import NODE_ID_METADATA
from marketplace.dispatch import DISPATCH_METADATA
from marketplace.identity import Identity

from .conftest import WorkerHarness, chat_request, start_harness


def start(
    stream_id: int, request: node_pb2.WorkerGenerateRequest, timeout_ms: int = 0
) -> node_pb2.WorkerSessionRequest:
    return node_pb2.WorkerSessionRequest(stream_id=stream_id, start=request, timeout_ms=timeout_ms)


def cancel(stream_id: int) -> node_pb2.WorkerSessionRequest:
    return node_pb2.WorkerSessionRequest(stream_id=stream_id, cancel=True)


class Session:
    """A Session call: write frames, read what each stream got."""

    def __init__(self, harness: WorkerHarness, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.call = harness.stub.Session(metadata=metadata)
        self.deltas: dict[int, list[common_pb2.TextDelta]] = defaultdict(list)
        self.finals: dict[int, node_pb2.WorkerFinal] = {}
        self.ends: dict[int, node_pb2.WorkerSessionEnd] = {}
        self.errors: dict[int, common_pb2.StreamError] = {}

    async def send(self, *frames: node_pb2.WorkerSessionRequest) -> None:
        for frame in frames:
            await self.call.write(frame)

    async def read_until(self, done) -> None:  # type: ignore[no-untyped-def]
        async with asyncio.timeout(10):
            while not done():
                frame = await self.call.read()
                assert frame is not grpc.aio.EOF, "the session ended"
                self.take(frame)

    def take(self, frame: node_pb2.WorkerSessionResponse) -> None:
        stream_id = frame.stream_id
        if frame.WhichOneof("event") == "end":
            self.ends[stream_id] = frame.end
            return
        response = frame.response
        kind = response.WhichOneof("chunk")
        if kind == "delta":
            self.deltas[stream_id].append(response.delta)
        elif kind == "final":
            self.finals[stream_id] = response.final
        else:
            self.errors[stream_id] = response.error

    def tokens(self, stream_id: int) -> list[int]:
        return [t for d in self.deltas[stream_id] for t in d.token_ids]


@pytest.fixture
async def slow_harness() -> AsyncIterator[WorkerHarness]:
    harness, server = await start_harness(tokens_per_s=50, max_concurrency=2)
    yield harness
    await harness.channel.close()
    await server.stop(0)


async def _until(predicate, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 (state owned by grpc tasks)
            await asyncio.sleep(0.01)


async def test_generations_interleave_on_one_stream_each_as_a_call(
    harness: WorkerHarness,
) -> None:
    # What one Generate call gives, as the reference.
    plain = [
        t
        async for r in harness.stub.Generate(chat_request("a b", max_tokens=6, request_id="ref"))
        if r.HasField("delta")
        for t in r.delta.token_ids
    ]
    session = Session(harness)
    await session.send(
        start(1, chat_request("a b", max_tokens=6, request_id="s1")),
        start(7, chat_request("other", max_tokens=9, request_id="s7")),
    )
    await session.read_until(lambda: len(session.finals) == 2)
    assert session.tokens(1) == plain  # the same generation as on a call
    assert len(session.tokens(7)) == 9
    assert session.finals[1].output_tokens == 6 and session.finals[7].output_tokens == 9
    receipts = {
        i: market_pb2.UsageReceipt.FromString(session.finals[i].receipt.receipt) for i in (1, 7)
    }
    assert receipts[1].request_id == "s1" and receipts[7].request_id == "s7"
    assert receipts[7].output_tokens == 9
    assert not session.ends
    await _until(lambda: harness.worker.in_flight == 0)
    # The stream stays open for more; half-closing ends it cleanly once all are done.
    await session.send(start(1, chat_request(max_tokens=2, request_id="again")))
    await session.read_until(lambda: session.finals[1].output_tokens == 2)
    await session.call.done_writing()
    assert await session.call.read() is grpc.aio.EOF
    assert await session.call.code() == grpc.StatusCode.OK


async def test_cancel_stops_one_generation_and_hands_over_its_late_receipt(
    slow_harness: WorkerHarness,
) -> None:
    harness = slow_harness
    session = Session(harness)
    await session.send(
        start(1, chat_request(max_tokens=200, request_id="cut")),
        start(2, chat_request(max_tokens=3, request_id="kept")),
    )
    await session.read_until(lambda: len(session.tokens(1)) >= 2)
    await session.send(cancel(1))
    await _until(lambda: "cut" in harness.engine.aborted_request_ids)
    await session.read_until(lambda: 2 in session.finals)
    assert session.finals[2].output_tokens == 3
    assert 1 not in session.finals and 1 not in session.ends  # a cancel gets no answer
    await _until(lambda: harness.late_receipts)
    [late] = harness.late_receipts
    usage = market_pb2.UsageReceipt.FromString(late.receipt)
    assert usage.request_id == "cut" and usage.output_tokens >= len(session.tokens(1))
    await _until(lambda: harness.worker.in_flight == 0)


async def test_a_refused_generation_ends_alone(harness: WorkerHarness) -> None:
    session = Session(harness)
    await session.send(
        start(1, chat_request(model="no-such-model", max_tokens=2, request_id="bad")),
        start(2, chat_request(max_tokens=2, request_id="good")),
    )
    await session.read_until(lambda: 1 in session.ends and 2 in session.finals)
    assert grpc.StatusCode.NOT_FOUND.value[0] == session.ends[1].status_code
    assert "no-such-model" in session.ends[1].message
    await _until(lambda: harness.worker.in_flight == 0)


async def test_timeout_ms_ends_the_generation_deadline_exceeded(
    slow_harness: WorkerHarness,
) -> None:
    harness = slow_harness
    session = Session(harness)
    await session.send(start(3, chat_request(max_tokens=200, request_id="slow"), timeout_ms=200))
    await session.read_until(lambda: 3 in session.ends)
    assert session.ends[3].status_code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert harness.engine.aborted_request_ids == ["slow"]
    await _until(lambda: harness.late_receipts)  # what went out is billable
    assert market_pb2.UsageReceipt.FromString(harness.late_receipts[0].receipt).output_tokens


async def test_beyond_max_concurrency_is_resource_exhausted(slow_harness: WorkerHarness) -> None:
    harness = slow_harness  # max_concurrency 2
    session = Session(harness)
    await session.send(
        *(start(i, chat_request(max_tokens=100, request_id=f"r{i}")) for i in (1, 2, 3))
    )
    await session.read_until(lambda: 3 in session.ends)
    assert session.ends[3].status_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "max_concurrency" in session.ends[3].message
    assert harness.worker.in_flight == 2
    await session.send(cancel(1), cancel(2))
    await _until(lambda: harness.worker.in_flight == 0)


@pytest.mark.parametrize(
    "frame",
    [
        start(0, chat_request(max_tokens=1)),
        node_pb2.WorkerSessionRequest(stream_id=4),
    ],
    ids=["stream-id-0", "neither-start-nor-cancel"],
)
async def test_protocol_violations_end_the_stream_invalid_argument(
    harness: WorkerHarness, frame: node_pb2.WorkerSessionRequest
) -> None:
    session = Session(harness)
    await session.send(frame)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await session.read_until(lambda: False)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_reusing_an_open_stream_id_ends_the_stream(slow_harness: WorkerHarness) -> None:
    harness = slow_harness
    session = Session(harness)
    await session.send(start(5, chat_request(max_tokens=100, request_id="first")))
    await session.read_until(lambda: session.tokens(5))
    await session.send(start(5, chat_request(max_tokens=1, request_id="second")))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await session.read_until(lambda: False)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "already open" in (raised.value.details() or "")
    await _until(lambda: "first" in harness.engine.aborted_request_ids)
    await _until(lambda: harness.worker.in_flight == 0)


async def test_the_stream_ending_cancels_every_open_generation(
    slow_harness: WorkerHarness,
) -> None:
    harness = slow_harness
    session = Session(harness)
    await session.send(
        start(1, chat_request(max_tokens=200, request_id="x1")),
        start(2, chat_request(max_tokens=200, request_id="x2")),
    )
    await session.read_until(lambda: session.tokens(1) and session.tokens(2))
    session.call.cancel()  # the coordinator went away
    await _until(lambda: len(harness.late_receipts) == 2)
    assert sorted(harness.engine.aborted_request_ids) == ["x1", "x2"]
    assert {market_pb2.UsageReceipt.FromString(r.receipt).request_id for r in harness.late_receipts}
    await _until(lambda: harness.worker.in_flight == 0)


async def test_generations_count_under_the_streams_dispatch_tag(
    slow_harness: WorkerHarness,
) -> None:
    harness = slow_harness
    session = Session(harness, metadata=((DISPATCH_METADATA, "session-a"),))
    await session.send(
        start(1, chat_request(max_tokens=100, request_id="a1")),
        start(2, chat_request(max_tokens=100, request_id="a2")),
    )
    await session.read_until(lambda: session.tokens(1) and session.tokens(2))
    assert harness.worker.in_flight_tagged("session-a") == 2
    await session.send(cancel(1))
    await _until(lambda: harness.worker.in_flight_tagged("session-a") == 1)
    await session.send(cancel(2))
    await _until(lambda: harness.worker.in_flight == 0)
    assert harness.worker.in_flight_tagged("session-a") == 0


async def test_the_slot_is_free_when_the_final_arrives(slow_harness: WorkerHarness) -> None:
    # A coordinator sends its next request as soon as it has a final; the node must not
    # still count the finished generation then (it would refuse it at max_concurrency).
    harness = slow_harness  # max_concurrency 2
    session = Session(harness)
    await session.send(start(1, chat_request(max_tokens=2, request_id="f1")))
    await session.send(start(2, chat_request(max_tokens=50, request_id="f2")))
    await session.read_until(lambda: 1 in session.finals)
    assert harness.worker.in_flight == 1  # f2 only, at once
    await session.send(start(3, chat_request(max_tokens=2, request_id="f3")))
    await session.read_until(lambda: 3 in session.finals or 3 in session.ends)
    assert 3 in session.finals
    await session.send(cancel(2))


async def test_a_draining_worker_refuses_new_generations_and_lets_open_ones_run(
    slow_harness: WorkerHarness,
) -> None:
    harness = slow_harness
    session = Session(harness)
    await session.send(start(1, chat_request(max_tokens=100, request_id="open")))
    await session.read_until(lambda: bool(session.deltas[1]))
    harness.worker.drain()
    await session.send(start(2, chat_request(max_tokens=2, request_id="new")))
    await session.read_until(lambda: 2 in session.ends)
    assert session.ends[2].status_code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "shutting down" in session.ends[2].message
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await harness.stub.Generate(chat_request(max_tokens=2, request_id="call")).read()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert 1 not in session.ends and harness.worker.in_flight == 1  # still running
    assert not await harness.worker.wait_idle(0.05)
    await session.send(cancel(1))
    assert await harness.worker.wait_idle(10)
    assert [r.receipt for r in harness.late_receipts]  # the cut one's receipt went out


async def test_a_stream_or_call_for_another_node_is_refused_permission_denied(
    harness: WorkerHarness,
) -> None:
    """A coordinator names the node it dials (the offer's node id): a worker that is
    another node refuses the Session stream before accepting it, and a Generate call,
    naming both ids. Its own id, or none (a direct caller), is served."""
    own = harness.identity.node_id
    other = Identity.generate().node_id
    session = Session(harness, metadata=((NODE_ID_METADATA, other),))
    async with asyncio.timeout(5):
        assert await session.call.code() == grpc.StatusCode.PERMISSION_DENIED
    details = await session.call.details()
    assert own in details and other in details
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await harness.stub.Generate(
            chat_request(max_tokens=2), metadata=((NODE_ID_METADATA, other),)
        ).read()
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert own in (refused.value.details() or "") and other in (refused.value.details() or "")
    assert harness.worker.in_flight == 0 and not harness.late_receipts

    for metadata in (((NODE_ID_METADATA, own),), ()):
        session = Session(harness, metadata=metadata)
        await session.send(start(1, chat_request(max_tokens=2, request_id="s")))
        await session.read_until(lambda: 1 in session.finals)  # noqa: B023 (awaited here)
        await session.call.done_writing()
        calls = harness.stub.Generate(chat_request(max_tokens=2), metadata=metadata)
        assert [r async for r in calls][-1].final.output_tokens == 2
