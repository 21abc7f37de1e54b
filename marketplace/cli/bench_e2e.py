"""`mercato bench e2e`: the engine driven in-process vs the same work routed over gRPC.

The same workload (greedy chat requests, 128 new tokens each) runs two ways:

* direct: the node's engine backend in this process, no network at all;
* routed: a coordinator process and a node process on 127.0.0.1 (the real engine), the
  requests sent to the coordinator's InferenceService, relayed to the node and back.

Both run at 1 and at 32 concurrent streams, in alternating rounds (direct and routed
swap order every round so drift in the machine's speed hits both), and the figures are
medians over rounds. Tokens/s counts output tokens from the first request sent to the
last final message. ``ratio`` = routed / direct; the target is ≥ 0.95 at both levels.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL = "SmolLM2-135M-Instruct"
NEW_TOKENS = 128
ROUNDS = 5
CONCURRENCY_LEVELS = (1, 32)
REQUESTS_AT_C1 = 4

_TOPICS = [
    "the water cycle",
    "how a bicycle gear works",
    "why the sky is blue",
    "compound interest",
    "photosynthesis",
    "the history of the printing press",
    "how vaccines work",
    "black holes",
    "the French revolution",
    "how a CPU cache works",
    "plate tectonics",
    "the game of chess",
    "how bread rises",
    "the moon's phases",
    "electric cars",
    "the human heart",
    "volcanoes",
    "how the internet routes packets",
    "honey bees",
    "the Roman empire",
    "rainbows",
    "how a refrigerator works",
    "the stock market",
    "coral reefs",
    "earthquakes",
    "how airplanes fly",
    "the solar system",
    "recycling plastic",
    "the Olympic games",
    "how glasses correct vision",
    "tides",
    "the invention of paper",
]


def _prompts(count: int) -> list[str]:
    return [f"Explain {_TOPICS[i % len(_TOPICS)]} in detail." for i in range(count)]


async def _direct(engine: Any, prompts: list[str], concurrency: int) -> tuple[int, float]:
    from node.engine import GenerationRequest  # the edge: lazy import

    async def one(index: int, prompt: str) -> int:
        request = GenerationRequest(
            request_id=f"direct-{time.monotonic_ns()}-{index}",
            messages=[("user", prompt)],
            max_tokens=NEW_TOKENS,
            temperature=0.0,
        )
        tokens = 0
        async for delta in engine.generate(request):
            tokens += len(delta.token_ids)
        return tokens

    return await _timed(one, prompts, concurrency)


async def _routed(
    address: str, api_key: str, prompts: list[str], concurrency: int
) -> tuple[int, float]:
    import grpc
    from mercato.v1 import common_pb2, inference_pb2, inference_pb2_grpc

    metadata = (("authorization", f"Bearer {api_key}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)

        async def one(index: int, prompt: str) -> int:
            request = inference_pb2.GenerateRequest(
                model=MODEL,
                chat=common_pb2.ChatInput(
                    messages=[common_pb2.ChatMessage(role="user", content=prompt)]
                ),
                sampling=common_pb2.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0),
            )
            tokens = 0
            async for response in stub.Generate(request, timeout=600, metadata=metadata):
                if response.HasField("delta"):
                    tokens += len(response.delta.token_ids)
            return tokens

        return await _timed(one, prompts, concurrency)


async def _timed(one: Any, prompts: list[str], concurrency: int) -> tuple[int, float]:
    started = time.perf_counter()
    if concurrency == 1:
        tokens = 0
        for index, prompt in enumerate(prompts):
            tokens += await one(index, prompt)
    else:
        tokens = sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
    return tokens, time.perf_counter() - started


async def _measure(address: str, api_key: str, engine: Any) -> dict[str, Any]:
    samples: dict[str, list[float]] = {}
    for round_index in range(ROUNDS):
        for concurrency in CONCURRENCY_LEVELS:
            prompts = _prompts(REQUESTS_AT_C1 if concurrency == 1 else concurrency)
            order = ("direct", "routed") if round_index % 2 == 0 else ("routed", "direct")
            for path in order:
                if path == "direct":
                    tokens, elapsed_s = await _direct(engine, prompts, concurrency)
                else:
                    tokens, elapsed_s = await _routed(address, api_key, prompts, concurrency)
                samples.setdefault(f"{path}_tokens_per_s_c{concurrency}", []).append(
                    tokens / elapsed_s
                )
    result: dict[str, Any] = {key: round(statistics.median(v), 1) for key, v in samples.items()}
    for concurrency in CONCURRENCY_LEVELS:
        direct = result[f"direct_tokens_per_s_c{concurrency}"]
        routed = result[f"routed_tokens_per_s_c{concurrency}"]
        result[f"ratio_c{concurrency}"] = round(routed / direct, 3)
    result["rounds"] = ROUNDS
    result["new_tokens_per_request"] = NEW_TOKENS
    return result


async def _main(models_dir: Path, address: str, api_key: str) -> dict[str, Any]:
    from node.engine import create_engine  # the edge: lazy import
    from node.settings import NodeSettings

    settings = NodeSettings(models_dir=models_dir)
    engine = await create_engine(settings)
    try:
        await _direct(engine, _prompts(2), 2)  # warm-up
        await _routed(address, api_key, _prompts(2), 2)
        return await _measure(address, api_key, engine)
    finally:
        await engine.shutdown()


def run(json_output: bool) -> dict[str, Any]:
    import uvloop
    from rich.console import Console
    from rich.table import Table

    from marketplace.cli.processes import mercato_command, start_service
    from marketplace.cli.up_cmd import ensure_client_key
    from node.model_store import ensure_model
    from node.settings import NodeSettings

    console = Console(stderr=json_output)
    models_dir = NodeSettings().models_dir
    ensure_model(models_dir, MODEL, show_progress=not json_output)
    with tempfile.TemporaryDirectory(prefix="mercato-bench-e2e-") as tmp:
        home = Path(tmp)
        coordinator = start_service(
            "coordinator",
            mercato_command("coordinator", "start", "--home", str(home / "c"), "--port", "0"),
            "MERCATO_COORDINATOR_READY",
            home / "coordinator.log",
            timeout_s=60,
        )
        try:
            address = coordinator.ready["address"]
            # The routed path is the product path, billing included: a funded client key.
            api_key, _ = ensure_client_key(
                home / "c", account="bench", credits_micro_usd=10**12, key_path=home / "bench.key"
            )
            node = start_service(
                "node",
                mercato_command(
                    "node",
                    "start",
                    "--home",
                    str(home / "n"),
                    "--models-dir",
                    str(models_dir),
                    "--coordinator",
                    address,
                    "--port",
                    "0",
                ),
                "MERCATO_NODE_READY",
                home / "node.log",
                timeout_s=300,
            )
            try:
                _wait_for_node(address, api_key)
                result = uvloop.run(_main(models_dir, address, api_key))
            finally:
                node.stop()
        finally:
            coordinator.stop()
    table = Table(title="mercato bench e2e: output tokens/s (median of rounds)")
    for column in ("streams", "direct (in-process)", "routed (coordinator → node)", "ratio"):
        table.add_column(column, justify="right")
    for concurrency in CONCURRENCY_LEVELS:
        table.add_row(
            str(concurrency),
            f"{result[f'direct_tokens_per_s_c{concurrency}']:.1f}",
            f"{result[f'routed_tokens_per_s_c{concurrency}']:.1f}",
            f"{result[f'ratio_c{concurrency}']:.3f}",
        )
    console.print(table)
    return result


def _wait_for_node(address: str, api_key: str, timeout_s: float = 60.0) -> None:
    import grpc
    from mercato.v1 import inference_pb2, inference_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        while time.monotonic() < deadline:
            listed = stub.ListModels(
                inference_pb2.ListModelsRequest(),
                timeout=5,
                metadata=(("authorization", f"Bearer {api_key}"),),
            )
            if any(m.model == MODEL and m.nodes for m in listed.models):
                return
            time.sleep(0.2)
    raise TimeoutError(f"no node registered with the coordinator at {address}")
