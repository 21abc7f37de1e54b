"""What a node claims is checked, not taken: whose worker an offer names, how many late
receipts a heartbeat carries, the round trip its pongs show, leases of a node leaving."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from mercato.v1 import (
    account_pb2,
    account_pb2_grpc,
    common_pb2,
    inference_pb2,
    node_pb2,
    node_pb2_grpc,
)

from coordinator.control import NodeControlServicer
from coordinator.server import Coordinator
from marketplace.control import LATE_RECEIPTS_PER_HEARTBEAT, NODE_ID_METADATA
from marketplace.identity import Identity
from node.engine.fake_engine import FakeEngine
from node.worker import NodeWorker
from node.worker_server import start_worker_server

from .conftest import (
    NodeFactory,
    billed_coordinator_and_node,
    collect,
    fast_settings,
    funded_client_key,
    wait_until,
)
from .fakes import FakeNode

ENGINE_MODEL = "fake-model"


class RealWorker:
    """A real node's worker (NodeWorker over the FakeEngine) that counts generations."""

    def __init__(self) -> None:
        self.identity = Identity.generate()
        self.generations = 0
        self.address = ""
        self._server: grpc.aio.Server | None = None

    async def start(self) -> RealWorker:
        engine = FakeEngine(ENGINE_MODEL, tokens_per_s=2000.0, context_length=256)
        await engine.start(timeout_s=5)
        generate = engine.generate

        def counted(request: Any) -> Any:
            self.generations += 1
            return generate(request)

        engine.generate = counted  # type: ignore[method-assign]
        worker = NodeWorker(
            engine,
            self.identity,
            price_input_micro_usd_per_mtok=10,
            price_output_micro_usd_per_mtok=10,
            max_concurrency=8,
        )
        self._server, port, _ = await start_worker_server(worker, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)


@pytest.fixture
async def victim() -> AsyncIterator[RealWorker]:
    worker = await RealWorker().start()
    yield worker
    await worker.stop()


async def listed_at(
    make_node: NodeFactory, address: str, identity: Identity | None = None, **kwargs: object
) -> FakeNode:
    """A node (``identity``, or a new one) whose offer names the worker at ``address``."""
    node = await make_node(register=False, heartbeat=False, models=(ENGINE_MODEL,), **kwargs)
    if identity is not None:
        node.identity = identity
    node.worker_address = address
    await node.register()
    node.start_heartbeats()
    return node


def chat(**routing: Any) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=ENGINE_MODEL,
        chat=common_pb2.ChatInput(messages=[common_pb2.ChatMessage(role="user", content="Hi")]),
        sampling=common_pb2.SamplingParams(max_tokens=4),
        routing=inference_pb2.RoutingPreferences(**routing),
    )


# ---------------------------------------------------------------- whose worker


async def test_an_offer_naming_another_nodes_worker_gets_nothing_served(
    coordinator: Coordinator, client: Any, make_node: NodeFactory, victim: RealWorker
) -> None:
    """Node A lists node B's worker address at price 0: B's worker refuses the stream
    the coordinator opens for A (it names A), the relay counts that against A, and B's
    GPU does no unpaid work. B, listed at its own address, serves as usual."""
    attacker = await listed_at(make_node, victim.address, price_input=0, price_output=0)
    worker_link = coordinator.registry.worker(attacker.node_id)
    assert worker_link is not None
    assert dict(worker_link.metadata)[NODE_ID_METADATA] == attacker.node_id

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await collect(client, chat())
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    details = refused.value.details() or ""
    assert "PERMISSION_DENIED" in details and victim.identity.node_id in details
    assert victim.generations == 0
    view = coordinator.registry.snapshot().get(attacker.node_id)
    assert view is not None and view.reliability < 1.0  # a failure, on A

    honest = await listed_at(make_node, victim.address, identity=victim.identity)
    assert honest.node_id == victim.identity.node_id
    responses = await collect(client, chat(ignore_nodes=[attacker.node_id]))
    final = responses[-1].final
    assert final.node_id == victim.identity.node_id and final.output_tokens == 4
    assert victim.generations == 1


# ---------------------------------------------------------------- late receipts


async def _heartbeat_once(
    coordinator: Coordinator, node: FakeNode, heartbeat: node_pb2.HeartbeatRequest
) -> grpc.aio.AioRpcError | None:
    """Send ``heartbeat`` on a fresh stream, read its answer; the error, if refused."""
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        call = node_pb2_grpc.NodeControlServiceStub(channel).Heartbeat(
            metadata=(
                ("x-mercato-node-id", node.node_id),
                ("x-mercato-session", node.session_token),
            ),
            timeout=5,
        )
        await call.write(heartbeat)
        try:
            while True:
                answer = await call.read()
                if answer is grpc.aio.EOF or not answer.ping_id:
                    return None
        except grpc.aio.AioRpcError as exc:
            return exc
        finally:
            call.cancel()


async def test_a_heartbeat_with_more_late_receipts_than_a_node_sends_is_refused(
    coordinator: Coordinator, make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[int] = []
    monkeypatch.setattr(
        NodeControlServicer,
        "_take_late_receipts",
        lambda self, node_id, heartbeat: taken.append(len(heartbeat.late_receipts)),
    )
    node = await make_node(heartbeat=False)
    receipt = node.signed_usage(node_pb2.WorkerGenerateRequest(request_id="r", model="m"), 1)

    at_limit = node_pb2.HeartbeatRequest(late_receipts=[receipt] * LATE_RECEIPTS_PER_HEARTBEAT)
    assert await _heartbeat_once(coordinator, node, at_limit) is None
    assert taken == [LATE_RECEIPTS_PER_HEARTBEAT]

    await node.register()  # the stream's end dropped it
    over = node_pb2.HeartbeatRequest(late_receipts=[receipt] * (LATE_RECEIPTS_PER_HEARTBEAT + 1))
    refused = await _heartbeat_once(coordinator, node, over)
    assert refused is not None and refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"more than {LATE_RECEIPTS_PER_HEARTBEAT}" in (refused.details() or "")
    assert taken == [LATE_RECEIPTS_PER_HEARTBEAT]  # none of them was looked at
    assert node.node_id not in coordinator.registry


# ---------------------------------------------------------------- pings


async def test_pongs_for_pings_not_received_give_no_round_trip(tmp_path: Path) -> None:
    """A node that answers pings without reading them (guessing their ids, some not even
    sent yet) measures nothing: only the pong of a ping it was sent is timed. With ids
    counting 1, 2, 3, ... such a node could answer the next ping the moment it left the
    coordinator and show a round trip near 0 ms."""
    coordinator = Coordinator(
        fast_settings(tmp_path, ping_interval_ms=50, liveness_timeout_ms=5000)
    )
    await coordinator.start()
    node = FakeNode(coordinator.address)
    try:
        await node.start(heartbeat=False)
        guessed = asyncio.Event()

        async def beats() -> AsyncIterator[node_pb2.HeartbeatRequest]:
            yield node_pb2.HeartbeatRequest(sequence=0, load=node_pb2.NodeLoad())
            await asyncio.sleep(0.3)  # several pings go out meanwhile, none read
            for guess in range(1, 41):
                yield node_pb2.HeartbeatRequest(sequence=guess, pong_id=guess)
            guessed.set()
            await asyncio.sleep(3600)

        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            call = node_pb2_grpc.NodeControlServiceStub(channel).Heartbeat(
                beats(),
                metadata=(
                    ("x-mercato-node-id", node.node_id),
                    ("x-mercato-session", node.session_token),
                ),
            )
            try:
                async with asyncio.timeout(5):
                    await guessed.wait()
                await asyncio.sleep(0.2)  # the guesses arrive; more pings go out
                view = coordinator.registry.snapshot().get(node.node_id)
                assert view is not None and view.rtt_s is None
                pings: list[int] = []
                async with asyncio.timeout(5):
                    while len(pings) < 5:
                        answer = await call.read()
                        if answer.ping_id:
                            pings.append(answer.ping_id)
                assert len(set(pings)) == 5 and not set(pings) & set(range(1, 41))
            finally:
                call.cancel()
    finally:
        await node.stop()
        await coordinator.stop(grace_s=0)


# ---------------------------------------------------------------- leases


async def test_a_draining_node_cannot_be_leased(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with billed_coordinator_and_node(tmp_path, monkeypatch) as (coordinator, node):
        assert coordinator.billing is not None
        issued = funded_client_key(coordinator.billing.ledger.store, "erin")
        node.draining = True
        await wait_until(lambda: node.node_id not in coordinator.registry.market)
        assert node.node_id in coordinator.registry  # still registered: its requests run on
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await account_pb2_grpc.AccountServiceStub(channel).CreateLease(
                    account_pb2.CreateLeaseRequest(node_id=node.node_id, hours=1),
                    metadata=(("authorization", f"Bearer {issued.secret_key}"),),
                    timeout=5,
                )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = refused.value.details() or ""
        assert f"node {node.node_id} is draining" in details and "ListNodes" in details
        assert await coordinator.billing.ledger.active_leases() == []


async def test_a_lease_made_as_its_node_began_draining_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lease whose node was already draining when the lease refresh first looked (it
    began to leave between the price lookup and the lease) ends like that of a node seen
    live and then gone, with its refund."""
    async with billed_coordinator_and_node(tmp_path, monkeypatch, lease_node_grace_s=0) as (
        coordinator,
        node,
    ):
        billing = coordinator.billing
        assert billing is not None
        issued = funded_client_key(billing.ledger.store, "fay")
        node.draining = True
        await wait_until(lambda: node.node_id not in coordinator.registry.market)
        lease = await billing.ledger.create_lease(
            issued.key.account_id,
            node.node_id,
            gpus=1,
            price_micro_usd_per_gpu_hour=1_000_000,
            hours=1,
        )
        await billing.refresh_leases()
        await billing.refresh_leases()
        ended = await billing.ledger.lease(lease.lease_id)
        assert ended is not None and ended.status == "failed"
        assert not billing.is_leased(node.node_id)
