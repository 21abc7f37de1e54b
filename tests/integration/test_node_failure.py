"""A node killed with SIGKILL is dropped; requests then go elsewhere or get UNAVAILABLE.

Uses its own coordinator and two nodes so that killing them disturbs no other test.
"""

from __future__ import annotations

import time

import grpc
import pytest
from mercato.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from .conftest import MODEL, Cluster, authorized_channel, wait_for_nodes

pytestmark = pytest.mark.integration


def _generate(stub, max_tokens: int = 8):
    request = inference_pb2.GenerateRequest(
        model=MODEL,
        prompt="The capital of France is",
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )
    final = None
    for response in stub.Generate(request, timeout=60):
        if response.HasField("final"):
            final = response.final
    assert final is not None
    return final


def test_killed_node_is_dropped_and_avoided(cluster: Cluster) -> None:
    coordinator = cluster.start_coordinator("coordinator-failure")
    address = coordinator.ready["address"]
    survivor = cluster.start_node("node-b", address, "--region", "eu-west")
    victim = cluster.start_node("node-c", address, "--region", "us-east")
    wait_for_nodes(address, MODEL, 2)

    with authorized_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        served = {_generate(stub).node_id for _ in range(6)}
        assert served <= {survivor.ready["node_id"], victim.ready["node_id"]}

        victim.kill()  # SIGKILL: no goodbye, the heartbeat stream just breaks
        killed_at = time.monotonic()
        wait_for_nodes(address, MODEL, 1, timeout_s=30)
        print(f"node dropped {time.monotonic() - killed_at:.2f} s after SIGKILL")
        listed = stub.ListNodes(inference_pb2.ListNodesRequest(), timeout=5)
        assert [n.node_id for n in listed.nodes] == [survivor.ready["node_id"]]
        for _ in range(6):
            assert _generate(stub).node_id == survivor.ready["node_id"]

        survivor.kill()
        wait_for_nodes(address, MODEL, 0, timeout_s=30)
        with pytest.raises(grpc.RpcError) as caught:
            _generate(stub)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert MODEL in caught.value.details()
