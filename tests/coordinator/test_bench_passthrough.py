"""The benchmark-only relay with no logic (``mercato bench overhead``'s floor path)."""

from __future__ import annotations

import grpc.aio
from mercato.v1 import common_pb2, inference_pb2

from coordinator.benchmarks.passthrough import _Passthrough
from coordinator.worker_session import WorkerLink

from .fakes import MODEL, FakeNode


async def test_the_floor_relay_forwards_every_delta_and_stops_at_the_final() -> None:
    node = await FakeNode("127.0.0.1:1").start(register=False, heartbeat=False)
    node.worker.behaviour.deltas = ["Hel", "lo", " there"]
    channel = grpc.aio.insecure_channel(node.worker_address)
    try:
        relay = _Passthrough(WorkerLink(channel, ()))
        request = inference_pb2.GenerateRequest(
            model=MODEL,
            chat=common_pb2.ChatInput(messages=[common_pb2.ChatMessage(role="user", content="hi")]),
            sampling=common_pb2.SamplingParams(max_tokens=3, temperature=0.0),
        )
        relayed = [
            inference_pb2.GenerateResponse.FromString(message)
            async for message in relay.generate(request.SerializeToString(), None)  # type: ignore[arg-type]
        ]
        assert [r.WhichOneof("chunk") for r in relayed] == ["delta"] * 3  # the final is not sent
        assert "".join(r.delta.text for r in relayed) == "Hello there"
        (asked,) = node.worker.requests
        assert asked.model == MODEL
        assert asked.chat == request.chat
        assert asked.sampling.max_tokens == 3
        assert node.worker.session_streams == 1  # as the coordinator asks: on a Session stream
    finally:
        await channel.close()
        await node.stop()
