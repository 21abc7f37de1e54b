"""Which nodes may serve a request, and, when none may, which constraint emptied the list.

Hard constraints (never relaxed, not on fallback, not on resume): model, regions,
only_nodes, nodes held by other clients' leases, ignore_nodes, the two price caps, the
context length. Per-attempt
constraints: nodes already tried for this request (``RouteRequest.exclude``), nodes whose
breaker is open (or whose half-open probe is out), nodes at capacity.

:class:`Eligibility` is the fast per-request check used while routing; :func:`diagnose`
is the slow, exact explanation run only when routing found no node: it applies the
constraints one at a time, in the order of :class:`Constraint`, and names the first that
leaves nobody.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.routing.node_view import NodeView
from coordinator.routing.request import RouteRequest
from coordinator.routing.snapshot import MarketSnapshot

__all__ = ["Constraint", "Eligibility", "EmptyReason", "diagnose"]


class Constraint(enum.Enum):
    """A reason a node may not serve a request, in the order diagnose applies them."""

    # No live node serves the model at all.
    MODEL = "model"
    # The model is served, but not in the allowed regions.
    REGIONS = "regions"
    # None of only_nodes serves the model (in the allowed regions).
    ONLY_NODES = "only_nodes"
    # Every remaining node is held by a dedicated lease the request is not under.
    LEASED = "leased"
    # Every remaining node is in ignore_nodes.
    IGNORE_NODES = "ignore_nodes"
    # Every remaining node charges more than max_price_input_micro_usd_per_mtok.
    MAX_PRICE_INPUT = "max_price_input_micro_usd_per_mtok"
    # Every remaining node charges more than max_price_output_micro_usd_per_mtok.
    MAX_PRICE_OUTPUT = "max_price_output_micro_usd_per_mtok"
    # The prompt plus max_tokens does not fit any remaining node's context length.
    CONTEXT_LENGTH = "context_length"
    # Every remaining node was already tried for this request (failover, resume).
    ALREADY_TRIED = "already_tried"
    # Every remaining node is failing: its circuit breaker is open (or probing).
    CIRCUIT_OPEN = "circuit_open"
    # Every remaining node is at its max concurrency.
    AT_CAPACITY = "at_capacity"


@dataclass(frozen=True, slots=True)
class EmptyReason:
    """Why no node can serve a request; ``message`` is for a person and names the fix."""

    # The constraint that emptied the candidate list.
    constraint: Constraint
    # What happened and what to change, e.g. "all 3 nodes ... are above max_price_output...".
    message: str
    # Nodes that passed every constraint before this one.
    nodes_before: int


class Eligibility:
    """The per-request check of everything but model and region (the index gives those)."""

    __slots__ = (
        "max_price_input",
        "max_price_output",
        "min_context_length",
        "now_s",
        "only",
        "skip",
    )

    def __init__(self, request: RouteRequest, now_s: float) -> None:
        prefs = request.preferences
        skip = request.exclude  # most requests: all three empty, no set built
        if prefs.ignore_nodes:
            skip = skip | prefs.ignore_nodes
        if prefs.leased_nodes:
            skip = skip | prefs.leased_nodes
        self.skip = skip
        self.only = prefs.only_nodes
        self.max_price_input = (
            math.inf
            if prefs.max_price_input_micro_usd_per_mtok is None
            else prefs.max_price_input_micro_usd_per_mtok
        )
        self.max_price_output = (
            math.inf
            if prefs.max_price_output_micro_usd_per_mtok is None
            else prefs.max_price_output_micro_usd_per_mtok
        )
        # The prompt plus max_tokens must fit, as the node checks.
        self.min_context_length = request.context_needed
        self.now_s = now_s

    def admits(
        self, view: NodeView, price_input: int, price_output: int, context_length: int
    ) -> bool:
        """Whether ``view`` (with its terms for the request's model) may serve now."""
        node_id = view.node_id
        return (
            price_input <= self.max_price_input
            and price_output <= self.max_price_output
            and context_length >= self.min_context_length
            and node_id not in self.skip
            and (not self.only or node_id in self.only)
            and view.occupancy < view.max_concurrency
            and self.now_s >= view.breaker_open_until_s
            and not view.probe_in_flight
        )


_Row = tuple[NodeView, int, int, int]


def diagnose(snapshot: MarketSnapshot, request: RouteRequest, now_s: float) -> EmptyReason:
    """The first constraint, in :class:`Constraint` order, that leaves no node.

    Exact and O(nodes serving the model in the allowed regions): call it only after
    routing came back empty. If every constraint leaves someone (routing and this check
    disagree, which should not happen), the reason is AT_CAPACITY with the count.
    """
    prefs = request.preferences
    model = request.model
    if not len(snapshot.index_for(model)):
        served = snapshot.models()
        listed = ", ".join(served[:8]) + (", ..." if len(served) > 8 else "")
        return EmptyReason(
            Constraint.MODEL,
            f"no live node serves model '{model}'"
            + (f" (models served now: {listed})" if served else " (no node is live)"),
            0,
        )
    regions = sorted(prefs.regions)
    if regions:
        indexes = [snapshot.index_for(model, region) for region in regions]
        where = f" in regions [{', '.join(regions)}]"
    else:
        indexes = [snapshot.index_for(model)]
        where = ""
    rows: list[_Row] = [
        (snapshot.view(slot), price_input, price_output, context_length)
        for index in indexes
        for slot, price_input, price_output, context_length in index.by_output
    ]
    if not rows:
        return EmptyReason(
            Constraint.REGIONS,
            f"no live node{where} serves model '{model}' "
            f"(it is served in: {', '.join(snapshot.regions_for(model))}); "
            "allow another region in routing.regions",
            len(snapshot.index_for(model)),
        )
    what = f"nodes serving '{model}'{where}"
    cap_in = prefs.max_price_input_micro_usd_per_mtok
    cap_out = prefs.max_price_output_micro_usd_per_mtok
    stages: list[tuple[Constraint, Callable[[_Row], bool], Callable[[list[_Row]], str]]] = [
        (
            Constraint.ONLY_NODES,
            lambda r: not prefs.only_nodes or r[0].node_id in prefs.only_nodes,
            lambda before: (
                f"none of the {len(prefs.only_nodes)} node ids in only_nodes is among the "
                f"{len(before)} live {what}"
            ),
        ),
        (
            Constraint.LEASED,
            lambda r: r[0].node_id not in prefs.leased_nodes,
            lambda before: (
                f"all {len(before)} live {what} are leased (dedicated to the clients who "
                "leased them); retry later, or lease a free node of your own"
            ),
        ),
        (
            Constraint.IGNORE_NODES,
            lambda r: r[0].node_id not in prefs.ignore_nodes,
            lambda before: f"all {len(before)} live {what} are in ignore_nodes",
        ),
        (
            Constraint.MAX_PRICE_INPUT,
            lambda r: cap_in is None or r[1] <= cap_in,
            lambda before: (
                f"all {len(before)} {what} are above max_price_input_micro_usd_per_mtok="
                f"{cap_in} (cheapest: {min(r[1] for r in before)})"
            ),
        ),
        (
            Constraint.MAX_PRICE_OUTPUT,
            lambda r: cap_out is None or r[2] <= cap_out,
            lambda before: (
                f"all {len(before)} {what} are above max_price_output_micro_usd_per_mtok="
                f"{cap_out} (cheapest: {min(r[2] for r in before)})"
            ),
        ),
        (
            Constraint.CONTEXT_LENGTH,
            lambda r: r[3] >= request.context_needed,
            lambda before: (
                f"the prompt (at least {request.input_tokens_floor} tokens) plus max_tokens "
                f"({request.max_tokens}) does not fit the context length of any of the "
                f"{len(before)} eligible {what} (largest: {max(r[3] for r in before)})"
            ),
        ),
        (
            Constraint.ALREADY_TRIED,
            lambda r: r[0].node_id not in request.exclude,
            lambda before: f"all {len(before)} eligible {what} were already tried for this request",
        ),
        (
            Constraint.CIRCUIT_OPEN,
            lambda r: r[0].breaker_allows(now_s),
            lambda before: (
                f"all {len(before)} eligible {what} are failing (circuit open); the first "
                f"may be retried in {_soonest_retry_s(before, now_s):.1f} s"
            ),
        ),
        (
            Constraint.AT_CAPACITY,
            lambda r: r[0].has_capacity(),
            lambda before: f"all {len(before)} eligible {what} are at capacity; retry shortly",
        ),
    ]
    for constraint, keep, explain in stages:
        kept = [row for row in rows if keep(row)]
        if not kept:
            return EmptyReason(constraint, explain(rows), len(rows))
        rows = kept
    return EmptyReason(
        Constraint.AT_CAPACITY,
        f"{len(rows)} eligible {what} became busy while routing; retry shortly",
        len(rows),
    )


def _soonest_retry_s(rows: list[_Row], now_s: float) -> float:
    waits = [max(0.0, r[0].breaker_open_until_s - now_s) for r in rows]
    return min(waits) if waits else 0.0
