"""How the pick is drawn from scored candidates; load-aware by default.

``TWO_CHOICES`` (the default) takes the near-best pool, the candidates within the
policy's slack of the best score (at most ``near_best_max``), draws two of them at random
and keeps the one with the lower utilization. A burst of requests routed on the same
snapshot therefore spreads over the pool instead of herding onto the single best node
(Mitzenmacher's power of two choices). ``BEST`` and ``RANDOM`` exist as baselines for
the spread benchmark and for operators who want them.
"""

from __future__ import annotations

import enum
import random

__all__ = ["PickStrategy", "pick_index"]


class PickStrategy(enum.Enum):
    """How the pick is drawn from the scored candidates."""

    # Two random near-best candidates; the less loaded wins (ties: the better score).
    TWO_CHOICES = "two_choices"
    # Always the best score (herds a burst onto one node; a baseline).
    BEST = "best"
    # A uniformly random eligible candidate (ignores scores; a baseline).
    RANDOM = "random"


def pick_index(
    strategy: PickStrategy,
    order: list[int],
    scores: list[float],
    utilizations: list[float],
    *,
    near_best_slack: float,
    near_best_max: int,
    rng: random.Random,
) -> int:
    """Index of the pick; ``order`` lists candidate indexes best first (not empty)."""
    if strategy is PickStrategy.BEST or len(order) == 1:
        return order[0]
    if strategy is PickStrategy.RANDOM:
        return order[rng.randrange(len(order))]
    best = scores[order[0]]
    limit = best + near_best_slack * abs(best)
    pool = [i for i in order[:near_best_max] if scores[i] <= limit]
    if len(pool) < 2:
        return order[0]
    first, second = rng.sample(pool, 2)
    if (utilizations[second], scores[second]) < (utilizations[first], scores[first]):
        return second
    return first
