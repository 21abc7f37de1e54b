"""Scoring policies, registered by name: each turns candidates into scores (lower = better).

A policy sees only eligible candidates and the coordinator's own measurements. Every
sort mode has the policy of the same name (``SortMode.value``):

- ``price``: the request's expected cost, input_tokens x input price + max_tokens x output
  price. Load does not change the score; power-of-two-choices among equally cheap nodes
  spreads load.
- ``latency``: expected time to first token (measured at the coordinator, so network
  included), x (1 + utilization).
- ``throughput``: expected time per output token, x (1 + utilization); the lowest is the
  highest tokens/s.
- ``balanced``: a blend of cost and duration, each relative to the best candidate (1.0 =
  as good as the best), plus utilization and unreliability, with RoutingConfig's weights.
  Its near-best pool is wide (within 50% of the best score) and load weighs heavily: the
  default mode spreads a burst first and still never picks far from the best.

Never-measured nodes get a neutral prior: the median of the measured candidates (for
TTFT: their median TTFT minus RTT, plus the node's own RTT when heartbeats measured it),
times (1 - exploration_bonus) so new nodes get some traffic and thereby measurements.

Register another with ``@register_policy("name", near_best_slack=...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from coordinator.routing.config import RoutingConfig
from coordinator.routing.node_view import NodeView
from coordinator.routing.request import RouteRequest
from coordinator.routing.sort_mode import SortMode

__all__ = [
    "ScoringInput",
    "ScoringPolicy",
    "get_policy",
    "policy_for",
    "policy_names",
    "register_policy",
]


@dataclass(frozen=True, slots=True)
class ScoringInput:
    """Eligible candidates of one request; the lists are parallel."""

    request: RouteRequest
    views: list[NodeView]
    # The candidates' input and output prices for the request's model.
    prices_input: list[int]
    prices_output: list[int]
    config: RoutingConfig


ScoreFunction = Callable[[ScoringInput], list[float]]


@dataclass(frozen=True, slots=True)
class ScoringPolicy:
    """A named scoring function and how wide its near-best pool is."""

    name: str
    score: ScoreFunction
    # Candidates within best + near_best_slack x |best| are "near-best".
    near_best_slack: float


_POLICIES: dict[str, ScoringPolicy] = {}


def register_policy(
    name: str, *, near_best_slack: float
) -> Callable[[ScoreFunction], ScoreFunction]:
    """Register ``function`` as the scoring policy ``name`` (a decorator)."""

    def decorate(function: ScoreFunction) -> ScoreFunction:
        if name in _POLICIES:
            raise ValueError(f"scoring policy {name!r} is already registered")
        _POLICIES[name] = ScoringPolicy(name, function, near_best_slack)
        return function

    return decorate


def get_policy(name: str) -> ScoringPolicy:
    """The policy registered as ``name``."""
    try:
        return _POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown scoring policy {name!r}; registered: {', '.join(policy_names())}"
        ) from None


def policy_names() -> tuple[str, ...]:
    """Names of the registered policies, sorted."""
    return tuple(sorted(_POLICIES))


def policy_for(sort: SortMode) -> ScoringPolicy:
    """The policy of a sort mode."""
    # ``_value_``: the member's value without the ``value`` property's call (every
    # routing decision comes here).
    policy = _POLICIES.get(sort._value_)
    return get_policy(sort.value) if policy is None else policy


# ------------------------------------------------------------------------- estimates


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def expected_costs(inputs: ScoringInput) -> list[int]:
    """Expected cost per candidate, micro-USD x 1e6 (exact integers)."""
    input_tokens = inputs.request.input_tokens
    max_tokens = inputs.request.max_tokens
    return [
        input_tokens * price_input + max_tokens * price_output
        for price_input, price_output in zip(inputs.prices_input, inputs.prices_output, strict=True)
    ]


def expected_ttfts_s(inputs: ScoringInput) -> list[float]:
    """Expected time to first token per candidate (unloaded), with priors for new nodes."""
    rtt_prior, beyond_network, _ = _priors(inputs)
    discount = 1.0 - inputs.config.exploration_bonus
    out: list[float] = []
    for view in inputs.views:
        if view.ttft_s is not None:
            out.append(view.ttft_s)
        else:
            rtt = rtt_prior if view.rtt_s is None else view.rtt_s
            out.append((beyond_network + rtt) * discount)
    return out


def expected_tpots_s(inputs: ScoringInput) -> list[float]:
    """Expected time per output token per candidate (unloaded), with priors."""
    _, _, tpot_prior = _priors(inputs)
    return [tpot_prior if v.tpot_s is None else v.tpot_s for v in inputs.views]


def utilizations(inputs: ScoringInput) -> list[float]:
    """Occupancy over max concurrency per candidate (0 idle .. 1 full)."""
    return [v.occupancy / v.max_concurrency for v in inputs.views]


# -------------------------------------------------------------------------- policies


@register_policy("price", near_best_slack=0.02)
def score_price(inputs: ScoringInput) -> list[float]:
    """Expected cost of the request (cheapest first)."""
    return [float(cost) for cost in expected_costs(inputs)]


@register_policy("latency", near_best_slack=0.15)
def score_latency(inputs: ScoringInput) -> list[float]:
    """Expected time to first token, load-adjusted (fastest first)."""
    return [
        ttft * (1.0 + util)
        for ttft, util in zip(expected_ttfts_s(inputs), utilizations(inputs), strict=True)
    ]


@register_policy("throughput", near_best_slack=0.15)
def score_throughput(inputs: ScoringInput) -> list[float]:
    """Expected time per output token, load-adjusted (most tokens/s first)."""
    return [
        tpot * (1.0 + util)
        for tpot, util in zip(expected_tpots_s(inputs), utilizations(inputs), strict=True)
    ]


@register_policy("balanced", near_best_slack=0.5)
def score_balanced(inputs: ScoringInput) -> list[float]:
    """Cost and duration relative to the best candidate, plus load and unreliability."""
    config = inputs.config
    input_tokens = inputs.request.input_tokens
    max_tokens = inputs.request.max_tokens
    rtt_prior, beyond_network, tpot_prior = _priors(inputs)
    discount = 1.0 - config.exploration_bonus
    costs: list[int] = []
    durations: list[float] = []
    penalties: list[float] = []
    weight_load = config.weight_load
    weight_unreliability = config.weight_unreliability
    for view, price_input, price_output in zip(
        inputs.views, inputs.prices_input, inputs.prices_output, strict=True
    ):
        ttft = view.ttft_s
        if ttft is None:
            ttft = (beyond_network + (rtt_prior if view.rtt_s is None else view.rtt_s)) * discount
        tpot = view.tpot_s
        if tpot is None:
            tpot = tpot_prior
        util = view.occupancy / view.max_concurrency
        costs.append(input_tokens * price_input + max_tokens * price_output)
        durations.append((ttft + max_tokens * tpot) * (1.0 + util))
        penalties.append(weight_load * util + weight_unreliability * (1.0 - view.reliability))
    # +1 keeps free nodes finite; costs are in micro-USD x 1e6, so 1 is negligible.
    cost_scale = config.weight_cost / (min(costs) + 1)
    time_scale = config.weight_time / (min(durations) or 1e-9)
    return [
        (cost + 1) * cost_scale + duration * time_scale + penalty
        for cost, duration, penalty in zip(costs, durations, penalties, strict=True)
    ]


def _priors(inputs: ScoringInput) -> tuple[float, float, float]:
    """(RTT prior, TTFT beyond the network prior, TPOT prior) from measured candidates;
    TPOT's already carries the exploration discount."""
    config = inputs.config
    rtts: list[float] = []
    ttfts: list[tuple[float, float | None]] = []
    tpots: list[float] = []
    for view in inputs.views:
        if view.rtt_s is not None:
            rtts.append(view.rtt_s)
        if view.ttft_s is not None:
            ttfts.append((view.ttft_s, view.rtt_s))
        if view.tpot_s is not None:
            tpots.append(view.tpot_s)
    rtt_prior = _median(rtts) if rtts else config.default_rtt_s
    if ttfts:
        beyond_network = _median([t - (rtt_prior if r is None else r) for t, r in ttfts])
    else:
        beyond_network = config.default_ttft_s - rtt_prior
    tpot_prior = (_median(tpots) if tpots else config.default_tpot_s) * (
        1.0 - config.exploration_bonus
    )
    return rtt_prior, max(0.0, beyond_network), tpot_prior
