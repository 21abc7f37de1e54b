from __future__ import annotations

import pytest

from coordinator.routing import BreakerPolicy, BreakerState, CircuitBreaker

POLICY = BreakerPolicy(
    failure_threshold=2, backoff_base_s=1.0, backoff_multiplier=2.0, backoff_max_s=3.0
)


def test_opens_after_consecutive_failures_only() -> None:
    breaker = CircuitBreaker(POLICY)
    breaker.on_failure(0.0)
    breaker.on_success(0.0)
    breaker.on_failure(0.0)
    assert breaker.state(0.0) is BreakerState.CLOSED
    breaker.on_failure(0.0)
    assert breaker.state(0.0) is BreakerState.OPEN
    assert not breaker.allows(0.5)


def test_half_open_lets_one_probe_then_closes_on_success() -> None:
    breaker = CircuitBreaker(POLICY)
    breaker.on_failure(0.0)
    breaker.on_failure(0.0)
    assert breaker.state(1.0) is BreakerState.HALF_OPEN
    assert breaker.allows(1.0)
    breaker.on_dispatch(1.0)
    assert not breaker.allows(1.0), "only one probe at a time"
    breaker.on_success(1.5)
    assert breaker.state(1.5) is BreakerState.CLOSED
    assert breaker.allows(1.5)


def test_failed_probe_backs_off_exponentially_up_to_the_cap() -> None:
    breaker = CircuitBreaker(POLICY)
    breaker.on_failure(0.0)
    breaker.on_failure(0.0)  # open until 1
    breaker.on_dispatch(1.0)
    breaker.on_failure(1.0)  # open until 3
    assert breaker.state(2.9) is BreakerState.OPEN
    assert breaker.state(3.0) is BreakerState.HALF_OPEN
    breaker.on_dispatch(3.0)
    breaker.on_failure(3.0)  # backoff 4 capped at 3: open until 6
    assert breaker.open_until_s == pytest.approx(6.0)


def test_late_failures_of_earlier_requests_do_not_extend_backoff() -> None:
    breaker = CircuitBreaker(POLICY)
    breaker.on_failure(0.0)
    breaker.on_failure(0.0)
    breaker.on_failure(0.5)
    assert breaker.open_until_s == pytest.approx(1.0)


def test_abandoned_probe_frees_the_slot() -> None:
    breaker = CircuitBreaker(POLICY)
    breaker.on_failure(0.0)
    breaker.on_failure(0.0)
    breaker.on_dispatch(1.0)
    breaker.on_abandoned()
    assert breaker.allows(1.0)
    assert breaker.state(1.0) is BreakerState.HALF_OPEN


def test_policy_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        BreakerPolicy(failure_threshold=0)
    with pytest.raises(ValueError, match="backoff_base_s"):
        BreakerPolicy(backoff_base_s=10.0, backoff_max_s=1.0)
