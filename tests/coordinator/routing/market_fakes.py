"""Hand-built markets for routing tests, and an independent brute-force eligibility check."""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.routing import (
    DispatchOutcome,
    LoadReport,
    Market,
    MarketSnapshot,
    ModelTerms,
    NodeListing,
    NodeView,
    RouteRequest,
)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now_s: float = 1_000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


def listing(
    node_id: str,
    *,
    region: str = "eu-west",
    model: str = "m",
    price_input: int = 100,
    price_output: int = 200,
    context_length: int = 4096,
    max_concurrency: int = 4,
    extra_models: tuple[ModelTerms, ...] = (),
) -> NodeListing:
    """A listing serving ``model`` (plus ``extra_models``)."""
    return NodeListing(
        node_id=node_id,
        region=region,
        models=(ModelTerms(model, price_input, price_output, context_length), *extra_models),
        max_concurrency=max_concurrency,
        worker_address=f"127.0.0.1:{7000 + hash(node_id) % 1000}",
    )


@dataclass
class NodeSpec:
    """Everything about one synthetic node."""

    listing: NodeListing
    running: int = 0
    rtt_s: float | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    failures: int = 0


def build(specs: list[NodeSpec], clock: FakeClock | None = None) -> tuple[Market, FakeClock]:
    """A market holding ``specs``; failures are recorded as failed dispatches."""
    clock = clock or FakeClock()
    market = Market(clock=clock)
    for spec in specs:
        market.upsert_node(spec.listing)
        node_id = spec.listing.node_id
        if spec.running:
            market.update_load(node_id, LoadReport(running_requests=spec.running))
        if spec.rtt_s is not None:
            market.record_rtt(node_id, spec.rtt_s)
        if spec.ttft_s is not None:
            market.record_first_token(node_id, spec.ttft_s)
        if spec.tpot_s is not None:
            market.record_decode(node_id, 11, 10 * spec.tpot_s)
        for _ in range(spec.failures):
            market.dispatch_started(node_id)
            market.dispatch_finished(node_id, DispatchOutcome.FAILURE)
    return market, clock


def eligible(snapshot: MarketSnapshot, request: RouteRequest, now_s: float) -> list[NodeView]:
    """Every node that may serve ``request``, by brute force (independent of routing)."""
    prefs = request.preferences
    found: list[NodeView] = []
    for view in snapshot:
        terms = view.listing.terms_for(request.model)
        if terms is None:
            continue
        if prefs.regions and view.listing.region not in prefs.regions:
            continue
        if prefs.only_nodes and view.node_id not in prefs.only_nodes:
            continue
        if view.node_id in prefs.ignore_nodes | prefs.leased_nodes | request.exclude:
            continue
        cap_in = prefs.max_price_input_micro_usd_per_mtok
        cap_out = prefs.max_price_output_micro_usd_per_mtok
        if cap_in is not None and terms.price_input_micro_usd_per_mtok > cap_in:
            continue
        if cap_out is not None and terms.price_output_micro_usd_per_mtok > cap_out:
            continue
        if terms.context_length < request.input_tokens_floor + request.max_tokens:
            continue
        if now_s < view.breaker_open_until_s or view.probe_in_flight:
            continue
        if view.occupancy >= view.listing.max_concurrency:
            continue
        found.append(view)
    return found


def expected_cost(view: NodeView, request: RouteRequest) -> int:
    """input_tokens x input price + max_tokens x output price, for the request's model."""
    terms = view.listing.terms_for(request.model)
    assert terms is not None
    return (
        request.input_tokens * terms.price_input_micro_usd_per_mtok
        + request.max_tokens * terms.price_output_micro_usd_per_mtok
    )
