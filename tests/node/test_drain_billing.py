"""A provider stops a node mid-answer (SIGTERM): the client's answer still completes on
another node, and both providers are paid for what they produced. Real processes for the
nodes (``mercato node start --engine fake``: the fake engine keeps this a unit test), an
in-process coordinator with billing on SQLite."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc.aio
import pytest
from mercato.v1 import common_pb2, inference_pb2, inference_pb2_grpc, market_pb2

from coordinator.server import Coordinator
from marketplace.ledger import verify_ledger
from marketplace.ledger.models import AccountKind

from ..coordinator.conftest import fast_settings, wait_until
from .node_process import kill_if_running, start_fake_node

REPO = Path(__file__).resolve().parents[2]


def _node_env(price_output: int) -> dict[str, str]:
    return {
        "MERCATO_NODE_FAKE_ENGINE_TOKENS_PER_S": "20",
        "MERCATO_NODE_SHUTDOWN_GRACE_S": "0.3",
        "MERCATO_NODE_PRICE_OUTPUT_MICRO_USD_PER_MTOK": str(price_output),
    }


async def test_a_node_stopped_mid_answer_is_paid_and_the_answer_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MERCATO_DATABASE_URL", raising=False)
    coordinator = Coordinator(fast_settings(tmp_path / "c", billing_enabled=True))
    await coordinator.start()
    processes: list[asyncio.subprocess.Process] = []
    try:
        assert coordinator.billing is not None
        ledger = coordinator.billing.ledger
        stopping, first = await start_fake_node(
            tmp_path / "a", coordinator.address, _node_env(300_000)
        )
        processes.append(stopping)
        staying, second = await start_fake_node(
            tmp_path / "b", coordinator.address, _node_env(500_000)
        )
        processes.append(staying)
        await wait_until(lambda: len(coordinator.registry.snapshot().nodes) == 2, 30)
        account = ledger.store.create_account(AccountKind.CLIENT, "gina")
        ledger.store.deposit(account.id, 10_000_000, "fund-gina")
        key = ledger.store.issue_key(account.id, "k").secret_key
        request = inference_pb2.GenerateRequest(
            request_id="stopped-mid-answer",
            model=str(first["model"]),
            prompt="Count.",
            sampling=common_pb2.SamplingParams(max_tokens=40),
        )
        request.routing.sort = inference_pb2.SORT_MODE_PRICE  # the cheaper node first
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            call = inference_pb2_grpc.InferenceServiceStub(channel).Generate(
                request, metadata=(("authorization", f"Bearer {key}"),), timeout=60
            )
            responses = [await call.read() for _ in range(4)]
            assert all(r.HasField("delta") for r in responses)
            stopping.send_signal(signal.SIGTERM)
            while (response := await call.read()) is not grpc.aio.EOF:
                responses.append(response)
        final = responses[-1].final
        tokens = sum(len(r.delta.token_ids) for r in responses if r.HasField("delta"))
        assert tokens == final.output_tokens == 40  # complete: resumed on the other node
        assert not any(r.HasField("error") for r in responses)
        async with asyncio.timeout(30):
            assert await stopping.wait() == 0
        # Both nodes' receipts back the charge: the stopped node's is its late receipt.
        usages = [market_pb2.UsageReceipt.FromString(r.receipt) for r in final.receipts]
        assert {u.node_id for u in usages} == {first["node_id"], second["node_id"]}
        assert final.cost_micro_usd > 0
        await ledger.flush()
        earned = {
            node: ledger.store.account(str(node)).posted_micro_usd
            for node in (first["node_id"], second["node_id"])
        }
        assert all(amount > 0 for amount in earned.values()), earned
        assert ledger.store.rejections("stopped-mid-answer") == []
        assert verify_ledger(ledger.store.engine).ok
    finally:
        for process in processes:
            await kill_if_running(process)
        await coordinator.stop(grace_s=0)
