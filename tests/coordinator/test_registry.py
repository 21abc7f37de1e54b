"""The live registry: admission, sessions, heartbeats, liveness, snapshots."""

from __future__ import annotations

from pathlib import Path

import pytest
from mercato.v1 import node_pb2

from coordinator.errors import CapacityExhausted, HeartbeatInvalid, OfferInvalid, SessionInvalid
from coordinator.registry import NodeRegistry
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


async def test_register_puts_the_node_in_the_snapshot(registry: NodeRegistry) -> None:
    identity = Identity.generate()
    before = registry.snapshot()
    registration = registry.register(signed(identity))
    assert registration.node_id == identity.node_id
    assert len(registration.session_token) >= 32
    snapshot = registry.snapshot()
    assert snapshot is not before and snapshot.version > before.version
    assert [n.node_id for n in snapshot.nodes] == [identity.node_id]
    assert [n.node_id for n in snapshot.serving("tiny-model")] == [identity.node_id]
    assert registry.snapshot() is snapshot  # unchanged: the same object
    assert registry.channel(identity.node_id) is not None


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
    channel = registry.channel(identity.node_id)
    registry.register(signed(identity, sequence=2))
    assert registry.channel(identity.node_id) is channel
    registry.register(signed(identity, sequence=3, worker_address="127.0.0.1:7801"))
    assert registry.channel(identity.node_id) is not channel


async def test_heartbeat_updates_load_and_liveness(registry: NodeRegistry) -> None:
    identity = Identity.generate()
    token = registry.register(signed(identity)).session_token
    registry.record_heartbeat(
        identity.node_id, token, node_pb2.NodeLoad(running_requests=3, waiting_requests=2)
    )
    [node] = registry.snapshot().nodes
    assert node.load.running_requests == 3 and node.queued_requests == 5
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
    assert "tiny-model" in snapshot.known_models
    clock[0] += 0.4
    assert registry.reap() == [chatty.node_id]
    assert registry.snapshot().nodes == ()
    await registry.close()


async def test_dropped_model_stays_known(registry: NodeRegistry) -> None:
    identity = Identity.generate()
    registry.register(signed(identity, models=("gone-model",)))
    registry.drop(identity.node_id, "test")
    snapshot = registry.snapshot()
    assert snapshot.serving("gone-model") == ()
    assert "gone-model" in snapshot.known_models
    assert registry.channel(identity.node_id) is None


async def test_capacity_limit(registry: NodeRegistry) -> None:
    identities = [Identity.generate() for _ in range(3)]
    for identity in identities:
        registry.register(signed(identity))
    with pytest.raises(CapacityExhausted):
        registry.register(signed(Identity.generate()))
    registry.register(signed(identities[0], sequence=2))  # a known node may re-register


async def test_in_flight_counts(registry: NodeRegistry) -> None:
    identity = Identity.generate()
    registry.register(signed(identity))
    registry.begin_request(identity.node_id)
    registry.begin_request(identity.node_id)
    assert registry.snapshot().nodes[0].in_flight == 2
    registry.end_request(identity.node_id)
    registry.end_request(identity.node_id)
    registry.end_request(identity.node_id)  # never below zero
    assert registry.snapshot().nodes[0].in_flight == 0
    registry.begin_request("unknown")  # a dropped node: ignored


async def test_snapshot_is_immutable(registry: NodeRegistry) -> None:
    identity = Identity.generate()
    registry.register(signed(identity))
    snapshot = registry.snapshot()
    with pytest.raises(TypeError):
        snapshot.by_model["x"] = ()  # type: ignore[index]
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
