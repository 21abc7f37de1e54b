"""`mercato bench spread`: how evenly a burst of requests spreads over 1,000 nodes.

The metric is max over mean queue depth (requests running or waiting on a node) at the
end of the burst, for three pickers over the same market and the same burst:

- ``policy``: routing as shipped (balanced scoring, power of two choices among the
  near-best of a sampled candidate set);
- ``random``: a uniformly random eligible node;
- ``best``: always the single best-scored node, every node scored (no sampling).

The simulation, honestly described:

- 1,000 nodes serve one model, each at most 16 requests at once (the rest wait, FIFO).
  They differ as real providers do: RTT 5-120 ms, prefill 50-400 ms, 15-60 ms per output
  token, prices spread log-normally. A request occupies its node for TTFT + output tokens
  x time per token (64-256 tokens), i.e. seconds, so a 2-second burst mostly piles up.
- Four coordinators share the fleet, each routing a quarter of the burst on its own
  market (as several coordinators behind one address would). Each knows its own
  dispatches at once (its in-flight counts) but learns the others' only from node
  heartbeats, once a second per node (staggered). Latency statistics are pre-measured.
  That staleness is what makes "always best" herd: every coordinator sends its share to
  the same top nodes until a heartbeat or capacity stops it.
- The burst: 8,000 requests arriving uniformly at random over 2 seconds.

Deterministic (seeded); about 20-40 s on two cores, mostly the exact scoring of "best".
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field
from typing import Any

from coordinator.routing import (
    DispatchOutcome,
    LoadReport,
    Market,
    ModelTerms,
    NodeListing,
    PickStrategy,
    RouteRequest,
    RoutingConfig,
    RoutingPreferences,
    route,
)

__all__ = ["SimulationResult", "run", "simulate"]

NODES = 1_000
COORDINATORS = 4
BURST_REQUESTS = 8_000
BURST_S = 2.0
HEARTBEAT_INTERVAL_S = 1.0
MAX_CONCURRENCY = 16
MODEL = "sim-model"
MAX_TOKENS = 256


@dataclass
class _Node:
    node_id: str
    rtt_s: float
    ttft_s: float
    tpot_s: float
    running: int = 0
    waiting: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class SimulationResult:
    """Queue depths at the end of the burst."""

    max_depth: int
    mean_depth: float
    unroutable: int

    @property
    def spread(self) -> float:
        """Max over mean queue depth (1.0 = perfectly even)."""
        return self.max_depth / self.mean_depth


class _Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def simulate(strategy: PickStrategy, config: RoutingConfig, seed: int = 11) -> SimulationResult:
    """Run the burst with one picker; the market and burst depend only on ``seed``."""
    rng = random.Random(seed)
    clock = _Clock()
    markets = [Market(clock=clock) for _ in range(COORDINATORS)]
    nodes: list[_Node] = []
    for n in range(NODES):
        rtt_s = rng.uniform(0.005, 0.12)
        node = _Node(
            node_id=f"sim-{n:04d}",
            rtt_s=rtt_s,
            ttft_s=rtt_s + rng.uniform(0.05, 0.4),
            tpot_s=rng.uniform(0.015, 0.06),
        )
        nodes.append(node)
        listing = NodeListing(
            node_id=node.node_id,
            region=f"region-{n % 10}",
            models=(
                ModelTerms(
                    MODEL,
                    int(100_000 * math.exp(rng.gauss(0, 0.3))),
                    int(300_000 * math.exp(rng.gauss(0, 0.3))),
                    8192,
                ),
            ),
            max_concurrency=MAX_CONCURRENCY,
        )
        for market in markets:
            market.upsert_node(listing)
            market.record_rtt(node.node_id, node.rtt_s)
            market.record_first_token(node.node_id, node.ttft_s)
            market.record_decode(node.node_id, 101, 100 * node.tpot_s)
    by_id = {node.node_id: node for node in nodes}

    # Events: (time, sequence, kind, payload).
    events: list[tuple[float, int, str, Any]] = []
    sequence = 0

    def push(at_s: float, kind: str, payload: Any) -> None:
        nonlocal sequence
        sequence += 1
        heapq.heappush(events, (at_s, sequence, kind, payload))

    for i in range(BURST_REQUESTS):
        push(rng.uniform(0.0, BURST_S), "arrive", i)
    for node in nodes:
        push(rng.uniform(0.0, HEARTBEAT_INTERVAL_S), "heartbeat", node.node_id)
    push(BURST_S, "measure", None)

    route_rng = random.Random(seed + 1)
    work_rng = random.Random(seed + 2)
    owner: dict[int, int] = {}
    unroutable = 0
    result: SimulationResult | None = None

    def start(node: _Node, request_id: int, output_tokens: float) -> None:
        node.running += 1
        push(clock.now_s + node.ttft_s + output_tokens * node.tpot_s, "finish", (node, request_id))

    while events and result is None:
        at_s, _, kind, payload = heapq.heappop(events)
        clock.now_s = at_s
        if kind == "arrive":
            coordinator = payload % COORDINATORS
            market = markets[coordinator]
            request = RouteRequest(
                MODEL,
                input_tokens=work_rng.randint(100, 1000),
                max_tokens=MAX_TOKENS,
                preferences=RoutingPreferences(),
            )
            decision = route(
                market.snapshot(), request, route_rng, config=config, pick_strategy=strategy
            )
            if decision.pick is None:
                unroutable += 1
                continue
            node = by_id[decision.pick.node_id]
            market.dispatch_started(node.node_id)
            owner[payload] = coordinator
            output_tokens = work_rng.randint(64, MAX_TOKENS)
            if node.running < MAX_CONCURRENCY:
                start(node, payload, output_tokens)
            else:
                node.waiting.append((payload, output_tokens))
        elif kind == "finish":
            node, request_id = payload
            node.running -= 1
            markets[owner.pop(request_id)].dispatch_finished(node.node_id, DispatchOutcome.SUCCESS)
            if node.waiting:
                next_id, output_tokens = node.waiting.pop(0)
                start(node, next_id, output_tokens)
        elif kind == "heartbeat":
            node = by_id[payload]
            load = LoadReport(running_requests=node.running, waiting_requests=len(node.waiting))
            for market in markets:
                market.update_load(node.node_id, load)
            push(at_s + HEARTBEAT_INTERVAL_S, "heartbeat", payload)
        elif kind == "measure":
            depths = [node.running + len(node.waiting) for node in nodes]
            result = SimulationResult(max(depths), sum(depths) / len(depths), unroutable)
    assert result is not None
    return result


def run(json_output: bool) -> dict[str, Any]:
    """Simulate the burst with each picker; print a table; return the numbers."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=json_output)
    pickers = {
        "policy": (PickStrategy.TWO_CHOICES, RoutingConfig()),
        "random": (PickStrategy.RANDOM, RoutingConfig()),
        # Every node scored, so "best" is the true best, not the best of a sample.
        "best": (PickStrategy.BEST, RoutingConfig(sample_size=NODES)),
    }
    results: dict[str, SimulationResult] = {}
    for name, (strategy, config) in pickers.items():
        console.print(f"simulating the burst with picker {name!r}...")
        results[name] = simulate(strategy, config)
    table = Table(title=f"{BURST_REQUESTS:,} requests in {BURST_S:g} s over {NODES:,} nodes")
    for column in ("picker", "max depth", "mean depth", "max / mean", "unroutable"):
        table.add_column(column, justify="right")
    for name, r in results.items():
        table.add_row(
            name, str(r.max_depth), f"{r.mean_depth:.2f}", f"{r.spread:.2f}", str(r.unroutable)
        )
    console.print(table)
    return {
        "spread_policy": round(results["policy"].spread, 3),
        "spread_random": round(results["random"].spread, 3),
        "spread_best": round(results["best"].spread, 3),
        "spread_nodes": NODES,
        "spread_burst_requests": BURST_REQUESTS,
        "spread_burst_s": BURST_S,
        "spread_coordinators": COORDINATORS,
    }
