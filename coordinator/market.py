"""An immutable picture of the live market: what routing decides on.

The registry builds a :class:`MarketSnapshot` when something changed since the last one;
routing reads it and never sees a half-updated node.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from coordinator.offers import ModelTerms, VerifiedOffer


@dataclass(frozen=True, slots=True)
class NodeLoadView:
    """A node's load as its latest heartbeat reported it."""

    running_requests: int = 0
    waiting_requests: int = 0
    kv_cache_usage_permille: int = 0
    output_tokens_per_s: int = 0


@dataclass(frozen=True, slots=True)
class NodeView:
    """One live node at the moment of the snapshot."""

    node_id: str
    offer: VerifiedOffer
    load: NodeLoadView
    # Requests this coordinator has sent to the node and not yet seen end.
    in_flight: int

    @property
    def region(self) -> str:
        return self.offer.region

    @property
    def queued_requests(self) -> int:
        """Requests on the node: reported running+waiting, or our own count if higher
        (heartbeats lag behind a burst this coordinator just sent)."""
        return max(self.load.running_requests + self.load.waiting_requests, self.in_flight)

    def terms_for(self, model: str) -> ModelTerms | None:
        return self.offer.terms_for(model)


@dataclass(frozen=True, slots=True)
class MarketSnapshot:
    """Every live node, indexed by model; immutable."""

    version: int
    nodes: tuple[NodeView, ...]
    by_model: Mapping[str, tuple[NodeView, ...]]
    # Every model any accepted offer ever named (live or not): tells "unknown" from "down".
    known_models: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def build(
        cls, version: int, nodes: tuple[NodeView, ...], known_models: frozenset[str]
    ) -> MarketSnapshot:
        by_model: dict[str, list[NodeView]] = {}
        for node in nodes:
            for terms in node.offer.models:
                by_model.setdefault(terms.model, []).append(node)
        return cls(
            version=version,
            nodes=nodes,
            by_model=MappingProxyType({m: tuple(v) for m, v in by_model.items()}),
            known_models=known_models,
        )

    def serving(self, model: str) -> tuple[NodeView, ...]:
        """Live nodes that offer ``model``."""
        return self.by_model.get(model, ())

    @property
    def live_models(self) -> tuple[str, ...]:
        return tuple(sorted(self.by_model))
