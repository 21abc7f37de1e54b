"""The real engine driven in-process vs the same work through the node's worker gRPC server.

Engine load time, then greedy chat requests of 128 new tokens at 1 and 32 concurrent
streams, two ways: ``direct`` (Engine.generate in this process) and ``worker`` (a
NodeWorkerService on 127.0.0.1 in this process, called by a grpc.aio client in this
process, so the client's cost is counted too). Rounds alternate the order; figures are
medians over rounds. ``ratio`` = worker / direct.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

NEW_TOKENS = 128
ROUNDS = 3
CONCURRENCY_LEVELS = (1, 32)
REQUESTS_AT_C1 = 2
TOPICS = (
    "the water cycle", "bicycle gears", "why the sky is blue", "compound interest",
    "photosynthesis", "the printing press", "vaccines", "black holes",
)  # fmt: skip


def _prompt(index: int) -> str:
    return f"Explain {TOPICS[index % len(TOPICS)]} in detail. ({index})"


async def _timed(one: Any, count: int, concurrency: int) -> float:
    started = time.perf_counter()
    if concurrency == 1:
        tokens = 0
        for index in range(count):
            tokens += await one(index)
    else:
        tokens = sum(await asyncio.gather(*(one(i) for i in range(count))))
    return tokens / (time.perf_counter() - started)


async def _measure(models_dir: Path | None, streams: tuple[int, ...]) -> dict[str, Any]:
    import grpc.aio
    from mercato.v1 import common_pb2, node_pb2, node_pb2_grpc

    from marketplace.identity import Identity
    from node.engine import GenerationRequest, create_engine
    from node.settings import NodeSettings
    from node.worker import NodeWorker
    from node.worker_server import start_worker_server

    settings = NodeSettings(models_dir=models_dir) if models_dir else NodeSettings()
    started = time.perf_counter()
    engine = await create_engine(settings)
    load_s = time.perf_counter() - started
    worker = NodeWorker(
        engine,
        Identity.generate(),
        price_input_micro_usd_per_mtok=1,
        price_output_micro_usd_per_mtok=1,
        max_concurrency=max(64, *streams),  # the node must admit the widest level
    )
    server, port, _ = await start_worker_server(worker, "127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = node_pb2_grpc.NodeWorkerServiceStub(channel)

    async def direct(index: int) -> int:
        request = GenerationRequest(
            f"direct-{time.monotonic_ns()}-{index}",
            messages=[("user", _prompt(index))],
            max_tokens=NEW_TOKENS,
            temperature=0.0,
        )
        return sum([len(delta.token_ids) async for delta in engine.generate(request)])

    async def through_worker(index: int) -> int:
        request = node_pb2.WorkerGenerateRequest(
            request_id=f"worker-{time.monotonic_ns()}-{index}",
            model=engine.model_name,
            chat=common_pb2.ChatInput(
                messages=[common_pb2.ChatMessage(role="user", content=_prompt(index))]
            ),
            sampling=common_pb2.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0),
        )
        tokens = 0
        async for response in stub.Generate(request):
            if response.HasField("delta"):
                tokens += len(response.delta.token_ids)
        return tokens

    try:
        await direct(0)  # warm-up
        await through_worker(0)
        samples: dict[str, list[float]] = {}
        for round_index in range(ROUNDS):
            for concurrency in streams:
                count = REQUESTS_AT_C1 if concurrency == 1 else concurrency
                paths = [("direct", direct), ("worker", through_worker)]
                if round_index % 2:
                    paths.reverse()
                for name, one in paths:
                    rate = await _timed(one, count, concurrency)
                    print(
                        f"round {round_index} c{concurrency} {name}: {rate:.1f} tok/s",
                        file=sys.stderr,
                    )
                    samples.setdefault(f"{name}_tokens_per_s_c{concurrency}", []).append(rate)
    finally:
        await channel.close()
        await server.stop(0)
        await engine.shutdown()
    result: dict[str, Any] = {k: round(statistics.median(v), 1) for k, v in samples.items()}
    for concurrency in streams:
        result[f"ratio_c{concurrency}"] = round(
            result[f"worker_tokens_per_s_c{concurrency}"]
            / result[f"direct_tokens_per_s_c{concurrency}"],
            3,
        )
    result["engine_load_s"] = round(load_s, 1)
    result["engine_dtype"] = getattr(engine, "dtype", settings.engine_dtype.value)
    result["samples"] = {k: [round(x, 1) for x in v] for k, v in samples.items()}
    result["rounds"] = ROUNDS
    result["new_tokens_per_request"] = NEW_TOKENS
    return result


def run(
    json_output: bool,
    models_dir: Path | None = None,
    streams: tuple[int, ...] = CONCURRENCY_LEVELS,
) -> dict[str, Any]:
    import uvloop
    from rich.console import Console
    from rich.table import Table

    result = uvloop.run(_measure(models_dir, streams))
    table = Table(
        title=f"node worker: output tokens/s (engine loaded in {result['engine_load_s']} s)"
    )
    for column in ("streams", "direct (in-process)", "worker gRPC (in-process client)", "ratio"):
        table.add_column(column, justify="right")
    for concurrency in streams:
        table.add_row(
            str(concurrency),
            f"{result[f'direct_tokens_per_s_c{concurrency}']:.1f}",
            f"{result[f'worker_tokens_per_s_c{concurrency}']:.1f}",
            f"{result[f'ratio_c{concurrency}']:.3f}",
        )
    Console(stderr=json_output).print(table)
    return result


def plot(results: list[dict[str, Any]], labels: list[str], path: Path) -> None:
    """Output tokens/s per number of streams, direct and through the worker, one pair of
    bars per result (for instance a GPU node with and without CUDA graphs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted(
        {int(key.rsplit("_c", 1)[1]) for r in results for key in r if key.startswith("ratio_c")}
    )
    figure, axis = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / (2 * len(results))
    for index, (result, label) in enumerate(zip(results, labels, strict=True)):
        for side, path_name in enumerate(("direct", "worker")):
            offset = (2 * index + side - len(results) + 0.5) * width
            values = [result.get(f"{path_name}_tokens_per_s_c{c}", 0.0) for c in levels]
            bars = axis.bar(
                [i + offset for i in range(len(levels))],
                values,
                width,
                label=f"{label}, {path_name}",
                color=f"C{index}",
                alpha=1.0 if side == 0 else 0.55,
            )
            axis.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=7, rotation=90)
    axis.set_xticks(range(len(levels)), [f"{c} stream{'s' if c > 1 else ''}" for c in levels])
    axis.set_yscale("log")
    axis.set_ylim(top=axis.get_ylim()[1] * 3)  # room for the labels
    axis.set_ylabel("output tokens/s (log scale)")
    axis.set_title(f"node worker, {results[0].get('new_tokens_per_request')} new tokens/request")
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models_dir", nargs="?", type=Path, help="default: the node's")
    parser.add_argument(
        "--streams",
        default=",".join(map(str, CONCURRENCY_LEVELS)),
        help="concurrent streams per level, comma-separated (a GPU: 1,32,256)",
    )
    parser.add_argument(
        "--plot",
        nargs="+",
        metavar=("PNG", "RESULT_JSON"),
        help="draw saved results (label:file.json ...) into PNG instead of measuring",
    )
    args = parser.parse_args()
    if args.plot:
        image, *saved = args.plot
        pairs = [item.split(":", 1) for item in saved]
        plot(
            [json.loads(Path(f).read_text()) for _, f in pairs], [n for n, _ in pairs], Path(image)
        )
        raise SystemExit(0)
    levels = tuple(int(level) for level in args.streams.split(","))
    print(json.dumps(run(True, args.models_dir, levels), sort_keys=True))
