"""Failover and resume in the relay, in-process over gRPC with fake workers.

Before the first token a failing node is replaced by the next candidate (or by routing
again on a fresh snapshot); after it, the stream resumes on another node from the
tokens delivered so far. Neither ever leaves the request's hard constraints.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest
from mercato.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from coordinator.routing import BreakerState
from coordinator.server import Coordinator

from .conftest import NodeFactory, collect, fast_settings, wait_until
from .fakes import Behaviour, FakeNode
from .test_service import chat_request, deltas_and_final, two_nodes


def text_of(deltas: list[common_pb2.TextDelta]) -> str:
    return "".join(d.text for d in deltas)


def ids_of(deltas: list[common_pb2.TextDelta]) -> list[int]:
    return [i for d in deltas for i in d.token_ids]


async def test_mid_stream_failure_resumes_on_the_next_node(
    client, coordinator: Coordinator, make_node: NodeFactory
) -> None:
    first, second = await two_nodes(make_node)
    first.worker.behaviour = Behaviour(deltas=["a", "b", "c", "d", "e"], fail_after=2)
    # The second node continues: its deltas are the rest (ids 2000, 2001, 2002).
    second.worker.behaviour = Behaviour(deltas=["C", "D", "E"], first_token_id=2000)
    request = chat_request(max_tokens=5)
    request.request_id = "req-7"
    deltas, final = deltas_and_final(await collect(client, request))

    assert text_of(deltas) == "abCDE"
    assert ids_of(deltas) == [1000, 1001, 2000, 2001, 2002]
    [resumed] = second.worker.requests
    assert list(resumed.resume_token_ids) == [1000, 1001]
    assert resumed.resume_text_chars == 2  # "ab": the node sends their text if it is more
    assert resumed.segment_index == 1
    assert resumed.sampling.max_tokens == 3
    assert resumed.request_id == "req-7:1"
    assert resumed.chat == first.worker.requests[0].chat
    assert first.worker.requests[0].request_id == "req-7"

    assert final.request_id == "req-7"
    assert final.output_tokens == 5
    assert final.input_tokens == 7  # the prompt, as the first segment processed it
    assert final.node_id == second.node_id
    assert final.finish_reason == common_pb2.FINISH_REASON_STOP
    assert [(s.node_id, s.input_tokens, s.output_tokens) for s in final.segments] == [
        (first.node_id, 7, 2),  # died before its final: prompt derived from the second
        (second.node_id, 9, 3),  # prompt + the 2 resumed tokens
    ]
    assert [s.price_output_micro_usd_per_mtok for s in final.segments] == [100_000, 400_000]
    market = coordinator.registry.market
    assert market.measurements(first.node_id).outcomes.sum == 0  # one failure
    assert market.measurements(second.node_id).outcomes.sum == 1  # one success


async def test_resume_records_each_segment_in_the_outcome(
    coordinator: Coordinator, make_node: NodeFactory
) -> None:
    """The RelayOutcome handed to billing: one segment per node, receipts where a final
    came."""
    from coordinator.outcome import RelayOutcome
    from coordinator.validation import validate_request

    first, second = await two_nodes(make_node)
    first.worker.behaviour = Behaviour(deltas=["a", "b", "c"], fail_after=1)
    second.worker.behaviour = Behaviour(deltas=["B", "C"], first_token_id=2000)
    servicer_router = coordinator_router(coordinator)
    valid = validate_request(chat_request(max_tokens=3), coordinator.settings)
    relay = coordinator_relay(coordinator)
    outcome = RelayOutcome(valid.request_id)
    chunks = [
        c async for c in relay.stream(valid, servicer_router.first(valid), FakeContext(), outcome)
    ]
    assert len(chunks) == 3
    assert all(inference_pb2.GenerateResponse.FromString(c).HasField("delta") for c in chunks)
    assert outcome.complete and outcome.token_ids() == [1000, 2000, 2001]
    dead, alive = outcome.segments
    assert (dead.segment_index, dead.completed, dead.receipt) == (0, False, None)
    assert dead.worker_request_id == valid.request_id and dead.output_tokens == 1
    assert dead.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED
    assert (alive.segment_index, alive.completed, alive.resumed_tokens) == (1, True, 1)
    assert alive.receipt is not None
    assert alive.receipt.receipt == f"receipt:{valid.request_id}:1".encode()
    assert alive.region == "eu-west" and alive.price_input_micro_usd_per_mtok == 100_000
    final = outcome.final()
    assert (final.input_tokens, final.output_tokens, final.node_id) == (7, 3, second.node_id)
    assert final.cost_micro_usd == 0 and not final.receipts  # billing's to fill


async def test_resume_never_leaves_the_allowed_regions(
    client, coordinator: Coordinator, make_node: NodeFactory
) -> None:
    cheap_us = await make_node(region="us-east", price_output=50_000)
    first, second = await two_nodes(make_node, region="eu-west")
    first.worker.behaviour = Behaviour(deltas=["a", "b", "c"], fail_after=1)
    second.worker.behaviour = Behaviour(deltas=["B", "C"], first_token_id=2000)
    request = chat_request(max_tokens=3)
    request.routing.regions.append("eu-west")
    deltas, final = deltas_and_final(await collect(client, request))
    assert text_of(deltas) == "aBC"
    assert [s.region for s in final.segments] == ["eu-west", "eu-west"]
    assert not cheap_us.worker.requests

    # Both eu-west nodes fail mid-stream: nothing eligible is left, the client learns
    # which constraint ran out, and the us-east node is still never asked.
    first.worker.behaviour = Behaviour(deltas=["a", "b", "c"], fail_after=1)
    second.worker.behaviour = Behaviour(deltas=["B", "C"], fail_after=1)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for response in client.Generate(request, timeout=10):
            received.append(response)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    details = caught.value.details() or ""
    assert "eu-west" in details and "already_tried" in details
    assert [r.WhichOneof("chunk") for r in received] == ["delta", "delta", "error"]
    assert not cheap_us.worker.requests


async def test_failover_never_leaves_the_price_caps(
    client, coordinator: Coordinator, make_node: NodeFactory
) -> None:
    within = await make_node(price_output=100_000)
    above = await make_node(price_output=900_000)
    within.worker.behaviour = Behaviour(refuse=(grpc.StatusCode.UNAVAILABLE, "engine busy"))
    request = chat_request()
    request.routing.max_price_output_micro_usd_per_mtok = 500_000
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(client, request)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # The one node within the cap was tried; the dearer one was never eligible.
    assert "already_tried" in (caught.value.details() or "")
    assert not above.worker.requests


async def test_no_resume_when_fallbacks_are_not_allowed(client, make_node: NodeFactory) -> None:
    first, second = await two_nodes(make_node)
    first.worker.behaviour = Behaviour(deltas=["a", "b", "c"], fail_after=2)
    request = chat_request()
    request.routing.allow_fallbacks = False
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for response in client.Generate(request, timeout=10):
            received.append(response)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "allow_fallbacks" in (caught.value.details() or "")
    assert [r.WhichOneof("chunk") for r in received] == ["delta", "delta", "error"]
    assert not second.worker.requests


async def test_node_dying_after_its_last_token_needs_no_resume(
    client, make_node: NodeFactory
) -> None:
    first, second = await two_nodes(make_node)
    first.worker.behaviour = Behaviour(deltas=["a", "b"], fail_after=2)  # dies before final
    deltas, final = deltas_and_final(await collect(client, chat_request(max_tokens=2)))
    assert text_of(deltas) == "ab"
    assert final.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert [s.node_id for s in final.segments] == [first.node_id]
    assert not second.worker.requests


async def _refused_by_every_node(
    tmp_path: Path,
    prices: tuple[int, ...],
    behaviour: Callable[[], Behaviour],
    **settings: object,
) -> tuple[grpc.aio.AioRpcError, list[FakeNode]]:
    """A coordinator of its own (``settings``) and one fake node per output price, each
    doing ``behaviour()``; a price-sorted request that must fail. (Its error, the nodes.)"""
    coordinator = Coordinator(fast_settings(tmp_path, **settings))
    await coordinator.start()
    nodes = []
    try:
        for price in prices:
            node = FakeNode(coordinator.address, price_output=price)
            node.worker.behaviour = behaviour()
            nodes.append(await node.start())
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            request = chat_request(max_tokens=5)
            request.routing.sort = inference_pb2.SORT_MODE_PRICE
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await collect(stub, request)
    finally:
        for node in nodes:
            await node.stop()
        await coordinator.stop(grace_s=0)
    return caught.value, nodes


async def test_resumes_are_bounded(tmp_path: Path) -> None:
    error, nodes = await _refused_by_every_node(
        tmp_path,
        (100_000, 200_000, 300_000),
        lambda: Behaviour(deltas=["x"] * 5, fail_after=1),
        max_resumes=1,
    )
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "resumed 1 time" in (error.details() or "")
    assert [len(n.worker.requests) for n in nodes] == [1, 1, 0]


async def test_attempts_before_the_first_token_are_bounded(tmp_path: Path) -> None:
    """max_attempts nodes are tried for a segment, not one more, even when a fresh
    decision would offer another (the third node is within the first decision's price
    ceiling): then UNAVAILABLE names what each one said."""
    error, nodes = await _refused_by_every_node(
        tmp_path,
        (100_000, 200_000, 200_000),
        lambda: Behaviour(refuse=(grpc.StatusCode.INTERNAL, "boom")),
        max_attempts=2,
    )
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert (error.details() or "").count("boom") == 2
    assert sum(len(n.worker.requests) for n in nodes) == 2
    assert len(nodes[0].worker.requests) == 1


async def test_routes_again_when_the_first_decision_runs_out(
    client, coordinator: Coordinator, make_node: NodeFactory
) -> None:
    """The first decision knew only one node; a node that joined meanwhile takes over."""
    slow = await make_node(price_output=100_000)
    slow.worker.behaviour = Behaviour(hang=True)  # past first_token_timeout_s (2 s)
    call = client.Generate(chat_request(), timeout=10)
    async with asyncio.timeout(5):
        await slow.worker.started.wait()
    late = await make_node(price_output=100_000)
    responses = [r async for r in call]
    _, final = deltas_and_final(responses)
    assert final.node_id == late.node_id
    assert [s.node_id for s in final.segments] == [late.node_id]


async def test_client_cancel_is_no_verdict_on_the_node(
    client, coordinator: Coordinator, make_node: NodeFactory
) -> None:
    node = await make_node()
    node.worker.behaviour = Behaviour(deltas=["a"] * 100, delay_s=0.05)
    call = client.Generate(chat_request(max_tokens=100), timeout=30)
    assert (await call.read()).WhichOneof("chunk") == "delta"
    assert coordinator.registry.snapshot().get(node.node_id).in_flight == 1
    call.cancel()
    async with asyncio.timeout(5):
        await node.worker.cancelled.wait()
    await wait_until(lambda: coordinator.registry.snapshot().get(node.node_id).in_flight == 0)
    measurements = coordinator.registry.market.measurements(node.node_id)
    assert measurements.outcomes.weight == 0  # neither success nor failure
    assert measurements.ttft.measured  # the first token still told its latency


async def test_a_failing_node_is_backed_off_and_avoided(
    client, coordinator: Coordinator, make_node: NodeFactory
) -> None:
    bad, good = await two_nodes(make_node)
    bad.worker.behaviour = Behaviour(refuse=(grpc.StatusCode.INTERNAL, "boom"))
    for _ in range(3):  # breaker_failure_threshold
        request = chat_request()
        request.routing.only_nodes.append(bad.node_id)
        with pytest.raises(grpc.aio.AioRpcError):
            await collect(client, request)
    assert coordinator.registry.market.breaker_state(bad.node_id) is BreakerState.OPEN
    listed = await client.ListNodes(inference_pb2.ListNodesRequest(), timeout=5)
    info = {n.node_id: n.measurements for n in listed.nodes}
    assert info[bad.node_id].backed_off and info[bad.node_id].recent_failures == 3
    assert not info[good.node_id].backed_off
    # The cheap node is out while its breaker is open: the dear one serves.
    _, final = deltas_and_final(await collect(client, chat_request()))
    assert final.node_id == good.node_id
    assert len(bad.worker.requests) == 3
    # Only the backed-off node allowed: UNAVAILABLE naming the open circuit.
    request = chat_request()
    request.routing.only_nodes.append(bad.node_id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(client, request)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "circuit_open" in (caught.value.details() or "")


async def test_pings_measure_the_round_trip(
    client, coordinator: Coordinator, make_node: NodeFactory
) -> None:
    node = await make_node()
    quiet = await make_node()
    quiet.answer_pings = False
    await wait_until(lambda: node.pings_received >= 1 and quiet.pings_received >= 1, 20)
    await wait_until(
        lambda: coordinator.registry.snapshot().get(node.node_id).rtt_s is not None, 20
    )
    listed = await client.ListNodes(inference_pb2.ListNodesRequest(), timeout=5)
    rtt = {n.node_id: n.measurements.rtt_us for n in listed.nodes}
    assert 0 < rtt[node.node_id] < 5_000_000
    assert rtt[quiet.node_id] == 0


async def test_region_without_a_live_node_names_the_region(client, make_node: NodeFactory) -> None:
    await make_node(region="eu-west")
    request = chat_request()
    request.routing.regions.append("ap-south")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(client, request)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    details = caught.value.details() or ""
    assert "ap-south" in details and "constraint: regions" in details


class FakeContext:
    """The bits of a grpc.aio.ServicerContext the relay reads."""

    def time_remaining(self) -> float | None:
        return 10.0


def coordinator_router(coordinator: Coordinator):
    from coordinator.router import Router

    return Router(coordinator.registry, coordinator.settings)


def coordinator_relay(coordinator: Coordinator):
    from coordinator.relay import Relay

    return Relay(coordinator.registry, coordinator_router(coordinator), coordinator.settings)


def test_each_segment_counts_only_the_tokens_its_node_relayed() -> None:
    """Usage per segment after a resume: recounting an unfinished first segment (as the
    API does on cancel or failure, count_unfinished) stops at the next segment's first
    message, so the first node is never billed for tokens the second one produced."""
    from mercato.v1 import common_pb2, inference_pb2

    from coordinator.outcome import RelayOutcome, SegmentOutcome

    def delta(*ids: int) -> bytes:
        return inference_pb2.GenerateResponse(
            delta=common_pb2.TextDelta(text="x", token_ids=ids)
        ).SerializeToString()

    outcome = RelayOutcome("r")
    first = SegmentOutcome("a", "eu-west", "r", 0, 100, 200, resumed_tokens=0, first_message=0)
    outcome.segments.append(first)
    outcome.delivered.messages += [delta(1, 2), delta(3)]
    outcome.count_unreadable_as_zero(first)  # node a died mid-stream
    second = SegmentOutcome("b", "eu-west", "r:1", 1, 100, 200, resumed_tokens=3, first_message=2)
    outcome.segments.append(second)
    outcome.delivered.messages += [delta(4), delta(5, 6)]
    outcome.count_unfinished()  # then the client cancelled
    assert [s.output_tokens for s in outcome.segments] == [3, 3]
    assert outcome.output_tokens == 6
    assert outcome.token_ids() == [1, 2, 3, 4, 5, 6]


async def test_the_routing_seed_setting_makes_decisions_repeatable(
    coordinator: Coordinator, make_node: NodeFactory
) -> None:
    """Two routers built with the same ``routing_seed`` pick the same nodes in the same
    order among equal ones; another seed picks otherwise."""
    from coordinator.router import Router
    from coordinator.routing import RouteRequest, RoutingPreferences

    for _ in range(4):
        await make_node(price_output=100_000)
    await wait_until(lambda: len(coordinator.registry.snapshot().nodes) == 4)
    request = RouteRequest("tiny-model", 10, 16, RoutingPreferences())

    def picks(seed: int) -> list[str]:
        settings = coordinator.settings.model_copy(update={"routing_seed": seed})
        router = Router(coordinator.registry, settings)
        return [router.decide(request).pick.node_id for _ in range(40)]  # type: ignore[union-attr]

    assert picks(7) == picks(7)
    assert picks(7) != picks(8)


async def test_a_fallback_that_moved_out_of_the_allowed_regions_is_not_tried(
    client, make_node: NodeFactory
) -> None:
    """The fallbacks come from the first decision; a node that re-registers elsewhere
    before its turn must not be asked on the strength of its old listing."""
    first, second = await two_nodes(make_node, region="eu-west")

    async def second_moves_to_us_east() -> None:
        second.region = "us-east"
        await second.register()

    first.worker.behaviour = Behaviour(
        refuse=(grpc.StatusCode.UNAVAILABLE, "engine busy"), on_call=second_moves_to_us_east
    )
    request = chat_request()
    request.routing.regions.append("eu-west")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(client, request)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "eu-west" in (caught.value.details() or "")
    assert not second.worker.requests


@pytest.mark.parametrize(("new_price", "serves"), [(300_000, True), (500_000, False)])
async def test_a_fallback_that_changed_its_price_is_routed_on_the_new_one(
    client, make_node: NodeFactory, new_price: int, serves: bool
) -> None:
    """Within the first decision's price ceiling (what billing held: 400,000 here) the
    relisted node serves and the final reports the price it charges now; above it, it is
    not asked."""
    first, second = await two_nodes(make_node)

    async def second_relists() -> None:
        second.price_output = new_price
        await second.register()

    first.worker.behaviour = Behaviour(
        refuse=(grpc.StatusCode.UNAVAILABLE, "engine busy"), on_call=second_relists
    )
    if not serves:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(client, chat_request())
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not second.worker.requests
        return
    _, final = deltas_and_final(await collect(client, chat_request()))
    assert final.node_id == second.node_id
    assert [s.price_output_micro_usd_per_mtok for s in final.segments] == [new_price]


async def test_a_node_whose_context_is_too_short_passes_the_request_on(
    client, coordinator: Coordinator, make_node: NodeFactory
) -> None:
    """OUT_OF_RANGE: the prompt plus max_tokens exceeds this node's context (another node
    may have a longer one). The next node serves it; no verdict on the first."""
    first, second = await two_nodes(make_node)
    first.worker.behaviour = Behaviour(
        refuse=(grpc.StatusCode.OUT_OF_RANGE, "prompt plus max_tokens exceeds context 256")
    )
    _, final = deltas_and_final(await collect(client, chat_request()))
    assert final.node_id == second.node_id
    assert len(first.worker.requests) == 1
    market = coordinator.registry.market
    assert market.measurements(first.node_id).outcomes.weight == 0  # no verdict
    assert market.breaker_state(first.node_id) is BreakerState.CLOSED


async def test_a_request_no_node_has_the_context_for_is_invalid(
    client, make_node: NodeFactory
) -> None:
    nodes = await two_nodes(make_node)
    for node in nodes:
        node.worker.behaviour = Behaviour(
            refuse=(grpc.StatusCode.OUT_OF_RANGE, "exceeds the context length 2048")
        )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(client, chat_request())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert "does not fit the context length of any node tried" in details
    assert "lower max_tokens" in details
    assert all(len(node.worker.requests) == 1 for node in nodes)


async def test_a_refused_resume_is_not_blamed_on_the_request(
    client, make_node: NodeFactory
) -> None:
    """A node refusing the resumed request (INVALID_ARGUMENT: say, an earlier node's
    token ids) is no fault of the client's request, which a node already served in part."""
    first, second = await two_nodes(make_node)
    first.worker.behaviour = Behaviour(deltas=["a", "b", "c"], fail_after=1)
    second.worker.behaviour = Behaviour(
        refuse=(grpc.StatusCode.INVALID_ARGUMENT, "resume_token_ids: token id 99999")
    )
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for response in client.Generate(chat_request(max_tokens=3), timeout=10):
            received.append(response)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    details = caught.value.details() or ""
    assert "refused to resume" in details and "retry the request" in details
    assert [r.WhichOneof("chunk") for r in received] == ["delta", "error"]


async def test_a_node_dropped_while_the_relay_connects_to_it_fails_over(
    client, coordinator: Coordinator, make_node: NodeFactory
) -> None:
    """The chosen node's worker address accepts TCP but never speaks HTTP/2, so the
    relay waits for the channel; the node is dropped meanwhile (its channel shut down
    under the wait). The request goes to the next node."""
    accepted = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        accepted.set()

    mute = await asyncio.start_server(hold, "127.0.0.1", 0)
    mute_address = f"127.0.0.1:{mute.sockets[0].getsockname()[1]}"
    try:
        first = await make_node(price_output=100_000, register=False, heartbeat=False)
        first.worker_address = mute_address
        await first.register()
        first.start_heartbeats()
        second = await make_node(price_output=400_000)
        await wait_until(lambda: len(coordinator.registry.snapshot().nodes) == 2)

        async def drop_first() -> None:
            await accepted.wait()
            await asyncio.sleep(0.1)
            coordinator.registry.drop(first.node_id, "test: dropped while connecting")

        dropper = asyncio.create_task(drop_first())
        _, final = deltas_and_final(await collect(client, chat_request()))
        await dropper
        assert final.node_id == second.node_id
    finally:
        for writer in held:
            writer.close()
        mute.close()


async def test_a_channel_closed_under_an_attempt_fails_over(
    client, coordinator: Coordinator, make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call made on a channel the registry has just closed (the node left or moved to
    a new worker address during the attempt) raises grpc.aio.UsageError, not an RPC
    error: it must fail over like one, not reach the client as UNKNOWN."""
    from coordinator.worker_session import WorkerLink

    first, second = await two_nodes(make_node)
    closing = coordinator.registry.worker(first.node_id)
    opened = WorkerLink.open

    async def open_on_a_closed_channel(self: WorkerLink, request, timeout_s):  # type: ignore[no-untyped-def]
        if self is closing:
            await self.channel.close()
        return await opened(self, request, timeout_s)

    monkeypatch.setattr(WorkerLink, "open", open_on_a_closed_channel)
    _, final = deltas_and_final(await collect(client, chat_request()))
    assert final.node_id == second.node_id
    assert not first.worker.requests


@pytest.mark.parametrize("hang_after", [1, 2])
async def test_a_node_that_goes_silent_mid_stream_is_resumed_elsewhere(
    tmp_path: Path, hang_after: int
) -> None:
    """The node's engine hangs after one or two tokens while its call stays open: after
    ``stall_timeout_s`` without a message the stream resumes on the next node, and the
    silent node's call is cancelled and counted as its failure. (The watch starts once
    the first token is sent: a hang right after it is caught too.)"""
    coordinator = Coordinator(fast_settings(tmp_path, stall_timeout_s=0.3))
    await coordinator.start()
    first = FakeNode(coordinator.address, price_output=100_000)
    second = FakeNode(coordinator.address, price_output=400_000)
    first.worker.behaviour = Behaviour(deltas=["a", "b", "c", "d", "e"], hang_after=hang_after)
    second.worker.behaviour = Behaviour(
        deltas=["B", "C", "D", "E"][hang_after - 1 :], first_token_id=2000
    )
    try:
        for node in (first, second):
            await node.start()
        await wait_until(lambda: len(coordinator.registry.snapshot().nodes) == 2)
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            deltas, final = deltas_and_final(await collect(stub, chat_request(max_tokens=5)))
        assert text_of(deltas) == "abcde"[:hang_after] + "BCDE"[hang_after - 1 :]
        assert [(s.node_id, s.output_tokens) for s in final.segments] == [
            (first.node_id, hang_after),
            (second.node_id, 5 - hang_after),
        ]
        async with asyncio.timeout(5):
            await first.worker.cancelled.wait()
        outcomes = coordinator.registry.market.measurements(first.node_id).outcomes
        assert (outcomes.weight, outcomes.sum) == (pytest.approx(1.0), 0.0)  # one failure
    finally:
        for node in (first, second):
            await node.stop()
        await coordinator.stop(grace_s=0)


async def test_the_stall_watch_counts_only_time_spent_waiting_on_the_node() -> None:
    """Time the relay spends elsewhere (writing to a slow client) is no stall; a read
    that outlasts a full period is, and only this watch's cancellation is taken back."""
    from coordinator.relay import _StallWatch

    async def attempt(waiting_for_s: float, busy_for_s: float) -> bool:
        watch = _StallWatch(0.05)
        try:
            await asyncio.sleep(busy_for_s)  # not reading: a client write, say
            watch.reads += 1
            watch.waiting = True
            await asyncio.sleep(waiting_for_s)
            return False
        except asyncio.CancelledError:
            assert watch.caught()
            return True
        finally:
            watch.stop()

    assert not await attempt(waiting_for_s=0.02, busy_for_s=0.3)
    assert await attempt(waiting_for_s=1.0, busy_for_s=0.0)

    # The client cancelling in the same moment is not swallowed.
    watches: list[_StallWatch] = []

    async def cancelled_twice() -> None:
        watch = _StallWatch(60.0)
        watches.append(watch)
        watch.reads, watch.waiting = 1, True
        try:
            await asyncio.sleep(60.0)
        except asyncio.CancelledError:
            assert not watch.caught()
            raise
        finally:
            watch.stop()

    task = asyncio.create_task(cancelled_twice())
    await wait_until(lambda: bool(watches))
    task.cancel()  # the client
    watches[0]._look()  # a period passes with the same read...
    watches[0]._look()  # ...and another: the watch fires too
    assert watches[0].fired
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_node_that_streams_past_max_tokens_is_not_paid_for_the_segment(
    coordinator: Coordinator, make_node: NodeFactory
) -> None:
    """max_tokens is the client's budget; a node that sends more broke the request: its
    final and receipt are refused (nothing to bill on that segment) and it is blamed.
    The client has every token it asked for, so nothing is resumed."""
    from coordinator.outcome import RelayOutcome
    from coordinator.validation import validate_request

    greedy, other = await two_nodes(make_node)
    greedy.worker.behaviour = Behaviour(deltas=list("abcde"), ignore_max_tokens=True)
    valid = validate_request(chat_request(max_tokens=3), coordinator.settings)
    outcome = RelayOutcome(valid.request_id)
    router = coordinator_router(coordinator)
    relay = coordinator_relay(coordinator)
    chunks = [c async for c in relay.stream(valid, router.first(valid), FakeContext(), outcome)]
    assert len(chunks) == 5  # already relayed when the final showed the overrun
    [segment] = outcome.segments
    assert segment.node_id == greedy.node_id
    assert segment.receipt is None and not segment.completed
    assert outcome.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert not other.worker.requests
    outcomes = coordinator.registry.market.measurements(greedy.node_id).outcomes
    assert (outcomes.weight, outcomes.sum) == (pytest.approx(1.0), 0.0)


async def test_a_price_cap_the_client_never_set_is_explained(
    client, coordinator: Coordinator, make_node: NodeFactory
) -> None:
    """No max_price in the request; the node first chosen dies mid-stream and leaves,
    and the only node left is dearer than it. The resume may not cost more per token
    than the hold covers, and the message says that cap is not the client's."""
    only = await make_node(price_output=100_000)

    async def a_dearer_node_joins_and_this_one_leaves() -> None:
        await make_node(price_output=400_000)
        coordinator.registry.drop(only.node_id, "test: left mid-request")

    only.worker.behaviour = Behaviour(
        deltas=["a", "b", "c"], fail_after=1, on_call=a_dearer_node_joins_and_this_one_leaves
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(client, chat_request(max_tokens=3))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    details = caught.value.details() or ""
    assert "max_price_output_micro_usd_per_mtok=100000" in details
    assert "highest price among the nodes first chosen" in details
