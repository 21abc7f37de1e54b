"""The relay's session streams to nodes (coordinator.worker_session): requests share one
stream per node session, an older node without Session gets a call per request, and a
stream that breaks mid-answer resumes like a failed call."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mercato.v1 import common_pb2, node_pb2, node_pb2_grpc

from coordinator.server import Coordinator
from coordinator.worker_session import split_frame
from marketplace.worker_session import STREAM_ID_MAX

from .conftest import NodeFactory, collect, wait_until
from .fakes import Behaviour
from .test_failover import ids_of, text_of
from .test_service import chat_request, deltas_and_final, two_nodes

responses = st.one_of(
    st.builds(
        lambda text, ids: node_pb2.WorkerGenerateResponse(
            delta=common_pb2.TextDelta(text=text, token_ids=ids)
        ),
        st.text(max_size=300),
        st.lists(st.integers(0, 2**32 - 1), max_size=80),
    ),
    st.builds(
        lambda n: node_pb2.WorkerGenerateResponse(final=node_pb2.WorkerFinal(output_tokens=n)),
        st.integers(0, 2**32 - 1),
    ),
)


@given(stream_id=st.integers(1, STREAM_ID_MAX), response=responses)
def test_split_frame_gives_the_stream_and_the_response_bytes(
    stream_id: int, response: node_pb2.WorkerGenerateResponse
) -> None:
    frame = node_pb2.WorkerSessionResponse(stream_id=stream_id, response=response)
    got_id, got, end = split_frame(frame.SerializeToString())
    assert (got_id, end) == (stream_id, None)
    assert got is not None
    assert node_pb2.WorkerGenerateResponse.FromString(got) == response
    # A delta's bytes stay a valid client message (the relay forwards them as they are).
    if response.HasField("delta"):
        assert got == response.SerializeToString()


@given(stream_id=st.integers(1, STREAM_ID_MAX), code=st.integers(1, 16), message=st.text())
def test_split_frame_reads_an_end(stream_id: int, code: int, message: str) -> None:
    frame = node_pb2.WorkerSessionResponse(
        stream_id=stream_id, end=node_pb2.WorkerSessionEnd(status_code=code, message=message)
    )
    got_id, got, end = split_frame(frame.SerializeToString())
    assert (got_id, got) == (stream_id, None)
    assert end is not None and (end.status_code, end.message) == (code, message)


async def test_requests_to_a_node_share_one_session_stream(
    client, coordinator: Coordinator, make_node: NodeFactory
) -> None:
    node = await make_node()
    for _ in range(3):
        deltas, _final = deltas_and_final(await collect(client, chat_request(max_tokens=5)))
        assert text_of(deltas) == "Hello, world"
    assert len(node.worker.requests) == 3
    assert node.worker.session_streams == 1
    # The generations carried the session's dispatch tag and the client's deadline.
    link = coordinator.registry.worker(node.node_id)
    assert link is not None and not link.sessions_unsupported
    assert all(m.items() >= dict(link.metadata).items() for m in node.worker.metadata)
    assert all(r is not None and 0 < r < 11 for r in node.worker.time_remaining_s)


@pytest.mark.parametrize("unknown", [True, False], ids=["method-unknown", "handler-refuses"])
async def test_a_node_without_session_gets_one_call_per_request(
    client, coordinator: Coordinator, make_node: NodeFactory, unknown: bool
) -> None:
    node = await make_node(sessions=False)
    if not unknown:  # the servicer is registered but its Session refuses
        assert node.server is not None
        await node.server.stop(None)
        node.server = grpc.aio.server()
        node_pb2_grpc.add_NodeWorkerServiceServicer_to_server(node.worker, node.server)
        node.server.add_insecure_port(node.worker_address)
        await node.server.start()
    for _ in range(2):
        deltas, final = deltas_and_final(await collect(client, chat_request(max_tokens=5)))
        assert text_of(deltas) == "Hello, world" and final.node_id == node.node_id
    assert len(node.worker.requests) == 2  # both served, the first one too
    assert node.worker.session_streams == 0
    link = coordinator.registry.worker(node.node_id)
    assert link is not None and link.sessions_unsupported
    # Not a failure of the node: routing still trusts it.
    assert coordinator.registry.market.measurements(node.node_id).outcomes.sum == pytest.approx(
        2, rel=1e-3
    )


async def test_a_session_broken_mid_answer_resumes_on_another_node(
    client, make_node: NodeFactory
) -> None:
    first, second = await two_nodes(make_node)
    first.worker.behaviour = Behaviour(deltas=list("abcdefgh"), delay_s=0.05)
    second.worker.behaviour = Behaviour(deltas=list("CDEFGH"), first_token_id=2000)
    call = client.Generate(chat_request(max_tokens=8), timeout=10)
    received = []
    async for response in call:
        received.append(response)
        if len(received) == 2:
            assert first.server is not None
            await first.server.stop(None)  # the whole node goes: its session breaks
    deltas, final = deltas_and_final(received)
    ids = ids_of(deltas)
    from_first = [i for i in ids if i < 2000]
    assert len(ids) == 8 and len(from_first) >= 2
    assert ids == [*range(1000, 1000 + len(from_first)), *range(2000, 2000 + 8 - len(from_first))]
    [resumed] = second.worker.requests
    assert list(resumed.resume_token_ids) == from_first  # no gap, no repeat
    assert final.node_id == second.node_id
    assert [s.node_id for s in final.segments] == [first.node_id, second.node_id]


@pytest.mark.parametrize("sessions", [True, False])
async def test_a_client_cancel_cancels_the_generation_on_the_node(
    client, make_node: NodeFactory, sessions: bool
) -> None:
    node = await make_node(sessions=sessions)
    node.worker.behaviour = Behaviour(hang=True)
    call = client.Generate(chat_request(max_tokens=5), timeout=10)
    await wait_until(lambda: bool(node.worker.requests))
    call.cancel()
    await wait_until(node.worker.cancelled.is_set)
    assert await call.code() == grpc.StatusCode.CANCELLED


async def test_a_node_that_registers_again_finishes_what_it_was_given(
    client, coordinator: Coordinator, make_node: NodeFactory
) -> None:
    node = await make_node()
    node.worker.behaviour = Behaviour(deltas=list("abcdef"), delay_s=0.05)
    call = client.Generate(chat_request(max_tokens=6), timeout=10)
    received = []
    async for response in call:
        received.append(response)
        if len(received) == 1:
            await node.register()  # a new node session: the old stream is retired
    deltas, final = deltas_and_final(received)
    assert text_of(deltas) == "abcdef" and final.node_id == node.node_id
    assert [s.node_id for s in final.segments] == [node.node_id]  # no resume was needed
    # New requests go on a new stream, with the new session's dispatch tag.
    node.worker.behaviour = Behaviour()
    deltas_and_final(await collect(client, chat_request(max_tokens=5)))
    assert node.worker.session_streams == 2
    link = coordinator.registry.worker(node.node_id)
    assert link is not None and node.worker.metadata[-1].items() >= dict(link.metadata).items()
    assert node.worker.metadata[0] != node.worker.metadata[-1]
