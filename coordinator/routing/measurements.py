"""Time-decayed statistics of what the coordinator itself observes about each node.

Routing trusts these, never what a node says about itself:

- network round trip (RTT): the coordinator times each heartbeat's answer;
- time to first token (TTFT): from sending WorkerGenerate to the first token arriving,
  as seen by the coordinator (so it includes one network round trip, queueing and
  prefill);
- time per output token (TPOT): (last token - first token) / (output tokens - 1);
- reliability: the share of dispatches that ended well.

Each is a :class:`DecayedStat`: every observation starts with weight 1 and its weight
halves every ``half_life_s`` seconds. The mean is ``sum(w*x) / sum(w)``; the spread is the
decayed standard deviation, from which a rough p90 (mean + 1.28 sd) is derived. Unlike a
fixed-alpha EWMA, two observations a millisecond apart count as two, and a node silent
for an hour comes back with weak (not stale-but-confident) statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DecayedStat", "NodeMeasurements", "NodeStats"]

# z-score of the 90th percentile of a normal distribution.
_Z_P90 = 1.2816
# Pseudo-observations of success that every node starts with: one failure of a new node
# lowers its reliability to 2/3, not to 0.
_RELIABILITY_PRIOR_SUCCESSES = 2.0


class DecayedStat:
    """Mean and spread of observations whose weight halves every ``half_life_s``."""

    __slots__ = ("_half_life_s", "_last_s", "_sum", "_sum_squares", "_weight")

    def __init__(self, half_life_s: float) -> None:
        if not half_life_s > 0:
            raise ValueError(f"half_life_s: must be > 0, got {half_life_s!r}")
        self._half_life_s = half_life_s
        self._weight = 0.0
        self._sum = 0.0
        self._sum_squares = 0.0
        self._last_s: float | None = None

    def observe(self, value: float, now_s: float) -> None:
        """Add one observation made at ``now_s`` (a monotonic clock, seconds)."""
        if not math.isfinite(value):
            return
        if self._last_s is not None and now_s > self._last_s:
            decay = 0.5 ** ((now_s - self._last_s) / self._half_life_s)
            self._weight *= decay
            self._sum *= decay
            self._sum_squares *= decay
        if self._last_s is None or now_s > self._last_s:
            self._last_s = now_s
        self._weight += 1.0
        self._sum += value
        self._sum_squares += value * value

    @property
    def measured(self) -> bool:
        """Whether any observation was ever made."""
        return self._weight > 0.0

    @property
    def mean(self) -> float | None:
        """Decayed mean; None before the first observation."""
        return self._sum / self._weight if self._weight > 0.0 else None

    @property
    def stdev(self) -> float | None:
        """Decayed standard deviation; None before the first observation."""
        if self._weight <= 0.0:
            return None
        mean = self._sum / self._weight
        return math.sqrt(max(0.0, self._sum_squares / self._weight - mean * mean))

    @property
    def p90(self) -> float | None:
        """Rough 90th percentile: mean + 1.28 standard deviations (normal assumption)."""
        mean, stdev = self.mean, self.stdev
        return None if mean is None or stdev is None else mean + _Z_P90 * stdev

    def weight_at(self, now_s: float) -> float:
        """Total weight of the observations as of ``now_s`` (how much evidence is left)."""
        if self._last_s is None:
            return 0.0
        return self._weight * 0.5 ** (max(0.0, now_s - self._last_s) / self._half_life_s)

    @property
    def sum(self) -> float:
        """Decayed sum of the observations (as of the last one)."""
        return self._sum

    @property
    def weight(self) -> float:
        """Decayed weight of the observations (as of the last one)."""
        return self._weight


@dataclass(frozen=True, slots=True)
class NodeStats:
    """An immutable summary of a node's measurements, carried in its NodeView.

    ``None`` means never measured; scoring then gives the node a neutral prior (the
    median of measured peers, with a small exploration bonus), never a free pass.
    """

    # Network round trip, seconds.
    rtt_s: float | None = None
    # Time to first token as the coordinator sees it (network included), seconds.
    ttft_s: float | None = None
    # Rough 90th percentile of the time to first token, seconds.
    ttft_p90_s: float | None = None
    # Time per output token, seconds.
    tpot_s: float | None = None
    # Decayed share of dispatches that ended well, with a prior of 2 successes; 0..1.
    reliability: float = 1.0


NEVER_MEASURED = NodeStats()


class NodeMeasurements:
    """The mutable statistics of one node; the market owns one per node."""

    __slots__ = ("outcomes", "rtt", "tpot", "ttft")

    def __init__(self, latency_half_life_s: float, reliability_half_life_s: float) -> None:
        self.rtt = DecayedStat(latency_half_life_s)
        self.ttft = DecayedStat(latency_half_life_s)
        self.tpot = DecayedStat(latency_half_life_s)
        # 1.0 per dispatch that ended well, 0.0 per failure.
        self.outcomes = DecayedStat(reliability_half_life_s)

    def summary(self) -> NodeStats:
        """The immutable view of these statistics."""
        reliability = (self.outcomes.sum + _RELIABILITY_PRIOR_SUCCESSES) / (
            self.outcomes.weight + _RELIABILITY_PRIOR_SUCCESSES
        )
        return NodeStats(
            rtt_s=self.rtt.mean,
            ttft_s=self.ttft.mean,
            ttft_p90_s=self.ttft.p90,
            tpot_s=self.tpot.mean,
            reliability=reliability,
        )
