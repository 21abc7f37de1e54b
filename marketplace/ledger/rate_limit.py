"""Per-key request rate limits: a token bucket per key, in memory (per coordinator)."""

from __future__ import annotations

import time

from marketplace.ledger.errors import RateLimited


class KeyRateLimiter:
    """A bucket of ``limit`` requests per minute per key, refilled continuously."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def check(self, key_id: str, limit_per_minute: int | None, now_s: float | None = None) -> None:
        """Take one request from the key's bucket, or raise RateLimited."""
        if limit_per_minute is None:
            return
        now = time.monotonic() if now_s is None else now_s
        tokens, at = self._buckets.get(key_id, (float(limit_per_minute), now))
        tokens = min(float(limit_per_minute), tokens + (now - at) * limit_per_minute / 60.0)
        if tokens < 1.0:
            wait_s = (1.0 - tokens) * 60.0 / limit_per_minute
            self._buckets[key_id] = (tokens, now)
            raise RateLimited(
                f"rate limit of key {key_id} reached ({limit_per_minute} requests per minute); "
                f"retry in {wait_s:.1f} s or ask for a higher limit"
            )
        self._buckets[key_id] = (tokens - 1.0, now)
