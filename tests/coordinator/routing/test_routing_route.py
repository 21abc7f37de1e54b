from __future__ import annotations

import random

import pytest

from coordinator.routing import (
    Constraint,
    DispatchOutcome,
    LoadReport,
    PickStrategy,
    RouteRequest,
    RoutingConfig,
    RoutingPreferences,
    ScoringInput,
    SortMode,
    get_policy,
    policy_names,
    register_policy,
    route,
)

from .market_fakes import NodeSpec, build, expected_cost, listing


def request(sort: SortMode = SortMode.BALANCED, **prefs: object) -> RouteRequest:
    return RouteRequest(
        "m", input_tokens=100, max_tokens=100, preferences=RoutingPreferences(sort=sort, **prefs)
    )


def best_only() -> RoutingConfig:
    return RoutingConfig()


def test_price_mode_picks_the_cheapest_by_expected_cost() -> None:
    market, _ = build(
        [
            NodeSpec(listing("cheap-in", price_input=10, price_output=900)),
            NodeSpec(listing("cheap-out", price_input=900, price_output=10)),
            NodeSpec(listing("middle", price_input=300, price_output=300)),
        ]
    )
    input_heavy = RouteRequest("m", 3_000, 10, preferences=RoutingPreferences(sort=SortMode.PRICE))
    output_heavy = RouteRequest("m", 10, 3_000, preferences=RoutingPreferences(sort=SortMode.PRICE))
    snapshot = market.snapshot()
    for seed in range(20):
        assert route(snapshot, input_heavy, random.Random(seed)).pick.node_id == "cheap-in"  # type: ignore[union-attr]
        assert route(snapshot, output_heavy, random.Random(seed)).pick.node_id == "cheap-out"  # type: ignore[union-attr]


def test_latency_mode_uses_measured_ttft_not_claims() -> None:
    market, _ = build(
        [
            NodeSpec(listing("slow"), rtt_s=0.01, ttft_s=0.9),
            NodeSpec(listing("fast"), rtt_s=0.05, ttft_s=0.1),
            NodeSpec(listing("medium"), rtt_s=0.01, ttft_s=0.5),
        ]
    )
    # A node's own claim of tokens/s plays no part.
    market.update_load("slow", LoadReport(output_tokens_per_s=10_000))
    decision = route(market.snapshot(), request(SortMode.LATENCY), random.Random(0))
    assert decision.pick is not None and decision.pick.node_id == "fast"
    assert [c.node_id for c in decision.candidates] == ["fast", "medium", "slow"]


def test_throughput_mode_prefers_the_lowest_time_per_token() -> None:
    market, _ = build(
        [
            NodeSpec(listing("a"), tpot_s=0.05),
            NodeSpec(listing("b"), tpot_s=0.01),
            NodeSpec(listing("c"), tpot_s=0.08),
        ]
    )
    decision = route(market.snapshot(), request(SortMode.THROUGHPUT), random.Random(0))
    assert decision.pick is not None and decision.pick.node_id == "b"


def test_unmeasured_node_gets_the_peer_median_with_a_small_bonus() -> None:
    market, _ = build(
        [
            NodeSpec(listing("a"), rtt_s=0.01, ttft_s=0.2),
            NodeSpec(listing("b"), rtt_s=0.01, ttft_s=0.4),
            NodeSpec(listing("c"), rtt_s=0.01, ttft_s=0.6),
            NodeSpec(listing("new"), rtt_s=0.01),
        ]
    )
    decision = route(
        market.snapshot(),
        request(SortMode.LATENCY),
        random.Random(0),
        pick_strategy=PickStrategy.BEST,
    )
    scores = {c.node_id: c.score for c in decision.candidates}
    # median 0.4 (0.39 beyond the network + its own 0.01 RTT) x 0.9: between a and b.
    assert scores["new"] == pytest.approx(0.36)
    assert scores["a"] < scores["new"] < scores["b"]


def test_load_makes_the_best_node_lose_its_lead() -> None:
    market, _ = build(
        [
            NodeSpec(listing("a", max_concurrency=10), ttft_s=0.10, running=8),
            NodeSpec(listing("b", max_concurrency=10), ttft_s=0.12),
        ]
    )
    decision = route(
        market.snapshot(),
        request(SortMode.LATENCY),
        random.Random(0),
        pick_strategy=PickStrategy.BEST,
    )
    assert decision.pick is not None and decision.pick.node_id == "b"


def test_two_choices_spreads_a_burst_over_equal_nodes() -> None:
    market, _ = build([NodeSpec(listing(f"n{i}")) for i in range(8)])
    snapshot = market.snapshot()
    rng = random.Random(5)
    picks = {route(snapshot, request(SortMode.PRICE), rng).pick.node_id for _ in range(200)}  # type: ignore[union-attr]
    assert len(picks) == 8
    best = {
        route(snapshot, request(SortMode.PRICE), rng, pick_strategy=PickStrategy.BEST).pick.node_id  # type: ignore[union-attr]
        for _ in range(50)
    }
    assert len(best) > 1, "ties are broken at random even when always taking the best"


def test_allow_fallbacks_false_gives_one_candidate() -> None:
    market, _ = build([NodeSpec(listing(f"n{i}")) for i in range(5)])
    snapshot = market.snapshot()
    assert len(route(snapshot, request(), random.Random(0)).candidates) == 5
    one = route(snapshot, request(allow_fallbacks=False), random.Random(0))
    assert len(one.candidates) == 1 and one.fallbacks == ()


def test_max_candidates_bounds_the_fallbacks() -> None:
    market, _ = build([NodeSpec(listing(f"n{i}")) for i in range(20)])
    decision = route(
        market.snapshot(), request(), random.Random(0), config=RoutingConfig(max_candidates=3)
    )
    assert len(decision.candidates) == 3
    assert len({c.node_id for c in decision.candidates}) == 3


@pytest.mark.parametrize(
    ("specs", "req", "constraint", "fragment"),
    [
        ([], request(), Constraint.MODEL, "no live node serves model 'm'"),
        (
            [NodeSpec(listing("a", region="us-east"))],
            request(regions=frozenset({"eu-west"})),
            Constraint.REGIONS,
            "no live node in regions [eu-west] serves model 'm' (it is served in: us-east)",
        ),
        (
            [NodeSpec(listing("a"))],
            request(only_nodes=frozenset({"zz"})),
            Constraint.ONLY_NODES,
            "only_nodes",
        ),
        (
            [NodeSpec(listing("a"))],
            request(ignore_nodes=frozenset({"a"})),
            Constraint.IGNORE_NODES,
            "ignore_nodes",
        ),
        (
            [NodeSpec(listing(n, price_input=500)) for n in "abc"],
            request(max_price_input_micro_usd_per_mtok=100),
            Constraint.MAX_PRICE_INPUT,
            "all 3 nodes serving 'm' are above max_price_input_micro_usd_per_mtok=100 (cheapest: 500)",
        ),
        (
            [NodeSpec(listing(n, price_output=900, region="eu-west")) for n in "abc"],
            request(regions=frozenset({"eu-west"}), max_price_output_micro_usd_per_mtok=100),
            Constraint.MAX_PRICE_OUTPUT,
            "all 3 nodes serving 'm' in regions [eu-west] are above max_price_output_micro_usd_per_mtok=100",
        ),
        (
            [NodeSpec(listing("a", context_length=20))],
            request(),
            Constraint.CONTEXT_LENGTH,
            "context length",
        ),
        (
            [NodeSpec(listing("a", max_concurrency=2), running=2)],
            request(),
            Constraint.AT_CAPACITY,
            "at capacity",
        ),
        ([NodeSpec(listing("a"), failures=3)], request(), Constraint.CIRCUIT_OPEN, "circuit open"),
    ],
)
def test_empty_decision_names_the_constraint(
    specs: list[NodeSpec], req: RouteRequest, constraint: Constraint, fragment: str
) -> None:
    market, _ = build(specs)
    decision = route(market.snapshot(), req, random.Random(0))
    assert decision.candidates == () and decision.pick is None
    assert decision.empty_reason is not None
    assert decision.empty_reason.constraint is constraint
    assert fragment in decision.empty_reason.message


def test_failover_walks_every_node_then_says_all_were_tried() -> None:
    market, _ = build(
        [NodeSpec(listing(f"n{i}", region="eu-west")) for i in range(4)]
        + [NodeSpec(listing("far", region="us-east"))]
    )
    snapshot = market.snapshot()
    req = request(regions=frozenset({"eu-west"}))
    tried: list[str] = []
    rng = random.Random(1)
    while (decision := route(snapshot, req.excluding(tried), rng)).pick is not None:
        tried.append(decision.pick.node_id)
    assert sorted(tried) == ["n0", "n1", "n2", "n3"]
    assert decision.empty_reason is not None
    assert decision.empty_reason.constraint is Constraint.ALREADY_TRIED


def test_breaker_open_node_is_skipped_until_its_backoff_ends() -> None:
    market, clock = build(
        [
            NodeSpec(listing("bad", price_output=1), failures=3),
            NodeSpec(listing("ok", price_output=999)),
        ]
    )
    req = request(SortMode.PRICE)
    assert route(market.snapshot(), req, random.Random(0)).pick.node_id == "ok"  # type: ignore[union-attr]
    clock.advance(60.0)
    assert route(market.snapshot(), req, random.Random(0)).pick.node_id == "bad"  # type: ignore[union-attr]
    market.dispatch_started("bad")  # the half-open probe: nothing else meanwhile
    assert route(market.snapshot(), req, random.Random(0)).pick.node_id == "ok"  # type: ignore[union-attr]
    market.dispatch_finished("bad", DispatchOutcome.SUCCESS)
    assert route(market.snapshot(), req, random.Random(0)).pick.node_id == "bad"  # type: ignore[union-attr]


def test_sampling_large_buckets_is_reported_and_still_exact_for_price() -> None:
    specs = [
        NodeSpec(listing(f"n{i:03d}", price_input=1000 - i, price_output=7 * i % 1000))
        for i in range(300)
    ]
    market, _ = build(specs)
    snapshot = market.snapshot()
    sampled = route(
        snapshot, request(SortMode.LATENCY), random.Random(0), config=RoutingConfig(sample_size=16)
    )
    assert not sampled.exact and sampled.considered <= 16
    req = request(SortMode.PRICE)
    cheapest = min(expected_cost(v, req) for v in snapshot)
    decision = route(snapshot, req, random.Random(0), pick_strategy=PickStrategy.BEST)
    assert decision.exact
    assert expected_cost(decision.pick.view, req) == cheapest  # type: ignore[union-attr]


def test_policies_register_by_name() -> None:
    assert set(policy_names()) >= {"balanced", "price", "latency", "throughput"}
    with pytest.raises(ValueError, match="unknown scoring policy 'nope'"):
        get_policy("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_policy("price", near_best_slack=0.0)(lambda inputs: [])

    def by_id(inputs: ScoringInput) -> list[float]:
        return [float(v.node_id == "z") for v in inputs.views]

    if "test-by-id" not in policy_names():
        register_policy("test-by-id", near_best_slack=0.0)(by_id)
    assert get_policy("test-by-id").score is by_id
