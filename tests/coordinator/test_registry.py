"""The live registry: admission, sessions, heartbeats, liveness, snapshots."""

from __future__ import annotations

from pathlib import Path

import grpc.aio
import pytest
from mercato.v1 import node_pb2

from coordinator.errors import CapacityExhausted, HeartbeatInvalid, OfferInvalid, SessionInvalid
from coordinator.registry import NodeRegistry
from coordinator.routing import BreakerState, DispatchOutcome
from marketplace.control import NODE_ID_METADATA
from marketplace.dispatch import DISPATCH_METADATA, dispatch_tag
from marketplace.identity import Identity

from .conftest import fast_settings
from .fakes import make_offer, sign_offer


@pytest.fixture
async def registry(tmp_path: Path):
    registry = NodeRegistry(fast_settings(tmp_path, max_nodes=3))
    yield registry
    await registry.close()


def signed(identity: Identity, sequence: int = 1, **kwargs):
    return sign_offer(identity, make_offer(identity, sequence=sequence, **kwargs))


def _channel(registry: NodeRegistry, node_id: str) -> grpc.aio.Channel | None:
    worker = registry.worker(node_id)
    return None if worker is None else worker.channel


async def test_register_puts_the_node_in_the_snapshot(registry: NodeRegistry) -> None:
    identity = Identity.generate()
    before = registry.snapshot()
    registration = registry.register(signed(identity))
    assert registration.node_id == identity.node_id
    assert len(registration.session_token) >= 32
    snapshot = registry.snapshot()
    assert snapshot.version > before.version
    assert [n.node_id for n in snapshot.nodes] == [identity.node_id]
    assert len(snapshot.index_for("tiny-model")) == 1
    assert len(snapshot.index_for("tiny-model", "eu-west")) == 1
    assert registry.snapshot().version == snapshot.version  # unchanged
    worker = registry.worker(identity.node_id)
    assert worker is not None and worker.channel is not None
    # Worker calls carry the session's dispatch tag, not the session token, and the node
    # id the worker checks is its own.
    tag = dispatch_tag(registration.session_token)
    assert worker.metadata == ((DISPATCH_METADATA, tag), (NODE_ID_METADATA, identity.node_id))
    assert registration.session_token not in tag
    offer = registry.offer(identity.node_id)
    assert offer is not None and offer.node_public_key == identity.public_key


async def test_sequence_must_increase(registry: NodeRegistry) -> None:
    identity = Identity.generate()
    registry.register(signed(identity, sequence=5))
    for stale in (5, 4):
        with pytest.raises(OfferInvalid, match=r"^sequence"):
            registry.register(signed(identity, sequence=stale))
    registry.register(signed(identity, sequence=6))


async def test_sequence_is_remembered_after_a_drop(registry: NodeRegistry) -> None:
    identity = Identity.generate()
    registry.register(signed(identity, sequence=5))
    registry.drop(identity.node_id, "test")
    with pytest.raises(OfferInvalid, match=r"^sequence"):
        registry.register(signed(identity, sequence=5))  # a replayed offer


async def test_reregistering_replaces_the_session(registry: NodeRegistry) -> None:
    identity = Identity.generate()
    old = registry.register(signed(identity, sequence=1))
    new = registry.register(signed(identity, sequence=2))
    assert old.session_token != new.session_token
    with pytest.raises(SessionInvalid):
        registry.authenticate(identity.node_id, old.session_token)
    registry.authenticate(identity.node_id, new.session_token)
    # The old session's stream ending does not drop the new registration.
    registry.end_session(identity.node_id, old.session_token, "old stream ended")
    assert identity.node_id in registry
    registry.end_session(identity.node_id, new.session_token, "stream ended")
    assert identity.node_id not in registry


async def test_same_worker_address_keeps_the_channel(registry: NodeRegistry) -> None:
    identity = Identity.generate()
    registry.register(signed(identity, sequence=1))
    channel = _channel(registry, identity.node_id)
    registry.register(signed(identity, sequence=2))
    assert _channel(registry, identity.node_id) is channel
    registry.register(signed(identity, sequence=3, worker_address="127.0.0.1:7801"))
    assert _channel(registry, identity.node_id) is not channel


async def test_heartbeat_updates_load_and_liveness(registry: NodeRegistry) -> None:
    identity = Identity.generate()
    token = registry.register(signed(identity)).session_token
    registry.record_heartbeat(
        identity.node_id, token, node_pb2.NodeLoad(running_requests=3, waiting_requests=2)
    )
    [node] = registry.snapshot().nodes
    assert node.load.running_requests == 3 and node.occupancy == 5
    assert node.load.coordinator_requests is None  # a node that does not count them
    registry.record_heartbeat(
        identity.node_id,
        token,
        node_pb2.NodeLoad(running_requests=3, waiting_requests=2, coordinator_requests=4),
    )
    [node] = registry.snapshot().nodes
    assert node.load.coordinator_requests == 4 and node.occupancy == 1  # 1 not ours
    with pytest.raises(SessionInvalid):
        registry.record_heartbeat(identity.node_id, "x" * 43, node_pb2.NodeLoad())
    with pytest.raises(HeartbeatInvalid, match="kv_cache_usage_permille"):
        registry.record_heartbeat(
            identity.node_id, token, node_pb2.NodeLoad(kv_cache_usage_permille=1001)
        )


async def test_silent_nodes_are_reaped(tmp_path: Path) -> None:
    clock = [1000.0]
    registry = NodeRegistry(fast_settings(tmp_path), monotonic_s=lambda: clock[0])
    quiet, chatty = Identity.generate(), Identity.generate()
    registry.register(signed(quiet))
    token = registry.register(signed(chatty)).session_token
    clock[0] += 0.3
    assert registry.reap() == []  # within liveness_timeout_ms = 400
    registry.record_heartbeat(chatty.node_id, token, node_pb2.NodeLoad())
    clock[0] += 0.101
    assert registry.reap() == [quiet.node_id]
    assert quiet.node_id not in registry
    assert chatty.node_id in registry
    snapshot = registry.snapshot()
    assert [n.node_id for n in snapshot.nodes] == [chatty.node_id]
    assert registry.is_known_model("tiny-model")
    clock[0] += 0.4
    assert registry.reap() == [chatty.node_id]
    assert registry.snapshot().nodes == ()
    await registry.close()


async def test_dropped_model_stays_known(registry: NodeRegistry) -> None:
    identity = Identity.generate()
    registry.register(signed(identity, models=("gone-model",)))
    registry.drop(identity.node_id, "test")
    snapshot = registry.snapshot()
    assert len(snapshot.index_for("gone-model")) == 0
    assert "gone-model" in registry.known_models
    assert _channel(registry, identity.node_id) is None
    assert identity.node_id not in registry.market


async def test_capacity_limit(registry: NodeRegistry) -> None:
    identities = [Identity.generate() for _ in range(3)]
    for identity in identities:
        registry.register(signed(identity))
    with pytest.raises(CapacityExhausted):
        registry.register(signed(Identity.generate()))
    registry.register(signed(identities[0], sequence=2))  # a known node may re-register


async def test_reregistering_keeps_in_flight_and_measurements(registry: NodeRegistry) -> None:
    identity = Identity.generate()
    token = registry.register(signed(identity, sequence=1)).session_token
    registry.market.dispatch_started(identity.node_id)
    registry.record_pong(identity.node_id, token, 0.004)
    registry.register(signed(identity, sequence=2))
    [node] = registry.snapshot().nodes
    assert node.in_flight == 1
    assert node.rtt_s == pytest.approx(0.004)


async def test_pong_records_the_round_trip_and_liveness(tmp_path: Path) -> None:
    clock = [1000.0]
    registry = NodeRegistry(fast_settings(tmp_path), monotonic_s=lambda: clock[0])
    identity = Identity.generate()
    token = registry.register(signed(identity)).session_token
    clock[0] += 0.3
    registry.record_pong(identity.node_id, token, None)  # an unknown ping: life only
    assert registry.snapshot().get(identity.node_id).rtt_s is None
    clock[0] += 0.3
    assert registry.reap() == []  # the pong kept it alive
    registry.record_pong(identity.node_id, token, 0.002)
    registry.record_pong(identity.node_id, token, 0.004)
    assert registry.snapshot().get(identity.node_id).rtt_s == pytest.approx(0.003)
    with pytest.raises(SessionInvalid):
        registry.record_pong(identity.node_id, "x" * 43, 0.001)
    await registry.close()


async def test_snapshot_is_immutable(registry: NodeRegistry) -> None:
    identity = Identity.generate()
    registry.register(signed(identity))
    snapshot = registry.snapshot()
    registry.market.dispatch_started(identity.node_id)
    assert snapshot.nodes[0].in_flight == 0  # the old snapshot did not change
    assert registry.snapshot().nodes[0].in_flight == 1
    with pytest.raises(AttributeError):
        snapshot.nodes[0].in_flight = 5  # type: ignore[misc]


async def test_session_token_never_in_repr_or_logs(
    registry: NodeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    identity = Identity.generate()
    token = registry.register(signed(identity)).session_token
    with pytest.raises(SessionInvalid) as caught:
        registry.authenticate(identity.node_id, token + "x")
    registry.drop(identity.node_id, "test")
    assert token not in caplog.text
    assert token not in str(caught.value)
    assert token not in repr(registry.__dict__)


async def test_a_node_that_comes_back_keeps_its_measurements_and_breaker(
    registry: NodeRegistry,
) -> None:
    identity = Identity.generate()
    token = registry.register(signed(identity, sequence=1)).session_token
    registry.record_pong(identity.node_id, token, 0.004)
    market = registry.market
    for _ in range(3):  # the default breaker threshold
        market.dispatch_started(identity.node_id)
        market.dispatch_finished(identity.node_id, DispatchOutcome.FAILURE)
    assert market.breaker_state(identity.node_id) is BreakerState.OPEN
    registry.drop(identity.node_id, "blip")
    registry.register(signed(identity, sequence=2))
    [node] = registry.snapshot().nodes
    assert node.rtt_s == pytest.approx(0.004)
    assert market.breaker_state(identity.node_id) is BreakerState.OPEN  # not shed


async def test_a_draining_node_leaves_routing_but_stays_registered(
    registry: NodeRegistry,
) -> None:
    staying, leaving = Identity.generate(), Identity.generate()
    registry.register(signed(staying))
    token = registry.register(signed(leaving)).session_token
    with pytest.raises(SessionInvalid):
        registry.withdraw(leaving.node_id, "x" * 43)
    registry.withdraw(leaving.node_id, token)
    assert [n.node_id for n in registry.snapshot().nodes] == [staying.node_id]
    assert len(registry.snapshot().index_for("tiny-model")) == 1
    # Still known: its open requests run on, its late receipts are taken, it beats on.
    assert leaving.node_id in registry and registry.worker(leaving.node_id) is not None
    registry.record_heartbeat(leaving.node_id, token, node_pb2.NodeLoad(running_requests=1))
    registry.withdraw(leaving.node_id, token)  # every later heartbeat says it again
    assert [n.node_id for n in registry.snapshot().nodes] == [staying.node_id]
