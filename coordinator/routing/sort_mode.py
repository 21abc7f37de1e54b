"""How eligible nodes are ordered: the enum that mirrors ``mercato.v1.SortMode``."""

from __future__ import annotations

import enum

__all__ = ["SortMode"]


class SortMode(enum.Enum):
    """Ordering of eligible nodes; the value is the name of the scoring policy used.

    Mirrors the proto's ``SORT_MODE_*``; ``SORT_MODE_UNSPECIFIED`` maps to BALANCED.
    """

    # Weighs expected cost, expected time, load and reliability together (the default).
    BALANCED = "balanced"
    # Cheapest first, by the request's expected cost (input tokens + max_tokens).
    PRICE = "price"
    # Lowest measured time to first token first (network included), load-adjusted.
    LATENCY = "latency"
    # Highest measured output tokens per second first, load-adjusted.
    THROUGHPUT = "throughput"

    @classmethod
    def from_proto(cls, value: int) -> SortMode:
        """The mode for a ``mercato.v1.SortMode`` number; unknown numbers -> BALANCED."""
        return _FROM_PROTO.get(int(value), cls.BALANCED)

    def to_proto(self) -> int:
        """The ``mercato.v1.SortMode`` number of this mode."""
        return _TO_PROTO[self]


# Numbers of mercato.v1.SortMode (proto/mercato/v1/inference.proto); checked by a test.
_FROM_PROTO: dict[int, SortMode] = {
    0: SortMode.BALANCED,
    1: SortMode.BALANCED,
    2: SortMode.PRICE,
    3: SortMode.LATENCY,
    4: SortMode.THROUGHPUT,
}
_TO_PROTO: dict[SortMode, int] = {
    SortMode.BALANCED: 1,
    SortMode.PRICE: 2,
    SortMode.LATENCY: 3,
    SortMode.THROUGHPUT: 4,
}
