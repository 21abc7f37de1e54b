"""ListModels and ListNodes answers, read from the routing market's snapshot.

ListNodes reports what the coordinator itself measured of each node (heartbeat ping
round trip, time to first token, time per output token, recent failures, whether its
circuit breaker keeps it out), never what a node claims about itself.
"""

from __future__ import annotations

from collections.abc import Callable

from mercato.v1 import inference_pb2

from coordinator.registry import NodeRegistry
from coordinator.routing import BreakerState, MarketSnapshot, ModelTerms


def list_models(snapshot: MarketSnapshot) -> inference_pb2.ListModelsResponse:
    """Aggregate the live offers per model, sorted by model."""
    by_model: dict[str, list[tuple[str, ModelTerms]]] = {}
    for view in snapshot:
        for terms in view.listing.models:
            by_model.setdefault(terms.model, []).append((view.region, terms))
    response = inference_pb2.ListModelsResponse()
    for model in sorted(by_model):
        offers = by_model[model]
        response.models.append(
            inference_pb2.ModelInfo(
                model=model,
                nodes=len(offers),
                regions=sorted({region for region, _ in offers}),
                min_price_input_micro_usd_per_mtok=min(
                    t.price_input_micro_usd_per_mtok for _, t in offers
                ),
                min_price_output_micro_usd_per_mtok=min(
                    t.price_output_micro_usd_per_mtok for _, t in offers
                ),
                context_length=min(t.context_length for _, t in offers),
            )
        )
    return response


def list_nodes(
    registry: NodeRegistry,
    model: str = "",
    *,
    is_leased: Callable[[str], bool] | None = None,
) -> inference_pb2.ListNodesResponse:
    """Every live node (serving ``model``, if given) with its offer, load and what the
    coordinator measured of it, and whether a lease holds it (``is_leased``, from
    billing); sorted by node id."""
    market = registry.market
    response = inference_pb2.ListNodesResponse()
    for view in registry.snapshot():  # in node id order
        if model and view.listing.terms_for(model) is None:
            continue
        offer = registry.offer(view.node_id)
        if offer is None:
            continue
        info = response.nodes.add(
            node_id=view.node_id,
            in_flight_requests=view.in_flight,
            leased=is_leased is not None and is_leased(view.node_id),
        )
        info.offer.ParseFromString(offer.offer_bytes)
        load = view.load
        info.load.running_requests = load.running_requests
        info.load.waiting_requests = load.waiting_requests
        info.load.kv_cache_usage_permille = load.kv_cache_usage_permille
        info.load.output_tokens_per_s = load.output_tokens_per_s
        measured = info.measurements
        measured.rtt_us = _micros(view.rtt_s)
        measured.ttft_us = _micros(view.ttft_s)
        measured.tpot_us = _micros(view.tpot_s)
        measurements = market.measurements(view.node_id)
        if measurements is not None:
            outcomes = measurements.outcomes
            measured.recent_failures = round(max(0.0, outcomes.weight - outcomes.sum))
        measured.backed_off = market.breaker_state(view.node_id) is BreakerState.OPEN
    return response


def _micros(seconds: float | None) -> int:
    return 0 if seconds is None else min(2**32 - 1, max(0, round(seconds * 1_000_000)))
