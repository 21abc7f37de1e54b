"""A simple node choice: which live nodes may serve a request, best first.

This is the placeholder for the full matcher (``coordinator/routing``: filter, score,
pick). It keeps the request's hard constraints (regions, price caps, only/ignore nodes)
and orders the rest by least load (running + waiting), ties by node id. The relay
depends only on :data:`ChooseNodes`, so the matcher can replace :func:`choose_nodes`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mercato.v1 import inference_pb2

from coordinator.market import MarketSnapshot, NodeView

ChooseNodes = Callable[
    [MarketSnapshot, str, inference_pb2.RoutingPreferences, int], Sequence[NodeView]
]
"""(snapshot, model, routing preferences, most candidates) -> candidates, best first."""


def eligible(node: NodeView, model: str, routing: inference_pb2.RoutingPreferences) -> bool:
    """Whether ``node`` serves ``model`` within the request's hard constraints."""
    terms = node.terms_for(model)
    if terms is None:
        return False
    if routing.regions and node.region not in routing.regions:
        return False
    if routing.only_nodes and node.node_id not in routing.only_nodes:
        return False
    if routing.ignore_nodes and node.node_id in routing.ignore_nodes:
        return False
    if (
        routing.HasField("max_price_input_micro_usd_per_mtok")
        and terms.price_input_micro_usd_per_mtok > routing.max_price_input_micro_usd_per_mtok
    ):
        return False
    return not (
        routing.HasField("max_price_output_micro_usd_per_mtok")
        and terms.price_output_micro_usd_per_mtok > routing.max_price_output_micro_usd_per_mtok
    )


def choose_nodes(
    snapshot: MarketSnapshot,
    model: str,
    routing: inference_pb2.RoutingPreferences,
    limit: int,
) -> list[NodeView]:
    """Eligible live nodes for ``model``, least loaded first, at most ``limit`` (1 when
    the request forbids fallbacks)."""
    if routing.HasField("allow_fallbacks") and not routing.allow_fallbacks:
        limit = 1
    candidates = [node for node in snapshot.serving(model) if eligible(node, model, routing)]
    candidates.sort(key=lambda node: (node.queued_requests, node.node_id))
    return candidates[:limit]
