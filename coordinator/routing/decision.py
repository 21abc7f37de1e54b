"""Routing: filter -> score -> pick, a pure function of a market snapshot.

``route(snapshot, request, rng)`` reads nothing but its arguments (randomness comes
only from ``rng``, time only from ``now_s`` or the snapshot), so the same snapshot,
request and seed always give the same decision. The server carries the decision out:
it dispatches to ``decision.pick``; on failure it may try ``decision.fallbacks`` in
order, or route again with ``request.excluding(tried)`` on a fresher snapshot (both
keep every hard constraint, so a fallback or a resumed stream never leaves the allowed
regions or price caps).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple

from coordinator.routing.candidates import gather
from coordinator.routing.config import RoutingConfig
from coordinator.routing.constraints import Eligibility, EmptyReason, diagnose
from coordinator.routing.node_view import NodeView
from coordinator.routing.picking import PickStrategy, pick_index
from coordinator.routing.request import RouteRequest
from coordinator.routing.routing_policies import ScoringInput, policy_for
from coordinator.routing.snapshot import MarketSnapshot
from coordinator.routing.sort_mode import SortMode

__all__ = ["RoutedCandidate", "RoutingDecision", "route"]

_DEFAULT_CONFIG = RoutingConfig()


class RoutedCandidate(NamedTuple):
    """A node chosen for the request, with the terms it will charge."""

    view: NodeView
    # Input and output price of the node for the request's model, micro-USD per Mtok.
    price_input_micro_usd_per_mtok: int
    price_output_micro_usd_per_mtok: int
    # The policy's score (lower is better; comparable only within one decision; 0.0 when
    # the decision had a sole eligible node, which is not scored).
    score: float

    @property
    def node_id(self) -> str:
        return self.view.node_id

    @property
    def worker_address(self) -> str:
        return self.view.listing.worker_address

    @property
    def region(self) -> str:
        return self.view.listing.region


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    """Where to send a request: the pick, then fallbacks; or why nowhere."""

    # The pick first, then fallbacks best first (none if allow_fallbacks is false).
    candidates: tuple[RoutedCandidate, ...]
    # Why no node may serve; set exactly when candidates is empty.
    empty_reason: EmptyReason | None
    # Scoring policy used.
    policy: str
    # Eligible nodes scored.
    considered: int
    # Whether every eligible node was scored (False when a large bucket was sampled).
    exact: bool

    @property
    def pick(self) -> RoutedCandidate | None:
        """The chosen node, or None."""
        return self.candidates[0] if self.candidates else None

    @property
    def fallbacks(self) -> tuple[RoutedCandidate, ...]:
        """Nodes to try, in order, if the pick fails."""
        return self.candidates[1:]


def route(
    snapshot: MarketSnapshot,
    request: RouteRequest,
    rng: random.Random,
    *,
    config: RoutingConfig = _DEFAULT_CONFIG,
    pick_strategy: PickStrategy = PickStrategy.TWO_CHOICES,
    now_s: float | None = None,
) -> RoutingDecision:
    """Decide which nodes may serve ``request`` and in what order.

    ``now_s`` (the market's monotonic clock) decides which breakers have cooled down;
    default: when the snapshot was taken.
    """
    now = snapshot.taken_at_s if now_s is None else now_s
    sort = request.preferences.sort
    policy = policy_for(sort)
    eligibility = Eligibility(request, now)
    gathered = gather(
        snapshot,
        request,
        eligibility,
        rng,
        config,
        cheapest=sort is SortMode.PRICE,
        near_best_slack=policy.near_best_slack,
    )
    rows = gathered.rows
    if not rows:
        return RoutingDecision((), diagnose(snapshot, request, now), policy.name, 0, True)
    if len(rows) == 1:
        # One eligible node: nothing to rank it against or to spread load over, so it is
        # the pick, unscored (scores only compare the candidates of one decision).
        view, price_input, price_output = rows[0]
        return RoutingDecision(
            (RoutedCandidate(view, price_input, price_output, 0.0),),
            None,
            policy.name,
            1,
            gathered.exact,
        )
    views = [row[0] for row in rows]
    prices_input = [row[1] for row in rows]
    prices_output = [row[2] for row in rows]
    scores = policy.score(ScoringInput(request, views, prices_input, prices_output, config))
    # Ties are broken at random (seeded), so equally good nodes share traffic.
    draw = rng.random
    order = [i for _, _, i in sorted([(score, draw(), i) for i, score in enumerate(scores)])]
    utilizations = [view.occupancy / view.max_concurrency for view in views]
    chosen = pick_index(
        pick_strategy,
        order,
        scores,
        utilizations,
        near_best_slack=policy.near_best_slack,
        near_best_max=config.near_best_max,
        rng=rng,
    )
    ranked = [chosen]
    if request.preferences.allow_fallbacks:
        ranked.extend(i for i in order[: config.max_candidates] if i != chosen)
        del ranked[config.max_candidates :]
    candidates = tuple(
        RoutedCandidate(views[i], prices_input[i], prices_output[i], scores[i]) for i in ranked
    )
    return RoutingDecision(candidates, None, policy.name, len(rows), gathered.exact)
