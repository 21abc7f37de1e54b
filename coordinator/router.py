"""From a checked request to routing decisions over the live market.

:func:`coordinator.routing.route` decides (a pure function of a snapshot); this module
feeds it: it builds the request's :class:`~coordinator.routing.RouteRequest` once, takes
a fresh snapshot of the registry's market for every decision, owns the coordinator's
seeded RNG (one per process: ``routing_seed`` or a random seed, logged at start), and
turns an empty decision into the error the client gets (NOT_FOUND for a model no node
ever offered, otherwise UNAVAILABLE with the decision's reason naming the constraint).
The relay calls :meth:`Router.decide` again for failover and resume with
:meth:`Router.again`: tried nodes excluded, the hard constraints (regions, price caps,
only/ignore nodes) unchanged, so no later decision relaxes them; the price caps are
only ever tightened, to the first decision's price ceiling, which is what billing held.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace

from coordinator.errors import CoordinatorError, ModelNotFound, NoNodeAvailable, RequestInvalid
from coordinator.registry import NodeRegistry
from coordinator.routing import (
    Constraint,
    EmptyReason,
    NodeListing,
    RouteRequest,
    RoutingDecision,
    RoutingPreferences,
    route,
)
from coordinator.settings import CoordinatorSettings
from coordinator.validation import ValidRequest

log = logging.getLogger(__name__)

_LISTED_MODELS_MAX = 20
_DEFAULT_PREFERENCES = RoutingPreferences()


@dataclass(frozen=True, slots=True)
class Routed:
    """A request as routing sees it and its first decision (which has a pick)."""

    request: RouteRequest
    decision: RoutingDecision

    @property
    def listings(self) -> tuple[NodeListing, ...]:
        """The listings of the first decision's candidates (``terms_for(model)``): what
        billing holds the maximum cost on."""
        return tuple(candidate.view.listing for candidate in self.decision.candidates)

    @property
    def price_ceiling(self) -> tuple[int, int]:
        """The highest input and output prices among the first decision's candidates."""
        candidates = self.decision.candidates
        return (
            max(c.price_input_micro_usd_per_mtok for c in candidates),
            max(c.price_output_micro_usd_per_mtok for c in candidates),
        )


class Router:
    """Routes requests on snapshots of the registry's market; one per coordinator."""

    def __init__(
        self,
        registry: NodeRegistry,
        settings: CoordinatorSettings,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._registry = registry
        self._config = settings.routing_config()
        if rng is None:
            seed = settings.routing_seed
            if seed is None:
                seed = random.SystemRandom().randrange(2**63)
            log.info("routing RNG seed %d", seed)
            rng = random.Random(seed)
        self._rng = rng

    @staticmethod
    def route_request(request: ValidRequest) -> RouteRequest:
        """The routing descriptor of a checked request (prompt tokens estimated)."""
        return RouteRequest(
            model=request.model,
            input_tokens=request.input_tokens_estimate,
            max_tokens=request.max_tokens,
            preferences=_preferences(request),
        )

    def decide(self, request: RouteRequest) -> RoutingDecision:
        """Route ``request`` on a fresh snapshot of the market."""
        return route(self._registry.snapshot(), request, self._rng, config=self._config)

    def first(self, request: ValidRequest) -> Routed:
        """The first decision for ``request``; raises ModelNotFound or NoNodeAvailable
        when no node may serve it."""
        route_request = self.route_request(request)
        decision = self.decide(route_request)
        if decision.pick is None:
            raise self.no_node(route_request, decision)
        return Routed(route_request, decision)

    @staticmethod
    def again(routed: Routed, delivered_tokens: int, tried: set[str]) -> RouteRequest:
        """The route request for failover or resume: tried nodes excluded, the delivered
        tokens join the prompt and fewer remain to generate, and the price caps become
        at most the first decision's price ceiling (the hold placed on that decision
        covers any node chosen later). Every hard constraint stays; none is relaxed."""
        request = routed.request
        prefs = request.preferences
        ceiling_input, ceiling_output = routed.price_ceiling
        cap_input = prefs.max_price_input_micro_usd_per_mtok
        cap_output = prefs.max_price_output_micro_usd_per_mtok
        preferences = replace(
            prefs,
            max_price_input_micro_usd_per_mtok=(
                ceiling_input if cap_input is None else min(cap_input, ceiling_input)
            ),
            max_price_output_micro_usd_per_mtok=(
                ceiling_output if cap_output is None else min(cap_output, ceiling_output)
            ),
        )
        return replace(
            request.excluding(tried),
            input_tokens=request.input_tokens + delivered_tokens,
            max_tokens=max(1, request.max_tokens - delivered_tokens),
            preferences=preferences,
        )

    def no_node(self, request: RouteRequest, decision: RoutingDecision) -> CoordinatorError:
        """The client's error for an empty decision."""
        reason = decision.empty_reason
        assert reason is not None
        if reason.constraint is Constraint.MODEL and not self._registry.is_known_model(
            request.model
        ):
            return ModelNotFound(self._unknown_model_message(request.model))
        if reason.constraint is Constraint.CONTEXT_LENGTH:
            # No live node could ever take this prompt: the request, not the market, is at
            # fault, so retrying later would not help.
            return RequestInvalid(
                f"prompt too long: {reason.message}; shorten the prompt or lower max_tokens"
            )
        return NoNodeAvailable(self.explain(reason))

    @staticmethod
    def explain(reason: EmptyReason) -> str:
        """A person's message for an empty decision; it names the constraint."""
        if reason.constraint is Constraint.MODEL:
            return f"{reason.message}; retry later or pick another model (ListModels)"
        return f"{reason.message} [constraint: {reason.constraint.value}]"

    def _unknown_model_message(self, model: str) -> str:
        available = self._registry.snapshot().models()
        listed = ", ".join(available[:_LISTED_MODELS_MAX]) or "none (no live node)"
        if len(available) > _LISTED_MODELS_MAX:
            listed += f", ... ({len(available)} in all; see ListModels)"
        return f'model "{model}" is not served; available: {listed}'


def _preferences(request: ValidRequest) -> RoutingPreferences:
    if request.routing.ByteSize():
        preferences = RoutingPreferences.from_proto(request.routing)
    elif not request.leased_nodes:
        return _DEFAULT_PREFERENCES  # nothing set: most requests
    else:
        preferences = _DEFAULT_PREFERENCES
    if request.leased_nodes:
        preferences = replace(preferences, leased_nodes=request.leased_nodes)
    return preferences
