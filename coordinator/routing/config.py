"""Tuning of routing: how many nodes are scored, how wide the near-best pool is, weights.

A plain frozen dataclass: the coordinator's settings class (env prefix
MERCATO_COORDINATOR_) owns the environment and builds one of these.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RoutingConfig"]


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """How :func:`~coordinator.routing.route` searches, scores and picks."""

    # Nodes scored per request in the latency, throughput and balanced modes. When the
    # request's buckets hold at most this many nodes under its price caps, every one is
    # scored (exact); otherwise this many are drawn uniformly at random (sampled).
    sample_size: int = 24
    # Cheapest eligible nodes found exactly in price mode (threshold algorithm over the
    # two price-sorted lists); a random sample tops up the pool among equally cheap ones.
    price_pool_size: int = 8
    # Most candidates in the near-best pool that power-of-two-choices picks from.
    near_best_max: int = 16
    # Most candidates in a decision: the pick plus fallbacks.
    max_candidates: int = 6
    # Never-measured nodes get the peers' median times multiplied by (1 - this).
    exploration_bonus: float = 0.1
    # Priors when no candidate was ever measured (all candidates then tie on them).
    default_rtt_s: float = 0.05
    default_ttft_s: float = 0.5
    default_tpot_s: float = 0.03
    # Balanced mode: weight of expected cost relative to the cheapest candidate.
    weight_cost: float = 1.0
    # Balanced mode: weight of expected duration (TTFT + max_tokens x TPOT) relative to
    # the fastest candidate.
    weight_time: float = 1.0
    # Balanced mode: weight of utilization (occupancy / max concurrency, 0..1). Heavy on
    # purpose: a busy node means queueing, and a burst must not pile onto the best nodes
    # (tuned with `mercato bench spread`).
    weight_load: float = 6.0
    # Balanced mode: weight of unreliability (1 - decayed success share).
    weight_unreliability: float = 4.0

    def __post_init__(self) -> None:
        for name in ("sample_size", "price_pool_size", "near_best_max", "max_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.exploration_bonus < 1.0:
            raise ValueError(f"exploration_bonus: must be in [0, 1), got {self.exploration_bonus}")
        for name in ("default_rtt_s", "default_ttft_s", "default_tpot_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("weight_cost", "weight_time", "weight_load", "weight_unreliability"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
