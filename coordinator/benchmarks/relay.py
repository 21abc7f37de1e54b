"""`mercato bench relay`: output tokens/s one coordinator process relays, per CPU core.

A coordinator and a node run as their own processes (``fake_cluster``); the node's
engine is the FakeEngine (no model) at ``TOKENS_PER_S`` per stream. ``STREAMS``
concurrent streams, each a loop of requests of ``NEW_TOKENS`` tokens, are sent to the
coordinator by ``CLIENT_PROCESSES`` client processes (each its own interpreter, so the
client is not what limits the relay; each reads raw bytes and parses only the delta to
count its tokens). After ``WARMUP_S`` the measured window of ``MEASURE_S`` begins: the
clients count the tokens and messages they receive in it, and this process reads the
coordinator's CPU time (user + system, all threads, psutil) at both ends.

    relay_tokens_per_s_per_core = tokens relayed in the window / coordinator CPU seconds

Where the number comes from: the coordinator's cost is almost all per message (gRPC's
receive from the node and send to the client), so tokens per CPU-second is about
tokens per message / CPU per message; both are reported. How many tokens a message
carries is the node's doing, as on a real node: at 128 running requests its stream
interval (``StreamInterval``, ``MERCATO_NODE_STREAM_INTERVAL_MAX``, default 4, set here
explicitly) gathers up to 4 tokens per delta, and the worker merges deltas that arrive
while a write is in flight (``node.worker.coalesced``). ``--stream-interval-max 1``
measures the relay with every token its own delta (the node merges only what queues).

Target (issue 3): relay_tokens_per_s_per_core >= 20,000.

``python -m coordinator.benchmarks.relay --plot PATH`` also runs a sweep of offered
loads and draws it; ``--client SPEC`` is the client process (internal).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.benchmarks.fake_cluster import FAKE_MODEL, fake_cluster, load_average

__all__ = ["RelayLoad", "measure", "plot", "run"]

STREAMS = 128
TOKENS_PER_S = 200.0  # per stream: 128 x 200 = 25,600 tokens/s offered
NEW_TOKENS = 256
CLIENT_PROCESSES = 2
WARMUP_S = 5.0
MEASURE_S = 20.0
TARGET_TOKENS_PER_S_PER_CORE = 20_000
NODE_STREAM_INTERVAL_MAX = 4
SWEEP_TOKENS_PER_S = (25.0, 50.0, 100.0, 200.0, 400.0)
_DELTA_TAG = 0x0A  # GenerateResponse field 1: TextDelta
# A delta the relay forwards without a parse: field tag, one-byte length, <= 127 bytes.
_SHORT_MESSAGE_BYTES_MAX = 2 + 127
_CLIENT_COMMAND = (sys.executable, "-m", "coordinator.benchmarks.relay", "--client")


@dataclass(frozen=True)
class RelayLoad:
    """One configuration of the benchmark."""

    streams: int = STREAMS
    tokens_per_s: float = TOKENS_PER_S
    new_tokens: int = NEW_TOKENS
    client_processes: int = CLIENT_PROCESSES
    warmup_s: float = WARMUP_S
    measure_s: float = MEASURE_S
    # The node's stream interval (``MERCATO_NODE_STREAM_INTERVAL_MAX``; its default, 4):
    # with 128 streams running the node gathers up to this many tokens per delta, as a
    # vLLM node does. 1 sends every token alone.
    stream_interval_max: int = NODE_STREAM_INTERVAL_MAX


# ---------------------------------------------------------------------------- client


async def _client(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec["streams"]`` request loops; count what arrives inside the window."""
    import grpc.aio
    from mercato.v1 import common_pb2, inference_pb2

    request = inference_pb2.GenerateRequest(
        model=FAKE_MODEL,
        chat=common_pb2.ChatInput(
            messages=[common_pb2.ChatMessage(role="user", content="Tell me a long story.")]
        ),
        sampling=common_pb2.SamplingParams(max_tokens=spec["new_tokens"], temperature=0.0),
    ).SerializeToString()
    channels = [grpc.aio.insecure_channel(spec["address"]) for _ in range(spec["channels"])]
    generates = [
        c.unary_stream(
            "/mercato.v1.InferenceService/Generate",
            request_serializer=None,
            response_deserializer=None,
        )
        for c in channels
    ]
    for channel in channels:
        await channel.channel_ready()
    print("READY", flush=True)
    start_s, end_s = (float(x) for x in (await asyncio.to_thread(sys.stdin.readline)).split())
    parse = inference_pb2.GenerateResponse.FromString
    clock = time.monotonic
    totals = {"tokens": 0, "messages": 0, "long_messages": 0, "requests": 0, "errors": 0}
    error_samples: list[str] = []

    async def loop(generate: Any) -> None:
        while clock() < end_s:
            tokens = messages = long_messages = 0
            try:
                async for message in generate(request, timeout=60):
                    now = clock()
                    if now >= end_s:
                        break
                    if now >= start_s and message[0] == _DELTA_TAG:
                        tokens += len(parse(message).delta.token_ids)
                        messages += 1
                        long_messages += len(message) > _SHORT_MESSAGE_BYTES_MAX
            except grpc.aio.AioRpcError as exc:
                totals["errors"] += 1
                if len(error_samples) < 5:
                    error_samples.append(f"{exc.code().name}: {(exc.details() or '')[:200]}")
            totals["tokens"] += tokens
            totals["messages"] += messages
            totals["long_messages"] += long_messages
            totals["requests"] += 1

    await asyncio.gather(*(loop(generates[i % len(generates)]) for i in range(spec["streams"])))
    for channel in channels:
        await channel.close(grace=None)
    return {**totals, "error_samples": error_samples}


def _client_main(spec_json: str) -> None:
    import uvloop

    result = uvloop.run(_client(json.loads(spec_json)))
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------- parent


def _cpu_s(process: Any) -> float:
    times = process.cpu_times()
    return times.user + times.system


def measure(load: RelayLoad = RelayLoad(), *, channels_per_client: int = 1) -> dict[str, Any]:
    """Start the processes, run the load, stop them; the figures of the window."""
    import psutil

    load_before = load_average()
    # The node's limit is exactly the streams: each client starts its next request the
    # moment a final arrives, so the coordinator must know at once that a slot is free
    # (it counts its own requests; the node's heartbeat says which calls were ours).
    with fake_cluster(
        tokens_per_s=load.tokens_per_s,
        max_concurrency=load.streams,
        stream_interval_max=load.stream_interval_max,
    ) as cluster:
        per_client = [
            load.streams // load.client_processes + (i < load.streams % load.client_processes)
            for i in range(load.client_processes)
        ]
        clients = []
        try:
            for streams in per_client:
                spec = {
                    "address": cluster.coordinator_address,
                    "streams": streams,
                    "new_tokens": load.new_tokens,
                    "channels": channels_per_client,
                }
                clients.append(
                    subprocess.Popen(
                        [*_CLIENT_COMMAND, json.dumps(spec)],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                )
            for client in clients:
                assert client.stdout is not None
                if client.stdout.readline().strip() != "READY":
                    raise RuntimeError("a relay benchmark client failed to start")
            start_s = time.monotonic() + load.warmup_s
            end_s = start_s + load.measure_s
            for client in clients:
                assert client.stdin is not None
                client.stdin.write(f"{start_s} {end_s}\n")
                client.stdin.flush()
            watched = {
                "coordinator": cluster.coordinator,
                "node": cluster.node,
                **{f"client{i}": psutil.Process(c.pid) for i, c in enumerate(clients)},
            }
            time.sleep(max(start_s - time.monotonic(), 0))
            cpu_before = {name: _cpu_s(p) for name, p in watched.items()}
            wall_before = time.monotonic()
            time.sleep(max(end_s - time.monotonic(), 0))
            cpu_after = {name: _cpu_s(p) for name, p in watched.items()}
            wall_s = time.monotonic() - wall_before
            totals = dict.fromkeys(("tokens", "messages", "long_messages", "requests", "errors"), 0)
            error_samples: list[str] = []
            for client in clients:
                out, _ = client.communicate(timeout=60)
                line = next(x for x in out.splitlines() if x.startswith("RESULT "))
                reported = json.loads(line[len("RESULT ") :])
                error_samples.extend(reported.pop("error_samples"))
                for key, value in reported.items():
                    totals[key] += value
        finally:
            for client in clients:
                if client.poll() is None:
                    client.kill()
                    client.wait()
    cpu_s = {name: cpu_after[name] - cpu_before[name] for name in watched}
    coordinator_cpu_s = cpu_s["coordinator"]
    tokens, messages = totals["tokens"], totals["messages"]
    return {
        "relay_tokens_per_s_per_core": round(tokens / coordinator_cpu_s),
        "relayed_tokens_per_s": round(tokens / wall_s),
        "relayed_messages_per_s": round(messages / wall_s),
        "tokens_per_message": round(tokens / messages, 2),
        "long_message_share": round(totals["long_messages"] / messages, 4),
        "coordinator_cpu_us_per_message": round(coordinator_cpu_s / messages * 1e6, 1),
        "coordinator_cpu_cores": round(coordinator_cpu_s / wall_s, 3),
        "node_cpu_cores": round(cpu_s["node"] / wall_s, 3),
        "clients_cpu_cores": round(
            sum(v for k, v in cpu_s.items() if k.startswith("client")) / wall_s, 3
        ),
        "offered_tokens_per_s": round(load.streams * load.tokens_per_s),
        "streams": load.streams,
        "fake_engine_tokens_per_s_per_stream": load.tokens_per_s,
        "new_tokens_per_request": load.new_tokens,
        "client_processes": load.client_processes,
        "channels_per_client": channels_per_client,
        "requests_finished_or_cut": totals["requests"],
        "request_errors": totals["errors"],
        "request_error_samples": error_samples[:5],
        "measure_s": round(wall_s, 2),
        "node_stream_interval_max": load.stream_interval_max,
        "target_tokens_per_s_per_core": TARGET_TOKENS_PER_S_PER_CORE,
        "meets_target": tokens / coordinator_cpu_s >= TARGET_TOKENS_PER_S_PER_CORE,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_average()],
        "cpu_count": os.cpu_count(),
    }


def run(json_output: bool) -> dict[str, Any]:
    result = measure()
    _print_table([result], json_output)
    return result


def _print_table(results: list[dict[str, Any]], json_output: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    first = results[0]
    table = Table(
        title=(
            f"mercato bench relay: {first['streams']} streams, {first['new_tokens_per_request']} "
            f"tokens/request, fake engine, {first['client_processes']} client processes, "
            f"{first['measure_s']:.0f} s window"
        )
    )
    columns = (
        ("offered tok/s", "offered_tokens_per_s", "{:,}"),
        ("relayed tok/s", "relayed_tokens_per_s", "{:,}"),
        ("tok / coordinator CPU-s", "relay_tokens_per_s_per_core", "{:,}"),
        ("tokens/message", "tokens_per_message", "{:.2f}"),
        ("coord. CPU µs/message", "coordinator_cpu_us_per_message", "{:.1f}"),
        ("coord. cores", "coordinator_cpu_cores", "{:.2f}"),
        ("node cores", "node_cpu_cores", "{:.2f}"),
        ("client cores", "clients_cpu_cores", "{:.2f}"),
    )
    for name, _, _ in columns:
        table.add_column(name, justify="right")
    for result in results:
        table.add_row(*(fmt.format(result[key]) for _, key, fmt in columns))
    console = Console(stderr=json_output)
    console.print(table)
    console.print(
        f"target: >= {TARGET_TOKENS_PER_S_PER_CORE:,} tokens per coordinator CPU-second; "
        f"load average {first['load_average_before']} -> {results[-1]['load_average_after']}, "
        f"{first['cpu_count']} CPUs"
    )
    for result in results:
        if result["request_errors"]:
            console.print(
                f"{result['request_errors']} requests failed, e.g. "
                + "; ".join(result["request_error_samples"])
            )


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Tokens per coordinator CPU-second and tokens per message against offered load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offered = [r["offered_tokens_per_s"] for r in results]
    figure, left = plt.subplots(figsize=(8, 4.5))
    left.plot(
        offered, [r["relay_tokens_per_s_per_core"] for r in results], "o-", color="C0",
        label="tokens per coordinator CPU-second",
    )  # fmt: skip
    left.plot(
        offered, [r["relayed_tokens_per_s"] for r in results], "s--", color="C2",
        label="tokens/s relayed (wall clock)",
    )  # fmt: skip
    left.axhline(TARGET_TOKENS_PER_S_PER_CORE, color="C3", linestyle=":", label="target per core")
    left.set_xscale("log")
    left.set_xlabel(f"offered tokens/s ({results[0]['streams']} streams, fake engine)")
    left.set_ylabel("tokens/s")
    left.grid(alpha=0.3)
    right = left.twinx()
    right.plot(
        offered, [r["tokens_per_message"] for r in results], "^-", color="C1",
        label="tokens per message (right)",
    )  # fmt: skip
    right.set_ylabel("tokens per message")
    right.set_ylim(bottom=1.0)
    handles = left.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    left.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="lower right")
    figure.suptitle("coordinator relay: throughput per core as offered load grows")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--plot", type=Path, help="run the sweep and save its figure (PNG)")
    parser.add_argument("--tokens-per-s", type=float, default=TOKENS_PER_S)
    parser.add_argument("--clients", type=int, default=CLIENT_PROCESSES)
    parser.add_argument("--channels", type=int, default=1, help="channels per client")
    parser.add_argument("--measure-s", type=float, default=MEASURE_S)
    parser.add_argument(
        "--stream-interval-max",
        type=int,
        default=NODE_STREAM_INTERVAL_MAX,
        help="the node's MERCATO_NODE_STREAM_INTERVAL_MAX (1: every token its own message)",
    )
    args = parser.parse_args()
    if args.client:
        _client_main(args.client)
        return
    loads = (
        [
            RelayLoad(
                tokens_per_s=rate,
                measure_s=args.measure_s,
                stream_interval_max=args.stream_interval_max,
            )
            for rate in SWEEP_TOKENS_PER_S
        ]
        if args.plot
        else [
            RelayLoad(
                tokens_per_s=args.tokens_per_s,
                client_processes=args.clients,
                measure_s=args.measure_s,
                stream_interval_max=args.stream_interval_max,
            )
        ]
    )
    results = [measure(load, channels_per_client=args.channels) for load in loads]
    _print_table(results, json_output=True)
    if args.plot:
        plot(results, args.plot)
    print(json.dumps(results if len(results) > 1 else results[0], sort_keys=True))


if __name__ == "__main__":
    main()
