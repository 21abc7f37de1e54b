"""Matching requests to nodes: filter -> score -> pick over an immutable market snapshot.

The coordinator keeps one :class:`Market` (listings from verified offers, heartbeat load,
its own latency measurements, per-node circuit breakers), takes a :class:`MarketSnapshot`
with :meth:`Market.snapshot`, and calls :func:`route` with a :class:`RouteRequest` and a
seeded :class:`random.Random`. The :class:`RoutingDecision` lists the pick and fallbacks,
or carries an :class:`EmptyReason` naming the constraint that left no node.
"""

from coordinator.routing.circuit_breaker import BreakerPolicy, BreakerState, CircuitBreaker
from coordinator.routing.config import RoutingConfig
from coordinator.routing.constraints import Constraint, EmptyReason, diagnose
from coordinator.routing.decision import RoutedCandidate, RoutingDecision, route
from coordinator.routing.errors import (
    InvalidListingError,
    InvalidRoutingRequestError,
    RoutingError,
)
from coordinator.routing.market import DispatchOutcome, Market, MarketConfig
from coordinator.routing.measurements import DecayedStat, NodeStats
from coordinator.routing.node_view import LoadReport, ModelTerms, NodeListing, NodeView
from coordinator.routing.picking import PickStrategy
from coordinator.routing.request import RouteRequest, RoutingPreferences
from coordinator.routing.routing_policies import (
    ScoringInput,
    ScoringPolicy,
    get_policy,
    policy_names,
    register_policy,
)
from coordinator.routing.snapshot import MarketSnapshot
from coordinator.routing.sort_mode import SortMode

__all__ = [
    "BreakerPolicy",
    "BreakerState",
    "CircuitBreaker",
    "Constraint",
    "DecayedStat",
    "DispatchOutcome",
    "EmptyReason",
    "InvalidListingError",
    "InvalidRoutingRequestError",
    "LoadReport",
    "Market",
    "MarketConfig",
    "MarketSnapshot",
    "ModelTerms",
    "NodeListing",
    "NodeStats",
    "NodeView",
    "PickStrategy",
    "RouteRequest",
    "RoutedCandidate",
    "RoutingConfig",
    "RoutingDecision",
    "RoutingError",
    "RoutingPreferences",
    "ScoringInput",
    "ScoringPolicy",
    "SortMode",
    "diagnose",
    "get_policy",
    "policy_names",
    "register_policy",
    "route",
]
