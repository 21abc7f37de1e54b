"""Property tests on synthetic markets: hard constraints hold in every sort mode, on
fallback and on resume; same seed, same decision; empty exactly when nobody is eligible."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.routing import (
    Constraint,
    ModelTerms,
    NodeListing,
    PickStrategy,
    RouteRequest,
    RoutingConfig,
    RoutingDecision,
    RoutingPreferences,
    SortMode,
    get_policy,
    route,
)

from .market_fakes import FakeClock, NodeSpec, build, eligible, expected_cost

REGIONS = ("eu-west", "us-east", "ap-south")
MODELS = ("m1", "m2")
PRICES = st.sampled_from((0, 100, 100, 200, 300, 500))  # repeats make ties common

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def node_specs(draw: st.DrawFn, node_id: str) -> NodeSpec:
    models = draw(st.lists(st.sampled_from(MODELS), min_size=1, max_size=2, unique=True))
    max_concurrency = draw(st.integers(1, 4))
    measured = draw(st.booleans())
    return NodeSpec(
        listing=NodeListing(
            node_id=node_id,
            region=draw(st.sampled_from(REGIONS)),
            models=tuple(
                ModelTerms(m, draw(PRICES), draw(PRICES), draw(st.sampled_from((64, 4096))))
                for m in models
            ),
            max_concurrency=max_concurrency,
        ),
        running=draw(st.integers(0, max_concurrency)),
        rtt_s=draw(st.floats(0.001, 0.2)) if measured else None,
        ttft_s=draw(st.floats(0.05, 2.0)) if measured else None,
        tpot_s=draw(st.floats(0.005, 0.1)) if draw(st.booleans()) else None,
        failures=draw(st.sampled_from((0, 0, 0, 1, 3))),
    )


@st.composite
def markets(draw: st.DrawFn) -> list[NodeSpec]:
    count = draw(st.integers(0, 40))
    return [draw(node_specs(f"n{i:02d}")) for i in range(count)]


@st.composite
def requests(draw: st.DrawFn, node_ids: list[str]) -> RouteRequest:
    ids = st.sampled_from([*node_ids, "ghost"])
    caps = st.none() | st.sampled_from((0, 100, 200, 300))
    return RouteRequest(
        model=draw(st.sampled_from((*MODELS, "m3"))),
        input_tokens=draw(st.integers(0, 200)),
        max_tokens=draw(st.integers(1, 500)),
        preferences=RoutingPreferences(
            regions=frozenset(draw(st.lists(st.sampled_from(REGIONS), max_size=2))),
            max_price_input_micro_usd_per_mtok=draw(caps),
            max_price_output_micro_usd_per_mtok=draw(caps),
            sort=draw(st.sampled_from(list(SortMode))),
            allow_fallbacks=draw(st.booleans()),
            only_nodes=frozenset(draw(st.lists(ids, max_size=6)))
            if draw(st.integers(0, 4)) == 0
            else frozenset(),
            ignore_nodes=frozenset(draw(st.lists(ids, max_size=3))),
            leased_nodes=frozenset(draw(st.lists(ids, max_size=3))),
        ),
        exclude=frozenset(draw(st.lists(ids, max_size=4))),
    )


configs = st.builds(
    RoutingConfig,
    sample_size=st.integers(1, 50),
    price_pool_size=st.integers(1, 20),
    near_best_max=st.integers(1, 5),
    max_candidates=st.integers(1, 6),
)


def assert_hard_constraints(decision: RoutingDecision, request: RouteRequest) -> None:
    prefs = request.preferences
    for candidate in decision.candidates:
        listing = candidate.view.listing
        terms = listing.terms_for(request.model)
        assert terms is not None
        assert not prefs.regions or listing.region in prefs.regions
        cap_in = prefs.max_price_input_micro_usd_per_mtok
        cap_out = prefs.max_price_output_micro_usd_per_mtok
        assert cap_in is None or terms.price_input_micro_usd_per_mtok <= cap_in
        assert cap_out is None or terms.price_output_micro_usd_per_mtok <= cap_out
        assert candidate.price_input_micro_usd_per_mtok == terms.price_input_micro_usd_per_mtok
        assert candidate.price_output_micro_usd_per_mtok == terms.price_output_micro_usd_per_mtok
        assert not prefs.only_nodes or listing.node_id in prefs.only_nodes
        assert listing.node_id not in prefs.ignore_nodes
        assert listing.node_id not in prefs.leased_nodes
        assert listing.node_id not in request.exclude


@SETTINGS
@given(
    data=st.data(),
    specs=markets(),
    config=configs,
    cooled=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_decisions_respect_every_constraint(
    data: st.DataObject, specs: list[NodeSpec], config: RoutingConfig, cooled: bool, seed: int
) -> None:
    clock = FakeClock()
    market, _ = build(specs, clock)
    if cooled:
        clock.advance(300.0)  # every breaker is half-open: one probe each
    snapshot = market.snapshot()
    request = data.draw(requests([s.listing.node_id for s in specs]))
    decision = route(snapshot, request, random.Random(seed), config=config)
    allowed = {v.node_id for v in eligible(snapshot, request, clock.now_s)}

    assert_hard_constraints(decision, request)
    assert {c.node_id for c in decision.candidates} <= allowed
    assert len({c.node_id for c in decision.candidates}) == len(decision.candidates)
    assert len(decision.candidates) <= (
        config.max_candidates if request.preferences.allow_fallbacks else 1
    )
    assert (decision.pick is None) == (not allowed), "empty exactly when nobody is eligible"
    assert (decision.empty_reason is None) == bool(decision.candidates)
    if decision.empty_reason is not None and request.model == "m3":
        assert decision.empty_reason.constraint is Constraint.MODEL


@SETTINGS
@given(data=st.data(), specs=markets(), config=configs, seed=st.integers(0, 2**32))
def test_same_seed_same_decision(
    data: st.DataObject, specs: list[NodeSpec], config: RoutingConfig, seed: int
) -> None:
    market, _ = build(specs)
    snapshot = market.snapshot()
    request = data.draw(requests([s.listing.node_id for s in specs]))
    first = route(snapshot, request, random.Random(seed), config=config)
    again = route(snapshot, request, random.Random(seed), config=config)
    assert [(c.node_id, c.score) for c in first.candidates] == [
        (c.node_id, c.score) for c in again.candidates
    ]
    assert first.empty_reason == again.empty_reason


@SETTINGS
@given(data=st.data(), specs=markets(), config=configs, seed=st.integers(0, 2**32))
def test_failover_and_resume_never_leave_the_constraints(
    data: st.DataObject, specs: list[NodeSpec], config: RoutingConfig, seed: int
) -> None:
    """Route, fail, route again excluding what was tried (as failover and stream resume
    do) until nothing is left: every attempt keeps the hard constraints, none repeats,
    and every eligible node gets its turn."""
    clock = FakeClock()
    market, _ = build(specs, clock)
    snapshot = market.snapshot()
    request = data.draw(requests([s.listing.node_id for s in specs]))
    allowed = {v.node_id for v in eligible(snapshot, request, clock.now_s)}
    rng = random.Random(seed)
    tried: list[str] = []
    while True:
        attempt = request.excluding(tried)
        decision = route(snapshot, attempt, rng, config=config)
        assert_hard_constraints(decision, request)
        assert_hard_constraints(decision, attempt)
        for fallback in decision.fallbacks:
            assert fallback.node_id in allowed
        if decision.pick is None:
            break
        assert decision.pick.node_id not in tried
        tried.append(decision.pick.node_id)
    assert set(tried) == allowed
    if allowed:
        # Hard constraints left someone: what ended the walk is a per-attempt one.
        assert decision.empty_reason is not None
        assert decision.empty_reason.constraint in {
            Constraint.ALREADY_TRIED,
            Constraint.CIRCUIT_OPEN,
            Constraint.AT_CAPACITY,
        }


@SETTINGS
@given(data=st.data(), specs=markets(), config=configs, seed=st.integers(0, 2**32))
def test_price_mode_finds_the_exact_cheapest(
    data: st.DataObject, specs: list[NodeSpec], config: RoutingConfig, seed: int
) -> None:
    market, clock = build(specs)
    snapshot = market.snapshot()
    drawn = data.draw(requests([s.listing.node_id for s in specs]))
    prefs = drawn.preferences
    request = RouteRequest(
        drawn.model,
        drawn.input_tokens,
        drawn.max_tokens,
        RoutingPreferences(
            regions=prefs.regions,
            max_price_input_micro_usd_per_mtok=prefs.max_price_input_micro_usd_per_mtok,
            max_price_output_micro_usd_per_mtok=prefs.max_price_output_micro_usd_per_mtok,
            sort=SortMode.PRICE,
            ignore_nodes=prefs.ignore_nodes,
            leased_nodes=prefs.leased_nodes,
        ),
        drawn.exclude,
    )
    allowed = eligible(snapshot, request, clock.now_s)
    best = route(
        snapshot, request, random.Random(seed), config=config, pick_strategy=PickStrategy.BEST
    )
    spread = route(snapshot, request, random.Random(seed), config=config)
    if not allowed:
        assert best.pick is None and spread.pick is None
        return
    cheapest = min(expected_cost(v, request) for v in allowed)
    assert best.pick is not None and expected_cost(best.pick.view, request) == cheapest
    slack = get_policy("price").near_best_slack
    assert spread.pick is not None
    assert expected_cost(spread.pick.view, request) <= cheapest * (1 + slack)
