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
        (  # leased to others, and ignored too: the lease is named, it came first
            [NodeSpec(listing(n)) for n in "ab"],
            request(leased_nodes=frozenset("ab"), ignore_nodes=frozenset("a")),
            Constraint.LEASED,
            "all 2 live nodes serving 'm' are leased",
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


def test_only_nodes_never_lift_the_price_caps() -> None:
    """only_nodes narrows the market and never lifts a price cap: the named-nodes path
    checks both caps itself (a price equal to the cap is allowed), in every sort mode."""
    market, _ = build(
        [
            NodeSpec(listing("dear-in", price_input=301, price_output=100)),
            NodeSpec(listing("dear-out", price_input=100, price_output=301)),
            NodeSpec(listing("at-caps", price_input=300, price_output=300)),
        ]
    )
    snapshot = market.snapshot()
    for sort in SortMode:
        decision = route(
            snapshot,
            request(
                sort,
                only_nodes=frozenset({"dear-in", "dear-out", "at-caps"}),
                max_price_input_micro_usd_per_mtok=300,
                max_price_output_micro_usd_per_mtok=300,
            ),
            random.Random(0),
        )
        assert [c.node_id for c in decision.candidates] == ["at-caps"], sort


def test_throughput_mode_counts_load_and_ignores_claimed_speed() -> None:
    """Throughput score = measured time per token x (1 + utilization): load makes the
    faster node lose its lead, and a node's own claim of tokens/s plays no part."""
    market, _ = build(
        [
            NodeSpec(listing("busy"), tpot_s=0.010, running=3),  # 0.010 x 1.75
            NodeSpec(listing("idle"), tpot_s=0.012),
            NodeSpec(listing("claims"), tpot_s=0.030),
        ]
    )
    market.update_load("claims", LoadReport(output_tokens_per_s=100_000))
    decision = route(
        market.snapshot(),
        request(SortMode.THROUGHPUT),
        random.Random(0),
        pick_strategy=PickStrategy.BEST,
    )
    assert [c.node_id for c in decision.candidates] == ["idle", "busy", "claims"]
    scores = {c.node_id: c.score for c in decision.candidates}
    assert scores["busy"] == pytest.approx(0.0175)
    assert scores["claims"] == pytest.approx(0.030)


def test_balanced_mode_weighs_duration_load_and_unreliability() -> None:
    """Balanced score = cost / cheapest + duration / shortest + 6 x utilization + 4 x
    unreliability, duration = (TTFT + max_tokens x TPOT) x (1 + utilization). Equal
    prices here, so each node differs from "base" in one term only."""
    market, _ = build(
        [
            NodeSpec(listing("base"), ttft_s=0.1, tpot_s=0.01),  # duration 1.1
            NodeSpec(listing("loaded"), ttft_s=0.1, tpot_s=0.01, running=2),  # util 0.5
            NodeSpec(listing("flaky"), ttft_s=0.1, tpot_s=0.01, failures=1),  # reliability 2/3
            NodeSpec(listing("slow-decode"), ttft_s=0.05, tpot_s=0.02),  # duration 2.05
        ]
    )
    decision = route(
        market.snapshot(), request(), random.Random(0), pick_strategy=PickStrategy.BEST
    )
    assert decision.policy == "balanced"
    scores = {c.node_id: c.score for c in decision.candidates}
    assert scores["base"] == pytest.approx(2.0)
    assert scores["slow-decode"] == pytest.approx(1.0 + 2.05 / 1.1)
    assert scores["flaky"] == pytest.approx(2.0 + 4.0 / 3.0)
    assert scores["loaded"] == pytest.approx(1.0 + 1.5 + 6.0 * 0.5)
    assert [c.node_id for c in decision.candidates] == ["base", "slow-decode", "flaky", "loaded"]


def test_two_choices_keeps_a_burst_off_the_busier_of_equal_nodes() -> None:
    """Load-aware picking: price mode's score ignores load, so only power-of-two-choices
    steers a burst to the idle one of two equally cheap nodes (taking the best score
    with ties at random would send the busy one about half of it)."""
    market, _ = build([NodeSpec(listing("busy"), running=3), NodeSpec(listing("idle"))])
    snapshot = market.snapshot()
    rng = random.Random(1)
    picks = [route(snapshot, request(SortMode.PRICE), rng).pick.node_id for _ in range(100)]  # type: ignore[union-attr]
    assert picks.count("idle") == 100
    best = [
        route(snapshot, request(SortMode.PRICE), rng, pick_strategy=PickStrategy.BEST).pick.node_id  # type: ignore[union-attr]
        for _ in range(100)
    ]
    assert 0 < best.count("busy") < 100, "the baseline herds blindly; two choices does not"


def test_again_moves_delivered_tokens_into_the_prompt() -> None:
    """Router.again (failover and resume): the tokens already delivered join the prompt
    (so context length and cost are judged on what the next node really gets), fewer
    remain to generate, tried nodes are excluded, and the price caps become the first
    decision's price ceiling."""
    from coordinator.router import Routed, Router

    market, _ = build(
        [
            NodeSpec(listing("a", price_input=100, price_output=200)),
            NodeSpec(listing("b", price_input=150, price_output=250)),
        ]
    )
    first = request()
    decision = route(market.snapshot(), first, random.Random(0))
    again = Router.again(Routed(first, decision), 30, {"a"})
    assert (again.input_tokens, again.max_tokens) == (130, 70)
    assert again.exclude == frozenset({"a"})
    assert again.preferences.max_price_input_micro_usd_per_mtok == 150
    assert again.preferences.max_price_output_micro_usd_per_mtok == 250


@pytest.mark.parametrize("sort", list(SortMode))
def test_a_sole_eligible_node_is_the_pick_unscored(sort: SortMode) -> None:
    market, _ = build(
        [
            NodeSpec(listing("here", region="eu-west")),
            NodeSpec(listing("elsewhere", region="us-east")),
            NodeSpec(listing("full", region="eu-west", max_concurrency=1), running=1),
        ]
    )
    decision = route(
        market.snapshot(), request(sort, regions=frozenset({"eu-west"})), random.Random(0)
    )
    assert [(c.node_id, c.score) for c in decision.candidates] == [("here", 0.0)]
    assert decision.considered == 1 and decision.exact
    assert decision.policy == sort.value
    # With a second eligible node both are scored by the policy again.
    two = route(market.snapshot(), request(sort), random.Random(0))
    assert {c.node_id for c in two.candidates} == {"here", "elsewhere"}
    assert two.considered == 2
    assert all(c.score > 0 for c in two.candidates)
