"""The coordinator: the request plane of Mercato.

Clients call InferenceService; nodes register and heartbeat on NodeControlService; the
registry keeps the live nodes and feeds the routing market (:mod:`coordinator.routing`),
the router decides on snapshots of it, and the relay streams a node's tokens back to the
client, failing over and resuming on another node when one fails.
"""

from coordinator.offers import ModelTerms, VerifiedOffer, verify_offer
from coordinator.outcome import DeliveredOutput, RelayOutcome, SegmentOutcome
from coordinator.registry import NodeRegistry, Registration
from coordinator.router import Routed, Router
from coordinator.server import Coordinator, run_coordinator
from coordinator.settings import CoordinatorSettings

__all__ = [
    "Coordinator",
    "CoordinatorSettings",
    "DeliveredOutput",
    "ModelTerms",
    "NodeRegistry",
    "Registration",
    "RelayOutcome",
    "Routed",
    "Router",
    "SegmentOutcome",
    "VerifiedOffer",
    "run_coordinator",
    "verify_offer",
]
