"""The real node agent against the real coordinator: pings answered, RTT measured, and a
re-registration accepted (its offer's sequence is strictly higher)."""

from __future__ import annotations

from pathlib import Path

from mercato.v1 import market_pb2, node_pb2

from coordinator.server import Coordinator
from marketplace.identity import Identity
from node.agent import NodeAgent
from node.hardware import HardwareInfo
from node.offer import build_offer, sign_offer
from node.settings import NodeSettings

from .conftest import fast_settings, wait_until


async def test_agent_answers_pings_and_reregisters(tmp_path: Path) -> None:
    coordinator = Coordinator(fast_settings(tmp_path / "c", ping_interval_ms=50))
    await coordinator.start()
    identity = Identity.generate()
    settings = NodeSettings(home=tmp_path / "n", region="eu-west")
    hardware = HardwareInfo(cpu_cores=2, memory_bytes=2**30, cpu_model="x")
    sequences: list[int] = []

    def signed(sequence: int) -> market_pb2.SignedOffer:
        sequences.append(sequence)
        return sign_offer(
            identity,
            build_offer(
                settings,
                public_key=identity.public_key,
                worker_address="127.0.0.1:9",
                hardware=hardware,
                context_length=2048,
                sequence=sequence,
            ),
        )

    agent = NodeAgent(
        coordinator.address,
        signed,
        lambda: node_pb2.NodeLoad(running_requests=1),
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
    )
    agent.start()
    registry = coordinator.registry
    node_id = identity.node_id
    try:
        await wait_until(lambda: node_id in registry)
        await wait_until(
            lambda: (v := registry.snapshot().get(node_id)) is not None and bool(v.rtt_s)
        )
        view = registry.snapshot().get(node_id)
        assert view is not None and 0 < view.rtt_s < 5.0
        assert view.load.running_requests == 1  # pongs did not replace the load
        assert agent.heartbeat_round_trip_s is not None  # answers still reach the agent

        # Dropped by the coordinator: the agent registers again with a higher sequence.
        registry.drop(node_id, "test")
        await wait_until(lambda: node_id in registry and agent.registrations >= 2)
        assert len(sequences) >= 2 and sequences == sorted(set(sequences))
    finally:
        await agent.stop()
        await coordinator.stop(grace_s=0)
