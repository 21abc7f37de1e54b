"""A node killed with SIGKILL is dropped; requests then go elsewhere or get UNAVAILABLE.
A node stopped with SIGTERM mid-answer drains: the answer completes on another node and
the stopped node is paid for what it produced.

Each test uses its own coordinator and two nodes so that stopping them disturbs no other
test.
"""

from __future__ import annotations

import signal
import time

import grpc
import pytest
from mercato.v1 import common_pb2, inference_pb2, inference_pb2_grpc, market_pb2

from marketplace.ledger import LedgerSettings, LedgerStore, verify_ledger

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


def test_sigterm_mid_answer_completes_elsewhere_and_pays_both_nodes(cluster: Cluster) -> None:
    """The real engine on both nodes. The cheaper node serves; SIGTERM reaches it after
    its first deltas. It drains (0.5 s grace), its generation is cut off and its late
    receipt goes out on its heartbeat stream; the coordinator resumes on the other node.
    The client gets every token asked for, with no error; the final's receipts come from
    both nodes; both providers are credited; the journal verifies."""
    coordinator = cluster.start_coordinator("coordinator-drain")
    address = str(coordinator.ready["address"])
    grace = {"MERCATO_NODE_SHUTDOWN_GRACE_S": "0.5"}
    stopping = cluster.start_node(
        "drain-a", address, "--price-output", "100000", "--kv-cache-space-gib", "1", env=grace
    )
    staying = cluster.start_node(
        "drain-b", address, "--price-output", "300000", "--kv-cache-space-gib", "1", env=grace
    )
    wait_for_nodes(address, MODEL, 2)
    request = inference_pb2.GenerateRequest(
        request_id="drained-mid-answer",
        model=MODEL,
        # A raw number list: greedy decoding continues it up to max_tokens.
        prompt=", ".join(str(i) for i in range(1, 30)) + ",",
        sampling=common_pb2.SamplingParams(max_tokens=160, temperature=0.0),
    )
    request.routing.sort = inference_pb2.SORT_MODE_PRICE
    responses = []
    with authorized_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for response in stub.Generate(request, timeout=300):
            responses.append(response)
            if len(responses) == 5:
                stopping.process.send_signal(signal.SIGTERM)
    assert not any(r.HasField("error") for r in responses)
    final = responses[-1].final
    tokens = sum(len(r.delta.token_ids) for r in responses if r.HasField("delta"))
    assert tokens == final.output_tokens == 160
    assert [s.node_id for s in final.segments] == [
        stopping.ready["node_id"],
        staying.ready["node_id"],
    ]
    assert stopping.process.wait(timeout=60) == 0
    usages = [market_pb2.UsageReceipt.FromString(r.receipt) for r in final.receipts]
    assert {u.node_id for u in usages} == {stopping.ready["node_id"], staying.ready["node_id"]}
    home = cluster.root / "coordinator-drain"
    store = LedgerStore.open(LedgerSettings(database_url=f"sqlite:///{home / 'mercato.db'}"))
    try:
        deadline = time.monotonic() + 30  # the settlement is committed in the next batch
        while store.settlement("drained-mid-answer") is None:
            assert time.monotonic() < deadline, "the request was never settled"
            time.sleep(0.1)
        for node in (stopping, staying):
            assert store.account(str(node.ready["node_id"])).posted_micro_usd > 0
        assert store.rejections("drained-mid-answer") == []
        assert verify_ledger(store.engine).ok
    finally:
        store.close()
    staying.stop()  # frees its engine for the tests after this one
