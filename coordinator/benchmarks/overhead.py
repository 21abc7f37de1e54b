"""`mercato bench overhead`: the latency the coordinator adds to one streamed request.

A coordinator and a node run as their own processes (``fake_cluster``); the node's
engine is the FakeEngine at ``TOKENS_PER_S`` per stream (a fixed 1 ms between tokens,
no model), so the engine adds no noise of its own. This process is the client. The same
requests (one at a time, ``NEW_TOKENS`` each) go

* direct: to the node's NodeWorkerService.Generate,
* floor: to a benchmark-only relay with no logic at all (``passthrough``: the request
  goes to the same node as a message on a Session stream, deltas come back; nothing is
  checked, routed or counted), and
* routed: to the coordinator's InferenceService.Generate, which relays the node's stream,

in interleaved rounds (the paths in one order in even rounds, reversed in odd ones, so
drift in the machine's speed hits all of them). Every path reads raw response bytes (no
parse), over one warmed channel each. Per round and path: time to first token (from the call to the
first delta) p50 and p99, and inter-token latency (between consecutive deltas) p99. The
result is the median over rounds of the per-round difference routed - direct
(``added_*``), and of floor - direct (``floor_added_*``): what two more gRPC message
hops cost through grpc-python on this machine with no work in between, so
``added - floor_added`` is the coordinator's own share.

Placement (``--placement``; the JSON says which ran, with each process's CPUs):

* ``dedicated`` (the default on a machine with 2 CPUs or more): the coordinator and the
  floor relay run on a CPU of their own (the highest-numbered one this process may use),
  the node and this client on the others. A coordinator in production runs on its own
  host, not beside the node and the client it serves; on a 2-CPU machine shared by all
  three, the scheduler moves the relay's threads between CPUs and the other two evict
  its caches between requests, and that doubled the floor (docs/benchmarks.md).
* ``shared``: every process wherever the scheduler puts it (the figures of the first
  seventeen sessions).

Targets (issue 3): added_ttft_ms_p50 <= 0.5, added_ttft_ms_p99 <= 2.0,
added_itl_ms_p99 <= 0.5.

``python -m coordinator.benchmarks.overhead --plot PATH`` also draws the figure.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.benchmarks.fake_cluster import FAKE_MODEL, fake_cluster, load_average
from marketplace.placement import format_cpus, pin

__all__ = ["Measured", "Placement", "measure", "plan_placement", "plot", "run"]

TOKENS_PER_S = 1000.0
NEW_TOKENS = 32
ROUNDS = 15
REQUESTS_PER_ROUND = 40
WARMUP_REQUESTS = 40
PATHS = ("direct", "floor", "routed")
PLACEMENTS = ("dedicated", "shared")
TARGETS_MS = {"added_ttft_ms_p50": 0.5, "added_ttft_ms_p99": 2.0, "added_itl_ms_p99": 0.5}
_DELTA_TAG = 0x0A  # field 1 (TextDelta) in both WorkerGenerateResponse and GenerateResponse
_PROMPT = "Say something about the weather."


@dataclass
class Measured:
    """Raw samples, seconds, per path: every request's TTFT and every inter-token gap,
    and the per-round summaries."""

    ttft_s: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PATHS})
    itl_s: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PATHS})
    rounds: list[dict[str, float]] = field(default_factory=list)
    deltas_per_request: dict[str, list[int]] = field(default_factory=lambda: {p: [] for p in PATHS})
    # The coordinator's CPU time (user + system) while each path ran, summed over all
    # rounds: the OS counts it in 10 ms ticks, too coarse for one round of requests.
    coordinator_cpu_s: dict[str, float] = field(default_factory=lambda: {p: 0.0 for p in PATHS})


@dataclass(frozen=True)
class Placement:
    """Where the benchmark's processes run: ``relay_cpus`` for the coordinator and the
    floor relay, ``rest_cpus`` for the node and the client (None: anywhere)."""

    name: str
    relay_cpus: frozenset[int] | None = None
    rest_cpus: frozenset[int] | None = None

    def describe(self) -> dict[str, Any]:
        """The JSON result's account of it."""
        return {
            "placement": self.name,
            "relay_cpus": format_cpus(self.relay_cpus) if self.relay_cpus else "any",
            "node_and_client_cpus": format_cpus(self.rest_cpus) if self.rest_cpus else "any",
        }


def plan_placement(name: str, available: frozenset[int]) -> Placement:
    """``dedicated``: the highest of the ``available`` CPUs for the relays, the rest for
    the node and the client; ``shared`` (or fewer than 2 CPUs): no pinning."""
    if name not in PLACEMENTS:
        raise ValueError(f"placement {name!r}: one of {', '.join(PLACEMENTS)}")
    if name == "shared" or len(available) < 2:
        return Placement("shared")
    relay = frozenset({max(available)})
    return Placement("dedicated", relay, available - relay)


@contextlib.contextmanager
def _pinned_here(cpus: frozenset[int] | None) -> Iterator[None]:
    """This process (the client) on ``cpus`` until the block ends."""
    if not cpus:
        yield
        return
    before = frozenset(os.sched_getaffinity(0))
    pin(cpus)
    try:
        yield
    finally:
        pin(before)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class _Client:
    """One warmed channel per path; requests read as raw bytes."""

    def __init__(self, node_address: str, coordinator_address: str, floor_address: str) -> None:
        import grpc.aio
        from mercato.v1 import common_pb2, inference_pb2, node_pb2

        self._channels = [
            grpc.aio.insecure_channel(node_address),
            grpc.aio.insecure_channel(coordinator_address),
            grpc.aio.insecure_channel(floor_address),
        ]
        chat = common_pb2.ChatInput(messages=[common_pb2.ChatMessage(role="user", content=_PROMPT)])
        sampling = common_pb2.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
        self._worker_request = node_pb2.WorkerGenerateRequest(
            model=FAKE_MODEL, chat=chat, sampling=sampling
        )
        routed = inference_pb2.GenerateRequest(model=FAKE_MODEL, chat=chat, sampling=sampling)
        self._routed_bytes = routed.SerializeToString()
        self._direct_call = self._channels[0].unary_stream(
            "/mercato.v1.NodeWorkerService/Generate",
            request_serializer=None,  # already bytes
            response_deserializer=None,
        )
        self._relayed_calls = {
            path: channel.unary_stream(
                "/mercato.v1.InferenceService/Generate",
                request_serializer=None,  # already bytes
                response_deserializer=None,
            )
            for path, channel in (("routed", self._channels[1]), ("floor", self._channels[2]))
        }
        self._sequence = 0

    async def one(self, path: str) -> tuple[float, list[float]]:
        """Time to first delta and the gaps between deltas of one request, seconds."""
        if path == "direct":
            self._sequence += 1
            self._worker_request.request_id = f"overhead-{os.getpid()}-{self._sequence}"
            payload = self._worker_request.SerializeToString()
            multi_callable = self._direct_call
        else:
            payload = self._routed_bytes
            multi_callable = self._relayed_calls[path]
        clock = time.perf_counter
        stamps: list[float] = []
        started = clock()
        call = multi_callable(payload, timeout=30)
        async for message in call:
            if message[0] == _DELTA_TAG:
                stamps.append(clock())
        if not stamps:
            raise RuntimeError(f"{path}: a request returned no delta")
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        return stamps[0] - started, gaps

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


async def _measure(
    node_address: str, coordinator_address: str, floor_address: str, rounds: int, coordinator: Any
) -> Measured:
    client = _Client(node_address, coordinator_address, floor_address)
    measured = Measured()
    try:
        for _ in range(WARMUP_REQUESTS):
            for path in PATHS:
                await client.one(path)
        gc.collect()
        gc.freeze()
        for round_index in range(rounds):
            order = PATHS if round_index % 2 == 0 else PATHS[::-1]
            summary: dict[str, float] = {}
            for path in order:
                ttfts: list[float] = []
                gaps: list[float] = []
                cpu_before_s = _cpu_s(coordinator)
                gc.disable()  # the client's collections are not the router's cost
                try:
                    for _ in range(REQUESTS_PER_ROUND):
                        ttft, request_gaps = await client.one(path)
                        ttfts.append(ttft)
                        gaps.extend(request_gaps)
                        measured.deltas_per_request[path].append(len(request_gaps) + 1)
                finally:
                    gc.enable()
                measured.coordinator_cpu_s[path] += _cpu_s(coordinator) - cpu_before_s
                measured.ttft_s[path].extend(ttfts)
                measured.itl_s[path].extend(gaps)
                summary[f"{path}_ttft_ms_p50"] = percentile(ttfts, 50) * 1e3
                summary[f"{path}_ttft_ms_p99"] = percentile(ttfts, 99) * 1e3
                summary[f"{path}_itl_ms_p99"] = percentile(gaps, 99) * 1e3
            for key in ("ttft_ms_p50", "ttft_ms_p99", "itl_ms_p99"):
                summary[f"added_{key}"] = summary[f"routed_{key}"] - summary[f"direct_{key}"]
                summary[f"floor_added_{key}"] = summary[f"floor_{key}"] - summary[f"direct_{key}"]
            measured.rounds.append(summary)
    finally:
        gc.unfreeze()
        await client.close()
    return measured


@contextlib.contextmanager
def _passthrough(node_address: str, cpus: frozenset[int] | None) -> Iterator[str]:
    """Run the benchmark-only relay with no logic (``passthrough``) in front of the
    node, on ``cpus`` (None: anywhere); yields its address."""
    from coordinator.benchmarks.passthrough import READY_PREFIX
    from marketplace.cli.processes import start_service

    with tempfile.TemporaryDirectory(prefix="mercato-bench-") as folder:
        service = start_service(
            "passthrough",
            [
                *(sys.executable, "-m", "coordinator.benchmarks.passthrough"),
                *("--node", node_address),
                *(("--cpus", format_cpus(cpus)) if cpus else ()),
            ],
            READY_PREFIX,
            Path(folder) / "passthrough.log",
            timeout_s=60,
        )
        try:
            yield service.ready["address"]
        finally:
            service.stop()


def _cpu_s(process: Any) -> float:
    times = process.cpu_times()
    return times.user + times.system


def measure(rounds: int = ROUNDS, placement: str = "dedicated") -> tuple[Measured, dict[str, Any]]:
    """Start the processes, run the rounds, stop them; the raw samples and the result."""
    import uvloop

    on_linux = hasattr(os, "sched_getaffinity")
    plan = plan_placement(placement, frozenset(os.sched_getaffinity(0) if on_linux else ()))
    load_before = load_average()
    with (
        fake_cluster(
            tokens_per_s=TOKENS_PER_S,
            max_concurrency=8,
            coordinator_cpus=plan.relay_cpus,
            node_cpus=plan.rest_cpus,
        ) as cluster,
        _passthrough(cluster.node_address, plan.relay_cpus) as floor_address,
        _pinned_here(plan.rest_cpus),  # last: the children above keep every CPU
    ):
        measured = uvloop.run(
            _measure(
                cluster.node_address,
                cluster.coordinator_address,
                floor_address,
                rounds,
                cluster.coordinator,
            )
        )
    result: dict[str, Any] = {
        key: round(statistics.median(r[key] for r in measured.rounds), 3)
        for key in measured.rounds[0]
    }
    result.update(
        rounds=rounds,
        requests_per_round=REQUESTS_PER_ROUND,
        new_tokens_per_request=NEW_TOKENS,
        fake_engine_tokens_per_s=TOKENS_PER_S,
        **{
            f"{path}_coordinator_cpu_us_per_request": round(
                measured.coordinator_cpu_s[path] / (rounds * REQUESTS_PER_ROUND) * 1e6
            )
            for path in PATHS
        },
        coordinator_cpu_us_per_request=round(
            (measured.coordinator_cpu_s["routed"] - measured.coordinator_cpu_s["direct"])
            / (rounds * REQUESTS_PER_ROUND)
            * 1e6
        ),
        deltas_per_request_mean=round(statistics.fmean(measured.deltas_per_request["routed"]), 2),
        targets_ms=TARGETS_MS,
        meets_targets=all(result[key] <= limit for key, limit in TARGETS_MS.items()),
        load_average_before=[round(x, 2) for x in load_before],
        load_average_after=[round(x, 2) for x in load_average()],
        cpu_count=os.cpu_count(),
        **plan.describe(),
    )
    return measured, result


def run(json_output: bool) -> dict[str, Any]:
    _, result = measure()
    _print_table(result, json_output)
    return result


def _print_table(result: dict[str, Any], json_output: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=(
            f"mercato bench overhead: 1 stream, {NEW_TOKENS} tokens/request, fake engine "
            f"{TOKENS_PER_S:.0f} tok/s; median of {result['rounds']} rounds "
            f"x {REQUESTS_PER_ROUND} requests per path"
        )
    )
    columns = ("ms", "direct", "floor", "routed", "floor added", "added", "target")
    for column in columns:
        table.add_column(column, justify="right")
    for key in ("ttft_ms_p50", "ttft_ms_p99", "itl_ms_p99"):
        added = result[f"added_{key}"]
        limit = TARGETS_MS[f"added_{key}"]
        table.add_row(
            key.replace("_ms_", " "),
            f"{result[f'direct_{key}']:.3f}",
            f"{result[f'floor_{key}']:.3f}",
            f"{result[f'routed_{key}']:.3f}",
            f"{result[f'floor_added_{key}']:+.3f}",
            f"[{'green' if added <= limit else 'red'}]{added:+.3f}[/]",
            f"<= {limit}",
        )
    Console(stderr=json_output).print(table)
    Console(stderr=json_output).print(
        "direct: the node's own Generate; floor: a benchmark-only relay with no logic "
        "(passthrough); routed: the coordinator; added = routed - direct, floor added = "
        "floor - direct (two more gRPC hops and nothing else)"
    )
    Console(stderr=json_output).print(
        f"coordinator CPU per routed request ({NEW_TOKENS} deltas relayed): "
        f"{result['coordinator_cpu_us_per_request']} µs; load average {result['load_average_before']} -> {result['load_average_after']}, "
        f"{result['cpu_count']} CPUs; placement {result['placement']}: coordinator and "
        f"floor relay on CPUs {result['relay_cpus']}, node and client on CPUs "
        f"{result['node_and_client_cpus']}"
    )


def plot(measured: Measured, result: dict[str, Any], path: Path) -> None:
    """TTFT distributions per path, and the per-round added latencies against targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in PATHS:
        values = sorted(v * 1e3 for v in measured.ttft_s[name])
        shares = [(i + 1) / len(values) for i in range(len(values))]
        left.plot(values, shares, label=f"{name} (p50 {result[f'{name}_ttft_ms_p50']:.2f} ms)")
    left.set_xscale("log")
    left.set_xlabel("time to first token, ms (log scale)")
    left.set_ylabel("share of requests")
    left.set_title("TTFT, all rounds")
    left.legend()
    left.grid(alpha=0.3)
    rounds = range(1, len(measured.rounds) + 1)
    for (key, limit), color in zip(TARGETS_MS.items(), ("C0", "C1", "C2"), strict=True):
        right.plot(rounds, [r[key] for r in measured.rounds], "o-", color=color, label=key)
        right.axhline(limit, color=color, linestyle="--", linewidth=1)
    right.plot(
        rounds,
        [r["floor_added_ttft_ms_p50"] for r in measured.rounds],
        "s:",
        color="gray",
        label="floor_added_ttft_ms_p50 (no-logic relay)",
    )
    right.axhline(0, color="black", linewidth=0.5)
    right.set_yscale("symlog", linthresh=1.0)
    right.set_xlabel("round")
    right.set_ylabel("routed (floor) - direct, ms")
    right.set_title("added latency per round (dashed: targets)")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    figure.suptitle(
        f"coordinator overhead, fake engine {TOKENS_PER_S:.0f} tok/s, {NEW_TOKENS} tokens/request"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", type=Path, help="save the figure here (PNG)")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument(
        "--placement",
        choices=PLACEMENTS,
        default="dedicated",
        help="dedicated: the relays on a CPU of their own (default); shared: no pinning",
    )
    args = parser.parse_args()
    measured, result = measure(args.rounds, args.placement)
    _print_table(result, json_output=True)
    if args.plot:
        plot(measured, result, args.plot)
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
