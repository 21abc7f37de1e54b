"""The coordinator: the request plane of Mercato.

Clients call InferenceService; nodes register and heartbeat on NodeControlService; the
registry keeps the live market, the node choice orders candidates, the relay streams a
node's tokens back to the client.
"""

from coordinator.choice import ChooseNodes, choose_nodes
from coordinator.market import MarketSnapshot, NodeLoadView, NodeView
from coordinator.offers import ModelTerms, VerifiedOffer, verify_offer
from coordinator.registry import NodeRegistry, Registration
from coordinator.server import Coordinator, run_coordinator
from coordinator.settings import CoordinatorSettings

__all__ = [
    "ChooseNodes",
    "Coordinator",
    "CoordinatorSettings",
    "MarketSnapshot",
    "ModelTerms",
    "NodeLoadView",
    "NodeRegistry",
    "NodeView",
    "Registration",
    "VerifiedOffer",
    "choose_nodes",
    "run_coordinator",
    "verify_offer",
]
