"""The coordinator in-process over gRPC, with fake nodes: relay, errors, liveness."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mercato.v1 import common_pb2, inference_pb2, node_pb2, node_pb2_grpc

from coordinator.server import Coordinator
from marketplace.dispatch import DISPATCH_METADATA, dispatch_tag

from .conftest import NodeFactory, collect, wait_until
from .fakes import MODEL, Behaviour


def chat_request(**sampling: object) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=MODEL,
        chat=common_pb2.ChatInput(messages=[common_pb2.ChatMessage(role="user", content="Hi")]),
        sampling=common_pb2.SamplingParams(**sampling),  # type: ignore[arg-type]
    )


def deltas_and_final(responses: list[inference_pb2.GenerateResponse]):
    deltas = [r.delta for r in responses if r.WhichOneof("chunk") == "delta"]
    finals = [r.final for r in responses if r.WhichOneof("chunk") == "final"]
    assert len(finals) == 1 and responses[-1].WhichOneof("chunk") == "final"
    return deltas, finals[0]


async def test_relays_the_stream_and_ends_with_a_final(client, make_node: NodeFactory) -> None:
    node = await make_node()
    node.worker.behaviour = Behaviour(deltas=["Hello", ",", " wörld", ""])
    responses = await collect(client, chat_request(max_tokens=10, temperature=0.0))
    deltas, final = deltas_and_final(responses)
    assert [d.text for d in deltas] == ["Hello", ",", " wörld", ""]
    assert [list(d.token_ids) for d in deltas] == [[1000], [1001], [1002], [1003]]
    assert final.finish_reason == common_pb2.FINISH_REASON_STOP
    assert final.output_tokens == 4
    assert final.input_tokens == 7
    assert final.node_id == node.node_id
    assert final.region == "eu-west"
    assert len(final.request_id) >= 1
    [segment] = final.segments
    assert segment.node_id == node.node_id
    assert segment.output_tokens == 4
    assert segment.price_output_micro_usd_per_mtok == 200_000
    # What the node was asked: defaults filled in, the same request id.
    [sent] = node.worker.requests
    assert sent.model == MODEL
    assert sent.request_id == final.request_id
    assert sent.sampling.max_tokens == 10
    assert sent.chat.messages[0].content == "Hi"
    assert sent.segment_index == 0 and not sent.resume_token_ids
    # Marked with the node session's dispatch tag (not the session token itself).
    [metadata] = node.worker.metadata
    assert metadata[DISPATCH_METADATA] == dispatch_tag(node.session_token)
    assert node.session_token not in metadata.values()


async def test_client_request_id_and_default_max_tokens(client, make_node: NodeFactory) -> None:
    node = await make_node()
    request = inference_pb2.GenerateRequest(request_id="req-1.a_b", model=MODEL, prompt="Once")
    _, final = deltas_and_final(await collect(client, request))
    assert final.request_id == "req-1.a_b"
    assert node.worker.requests[0].prompt == "Once"
    assert node.worker.requests[0].sampling.max_tokens == 256


async def test_long_deltas_take_the_slow_path_intact(client, make_node: NodeFactory) -> None:
    node = await make_node()
    texts = ["x" * 300, "y", "z" * 127, "ü" * 70]
    node.worker.behaviour = Behaviour(deltas=texts)
    deltas, final = deltas_and_final(await collect(client, chat_request()))
    assert [d.text for d in deltas] == texts
    assert final.output_tokens == 4


async def test_list_models_aggregates_live_offers(client, make_node: NodeFactory) -> None:
    await make_node(region="us-east", price_output=300_000)
    await make_node(region="eu-west", models=(MODEL, "other-model"), price_output=150_000)
    listed = await client.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
    by_name = {m.model: m for m in listed.models}
    assert [m.model for m in listed.models] == sorted(by_name)
    assert by_name[MODEL].nodes == 2
    assert list(by_name[MODEL].regions) == ["eu-west", "us-east"]
    assert by_name[MODEL].min_price_output_micro_usd_per_mtok == 150_000
    assert by_name[MODEL].context_length == 2048
    assert by_name["other-model"].nodes == 1


def _bad(change):
    request = chat_request(max_tokens=4)
    change(request)
    return request


BAD_INPUTS = [
    ("max_tokens_zero", lambda r: setattr(r.sampling, "max_tokens", 0), "sampling.max_tokens"),
    ("max_tokens_negative", lambda r: setattr(r.sampling, "max_tokens", -3), "sampling.max_tokens"),
    ("max_tokens_huge", lambda r: setattr(r.sampling, "max_tokens", 10**9), "sampling.max_tokens"),
    ("temperature", lambda r: setattr(r.sampling, "temperature", -0.5), "sampling.temperature"),
    (
        "temperature_nan",
        lambda r: setattr(r.sampling, "temperature", float("nan")),
        "sampling.temperature",
    ),
    ("top_p_zero", lambda r: setattr(r.sampling, "top_p", 0.0), "sampling.top_p"),
    ("top_p_big", lambda r: setattr(r.sampling, "top_p", 1.5), "sampling.top_p"),
    ("no_messages", lambda r: r.chat.ClearField("messages"), "chat.messages"),
    (
        "empty_content",
        lambda r: setattr(r.chat.messages[0], "content", ""),
        "chat.messages[0].content",
    ),
    (
        "unknown_role",
        lambda r: setattr(r.chat.messages[0], "role", "robot"),
        "chat.messages[0].role",
    ),
    ("no_input", lambda r: r.ClearField("chat"), "input"),
    ("empty_prompt", lambda r: setattr(r, "prompt", ""), "prompt"),
    ("long_prompt", lambda r: setattr(r, "prompt", "w" * 70_000), "prompt"),
    ("long_chat", lambda r: setattr(r.chat.messages[0], "content", "w" * 70_000), "chat.messages"),
    ("request_id", lambda r: setattr(r, "request_id", "has space"), "request_id"),
    ("request_id_long", lambda r: setattr(r, "request_id", "a" * 129), "request_id"),
    ("no_model", lambda r: setattr(r, "model", ""), "model"),
    ("stop_too_many", lambda r: r.sampling.stop.extend(["a"] * 9), "sampling.stop"),
    ("bad_region", lambda r: r.routing.regions.append("EU West"), "routing.regions[0]"),
]


@pytest.mark.parametrize(("name", "change", "field"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
async def test_bad_input_is_invalid_argument_naming_the_field(
    client, make_node: NodeFactory, name, change, field
) -> None:
    node = await make_node()
    request = _bad(change)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(client, request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert (caught.value.details() or "").startswith(field), caught.value.details()
    assert not node.worker.requests  # nothing reached a node


async def test_unknown_model_is_not_found_listing_the_available(
    client, make_node: NodeFactory
) -> None:
    await make_node()
    request = chat_request()
    request.model = "no-such-model"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(client, request)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    details = caught.value.details() or ""
    assert "no-such-model" in details and f"available: {MODEL}" in details


async def test_lease_is_not_found(client, make_node: NodeFactory) -> None:
    await make_node()
    request = chat_request()
    request.lease_id = "lease-1"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(client, request)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert (caught.value.details() or "").startswith("lease_id")


async def test_known_model_without_live_node_is_unavailable(
    client, coordinator: Coordinator, make_node: NodeFactory
) -> None:
    node = await make_node()
    await node.stop_heartbeats()
    await wait_until(lambda: node.node_id not in coordinator.registry)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(client, chat_request())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert MODEL in (caught.value.details() or "")


async def test_routing_constraints_are_kept(client, make_node: NodeFactory) -> None:
    eu = await make_node(region="eu-west")
    us = await make_node(region="us-east")
    for _ in range(3):
        request = chat_request()
        request.routing.regions.append("us-east")
        _, final = deltas_and_final(await collect(client, request))
        assert final.node_id == us.node_id
    request = chat_request()
    request.routing.regions.append("ap-south")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(client, request)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not eu.worker.requests


async def test_client_cancel_reaches_the_worker(
    client, coordinator: Coordinator, make_node: NodeFactory
) -> None:
    node = await make_node()
    node.worker.behaviour = Behaviour(deltas=["a"] * 1000, delay_s=0.05)
    call = client.Generate(chat_request(max_tokens=1000), timeout=30)
    first = await call.read()
    assert first.WhichOneof("chunk") == "delta"
    assert coordinator.registry.snapshot().nodes[0].in_flight == 1
    call.cancel()
    async with asyncio.timeout(5):
        await node.worker.cancelled.wait()
    await wait_until(lambda: coordinator.registry.snapshot().nodes[0].in_flight == 0)


async def test_client_deadline_bounds_the_worker_call(client, make_node: NodeFactory) -> None:
    node = await make_node()
    node.worker.behaviour = Behaviour(hang=True)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(client, chat_request(), timeout_s=1.0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    [remaining] = node.worker.time_remaining_s
    # gRPC rounds the timeout it puts on the wire up a little; no deadline at all is None.
    assert remaining is not None and 0 < remaining <= 1.1
    async with asyncio.timeout(5):
        await node.worker.cancelled.wait()


async def test_node_whose_heartbeats_end_is_dropped_and_avoided(
    client, coordinator: Coordinator, make_node: NodeFactory
) -> None:
    gone = await make_node()
    stays = await make_node()
    await gone.stop_heartbeats()
    await wait_until(lambda: gone.node_id not in coordinator.registry)
    assert stays.node_id in coordinator.registry
    for _ in range(4):
        _, final = deltas_and_final(await collect(client, chat_request()))
        assert final.node_id == stays.node_id
    assert not gone.worker.requests
    listed = await client.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
    assert listed.models[0].nodes == 1


async def test_silent_node_is_reaped(coordinator: Coordinator, make_node: NodeFactory) -> None:
    node = await make_node()
    await wait_until(lambda: node.heartbeats_answered >= 2)
    node.go_silent()
    await wait_until(lambda: node.node_id not in coordinator.registry, timeout_s=5)


async def test_registered_node_that_never_beats_is_reaped(
    coordinator: Coordinator, make_node: NodeFactory
) -> None:
    node = await make_node(heartbeat=False)
    assert node.node_id in coordinator.registry
    await wait_until(lambda: node.node_id not in coordinator.registry, timeout_s=5)


async def two_nodes(make_node: NodeFactory, **kwargs: object):
    """(cheap, dear): routing's default (balanced) mode tries the cheap one first; the
    dear one costs 4x, far outside the near-best pool."""
    return (
        await make_node(price_output=100_000, **kwargs),
        await make_node(price_output=400_000, **kwargs),
    )


@pytest.mark.parametrize("failure", ["refuse", "stream_error", "hang", "dead"])
async def test_failover_before_the_first_token(
    client, make_node: NodeFactory, failure: str
) -> None:
    first, second = await two_nodes(make_node)
    if failure == "refuse":
        first.worker.behaviour = Behaviour(refuse=(grpc.StatusCode.UNAVAILABLE, "engine busy"))
    elif failure == "stream_error":
        first.worker.behaviour = Behaviour(
            stream_error=(common_pb2.ERROR_CODE_RESOURCE_EXHAUSTED, "queue full")
        )
    elif failure == "hang":
        first.worker.behaviour = Behaviour(hang=True)  # past first_token_timeout_s (2 s)
    else:
        assert first.server is not None
        await first.server.stop(None)  # worker gone, heartbeats still flowing
    _, final = deltas_and_final(await collect(client, chat_request()))
    assert final.node_id == second.node_id
    assert [s.node_id for s in final.segments] == [second.node_id]
    if failure != "dead":
        assert len(first.worker.requests) == 1
    if failure == "hang":
        async with asyncio.timeout(5):
            await first.worker.cancelled.wait()


async def test_node_blaming_the_request_is_not_retried(client, make_node: NodeFactory) -> None:
    """INVALID_ARGUMENT: a field every node of the model would refuse. (A prompt too long
    for one node's context is OUT_OF_RANGE and goes on: test_failover.py.)"""
    first, second = await two_nodes(make_node)
    first.worker.behaviour = Behaviour(
        refuse=(grpc.StatusCode.INVALID_ARGUMENT, "prompt: renders to zero tokens")
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(client, chat_request())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "zero tokens" in (caught.value.details() or "")
    assert not second.worker.requests


async def test_every_node_failing_is_unavailable(client, make_node: NodeFactory) -> None:
    nodes = [await make_node(), await make_node()]
    for node in nodes:
        node.worker.behaviour = Behaviour(refuse=(grpc.StatusCode.INTERNAL, "boom"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(client, chat_request())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    details = caught.value.details() or ""
    assert MODEL in details and "boom" in details
    assert all(len(node.worker.requests) == 1 for node in nodes)


async def test_every_node_full_is_resource_exhausted(client, make_node: NodeFactory) -> None:
    nodes = [await make_node(), await make_node()]
    for node in nodes:
        node.worker.behaviour = Behaviour(refuse=(grpc.StatusCode.RESOURCE_EXHAUSTED, "full"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(client, chat_request())
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_allow_fallbacks_false_tries_one_node(client, make_node: NodeFactory) -> None:
    first, second = await two_nodes(make_node)
    first.worker.behaviour = Behaviour(refuse=(grpc.StatusCode.UNAVAILABLE, "busy"))
    request = chat_request()
    request.routing.allow_fallbacks = False
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(client, request)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not second.worker.requests


async def test_register_rejects_a_bad_signature(coordinator: Coordinator) -> None:
    from .fakes import FakeNode

    node = FakeNode(coordinator.address)
    signed = node.signed_offer()
    signed.signature = bytes(64)
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        stub = node_pb2_grpc.NodeControlServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Register(node_pb2.RegisterRequest(offer=signed), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (caught.value.details() or "").startswith("signature")
        node.worker_address = "127.0.0.1:1"
        signed = node.signed_offer(region="Not A Region")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Register(node_pb2.RegisterRequest(offer=signed), timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (caught.value.details() or "").startswith("region")


async def test_register_answers_the_coordinator_terms(
    coordinator: Coordinator, make_node: NodeFactory
) -> None:
    node = await make_node(register=False, heartbeat=False)
    response = await node.register()
    assert response.node_id == node.identity.node_id
    assert len(response.session_token) >= 32
    assert response.heartbeat_interval_ms == 50
    assert response.liveness_timeout_ms == 400
    assert response.coordinator_public_key == coordinator.identity.public_key


async def test_heartbeat_with_a_wrong_session_is_unauthenticated(
    coordinator: Coordinator, make_node: NodeFactory
) -> None:
    node = await make_node(heartbeat=False)

    async def one() -> object:
        yield node_pb2.HeartbeatRequest(sequence=0)

    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        stub = node_pb2_grpc.NodeControlServiceStub(channel)
        for metadata in (
            (("x-mercato-node-id", node.node_id), ("x-mercato-session", "wrong")),
            (("x-mercato-node-id", "12D3KooWnobody"), ("x-mercato-session", node.session_token)),
            (),
        ):
            call = stub.Heartbeat(one(), metadata=metadata, timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in call:
                    pass
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_heartbeats_are_answered_with_their_sequence(
    coordinator: Coordinator, make_node: NodeFactory
) -> None:
    node = await make_node(heartbeat=False)

    async def beats():
        for sequence in range(3):
            yield node_pb2.HeartbeatRequest(
                sequence=sequence, load=node_pb2.NodeLoad(running_requests=2, waiting_requests=1)
            )

    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        stub = node_pb2_grpc.NodeControlServiceStub(channel)
        call = stub.Heartbeat(
            beats(),
            metadata=(
                ("x-mercato-node-id", node.node_id),
                ("x-mercato-session", node.session_token),
            ),
            timeout=5,
        )
        answers = [response async for response in call]
    # Every heartbeat is answered with its sequence (pings may come in between).
    assert [a.sequence for a in answers if not a.ping_id] == [0, 1, 2]
    # The stream ended: the node is gone.
    assert node.node_id not in coordinator.registry


async def test_reregistering_replaces_the_session(
    coordinator: Coordinator, make_node: NodeFactory
) -> None:
    node = await make_node()
    old_token = node.session_token
    await node.stop_heartbeats()
    await node.register()
    node.start_heartbeats()
    assert node.session_token != old_token
    await wait_until(lambda: node.heartbeats_answered >= 3)
    await asyncio.sleep(0.6)  # longer than the liveness timeout
    assert node.node_id in coordinator.registry


async def test_health_and_reflection(coordinator: Coordinator) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "mercato.v1.InferenceService", "mercato.v1.NodeControlService"):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask():
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names = set()
        async for response in stub.ServerReflectionInfo(ask(), timeout=5):
            names.update(s.name for s in response.list_services_response.service)
    assert {"mercato.v1.InferenceService", "mercato.v1.NodeControlService"} <= names


async def test_list_nodes_shows_offers_load_and_measurements(
    client, coordinator: Coordinator, make_node: NodeFactory
) -> None:
    a = await make_node(region="eu-west")
    b = await make_node(region="us-east", models=("other-model",))
    _, final = deltas_and_final(await collect(client, chat_request()))
    assert final.node_id == a.node_id
    a.worker.behaviour = Behaviour(refuse=(grpc.StatusCode.INTERNAL, "boom"))
    with pytest.raises(grpc.aio.AioRpcError):
        await collect(client, chat_request())
    listed = await client.ListNodes(inference_pb2.ListNodesRequest(), timeout=5)
    assert [n.node_id for n in listed.nodes] == sorted([a.node_id, b.node_id])
    info = {n.node_id: n for n in listed.nodes}[a.node_id]
    assert info.offer.region == "eu-west"
    assert info.offer.worker_address == a.worker_address
    assert info.offer.node_public_key == a.identity.public_key
    assert info.measurements.ttft_us > 0
    assert info.measurements.tpot_us > 0
    assert info.measurements.recent_failures == 1
    assert info.in_flight_requests == 0
    only = await client.ListNodes(inference_pb2.ListNodesRequest(model="other-model"), timeout=5)
    assert [n.node_id for n in only.nodes] == [b.node_id]


async def test_a_draining_node_gets_no_new_request(
    coordinator: Coordinator, client, make_node: NodeFactory
) -> None:
    """A heartbeat saying ``draining``: requests go to the other node, and none to it
    even though it is still registered and beating."""
    leaving = await make_node(price_output=1)  # the cheapest: the first choice so far
    staying = await make_node(price_output=100_000)
    leaving.draining = True
    await wait_until(lambda: len(coordinator.registry.snapshot().nodes) == 1)
    for _ in range(3):
        request = chat_request()
        request.routing.sort = inference_pb2.SORT_MODE_PRICE
        _, final = deltas_and_final(await collect(client, request))
        assert final.node_id == staying.node_id
    assert leaving.worker.requests == []
    assert leaving.node_id in coordinator.registry
