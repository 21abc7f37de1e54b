"""In-process fixtures: a worker gRPC server over the FakeEngine, and a client stub."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc.aio
import pytest
from mercato.v1 import common_pb2, market_pb2, node_pb2, node_pb2_grpc

from marketplace.identity import Identity
from node.engine.fake_engine import FakeEngine
from node.worker import NodeWorker
from node.worker_server import start_worker_server

MODEL = "fake-model"
PRICE_INPUT = 50_000
PRICE_OUTPUT = 150_000


@dataclass
class WorkerHarness:
    engine: FakeEngine
    identity: Identity
    worker: NodeWorker
    stub: node_pb2_grpc.NodeWorkerServiceStub
    channel: grpc.aio.Channel
    address: str
    # Receipts of calls cut off before their final, as the worker handed them over.
    late_receipts: list[market_pb2.SignedReceipt] = field(default_factory=list)


async def start_harness(
    *, tokens_per_s: float = 2000.0, max_concurrency: int = 8, context_length: int = 256
) -> tuple[WorkerHarness, grpc.aio.Server]:
    engine = FakeEngine(MODEL, tokens_per_s=tokens_per_s, context_length=context_length)
    await engine.start(timeout_s=5)
    identity = Identity.from_seed(bytes(range(32)))
    late_receipts: list[market_pb2.SignedReceipt] = []
    worker = NodeWorker(
        engine,
        identity,
        price_input_micro_usd_per_mtok=PRICE_INPUT,
        price_output_micro_usd_per_mtok=PRICE_OUTPUT,
        max_concurrency=max_concurrency,
        on_late_receipt=late_receipts.append,
    )
    server, port, _health = await start_worker_server(worker, "127.0.0.1", 0)
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(address)
    stub = node_pb2_grpc.NodeWorkerServiceStub(channel)
    harness = WorkerHarness(engine, identity, worker, stub, channel, address, late_receipts)
    return harness, server


@pytest.fixture
async def harness() -> AsyncIterator[WorkerHarness]:
    harness, server = await start_harness()
    yield harness
    await harness.channel.close()
    await server.stop(0)


def chat_request(
    content: str = "hello", *, request_id: str = "req-1", model: str = MODEL, **sampling: object
) -> node_pb2.WorkerGenerateRequest:
    return node_pb2.WorkerGenerateRequest(
        request_id=request_id,
        model=model,
        chat=common_pb2.ChatInput(messages=[common_pb2.ChatMessage(role="user", content=content)]),
        sampling=common_pb2.SamplingParams(**sampling),  # type: ignore[arg-type]
    )


async def collect(
    call: AsyncIterator[node_pb2.WorkerGenerateResponse],
) -> tuple[list[common_pb2.TextDelta], node_pb2.WorkerFinal | None]:
    deltas: list[common_pb2.TextDelta] = []
    final = None
    async for response in call:
        kind = response.WhichOneof("chunk")
        if kind == "delta":
            deltas.append(response.delta)
        elif kind == "final":
            final = response.final
    return deltas, final
