"""Per-node circuit breaker: a failing node is backed off and comes back once it recovers.

States (closed → open → half-open → closed)::

    CLOSED     --failure_threshold consecutive failures-->  OPEN (for a backoff)
    OPEN       --backoff elapsed-->                          HALF_OPEN
    HALF_OPEN  --one probe dispatched-->                     (no more traffic until it ends)
    HALF_OPEN  --probe succeeds-->                           CLOSED (backoff reset)
    HALF_OPEN  --probe fails-->                              OPEN (backoff x multiplier)

Time is passed in (``now_s``, a monotonic clock in seconds), so tests drive it by hand.
A success at any time closes the breaker: the node just showed it serves.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

__all__ = ["BreakerPolicy", "BreakerState", "CircuitBreaker"]


class BreakerState(enum.Enum):
    """Where a node's breaker stands."""

    # Healthy: traffic flows.
    CLOSED = "closed"
    # Failing: no traffic until the backoff ends.
    OPEN = "open"
    # Backoff over: one probe request may go; its outcome decides.
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When a breaker opens and for how long."""

    # Consecutive failures that open the breaker.
    failure_threshold: int = 3
    # Length of the first backoff, seconds.
    backoff_base_s: float = 2.0
    # Factor applied to the backoff each time a probe fails.
    backoff_multiplier: float = 2.0
    # Longest backoff, seconds.
    backoff_max_s: float = 120.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError(f"failure_threshold: must be >= 1, got {self.failure_threshold}")
        if not 0 < self.backoff_base_s <= self.backoff_max_s:
            raise ValueError(
                "backoff_base_s: must be > 0 and <= backoff_max_s, got "
                f"{self.backoff_base_s} (backoff_max_s={self.backoff_max_s})"
            )
        if self.backoff_multiplier < 1:
            raise ValueError(f"backoff_multiplier: must be >= 1, got {self.backoff_multiplier}")

    def backoff_s(self, trips: int) -> float:
        """Backoff after the ``trips``-th opening in a row (1-based)."""
        return min(self.backoff_max_s, self.backoff_base_s * self.backoff_multiplier ** (trips - 1))


class CircuitBreaker:
    """The breaker of one node; mutable, owned by the market."""

    __slots__ = ("_consecutive_failures", "_open_until_s", "_policy", "_probe_in_flight", "_trips")

    def __init__(self, policy: BreakerPolicy) -> None:
        self._policy = policy
        self._consecutive_failures = 0
        self._trips = 0
        self._open_until_s = -math.inf
        self._probe_in_flight = False

    def state(self, now_s: float) -> BreakerState:
        """The state at ``now_s``."""
        if self._trips == 0:
            return BreakerState.CLOSED
        return BreakerState.OPEN if now_s < self._open_until_s else BreakerState.HALF_OPEN

    def allows(self, now_s: float) -> bool:
        """Whether a request may be sent to the node at ``now_s``."""
        return now_s >= self._open_until_s and not self._probe_in_flight

    @property
    def open_until_s(self) -> float:
        """When the current backoff ends (-inf while closed)."""
        return self._open_until_s

    @property
    def probe_in_flight(self) -> bool:
        """Whether the one half-open probe is out."""
        return self._probe_in_flight

    @property
    def consecutive_failures(self) -> int:
        """Failures since the last success."""
        return self._consecutive_failures

    def on_dispatch(self, now_s: float) -> None:
        """A request was sent to the node; in HALF_OPEN it becomes the probe."""
        if self.state(now_s) is BreakerState.HALF_OPEN:
            self._probe_in_flight = True

    def on_success(self, now_s: float) -> None:
        """A request ended well: close and forget the failures."""
        del now_s
        self._consecutive_failures = 0
        self._trips = 0
        self._open_until_s = -math.inf
        self._probe_in_flight = False

    def on_failure(self, now_s: float) -> None:
        """A request failed because of the node (not because the client went away)."""
        self._consecutive_failures += 1
        was_probe = self._probe_in_flight
        self._probe_in_flight = False
        if self._trips == 0:
            if self._consecutive_failures >= self._policy.failure_threshold:
                self._trip(now_s)
        elif was_probe or now_s >= self._open_until_s:
            # The probe failed (or a failure arrived once the backoff was over): back off
            # longer. Late failures of requests sent before the breaker opened do not.
            self._trip(now_s)

    def on_abandoned(self) -> None:
        """A request ended without a verdict on the node (client cancelled): free the probe."""
        self._probe_in_flight = False

    def _trip(self, now_s: float) -> None:
        self._trips += 1
        self._open_until_s = now_s + self._policy.backoff_s(self._trips)
