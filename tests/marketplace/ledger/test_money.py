"""The rounding rules, by example and by property."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from marketplace.ledger.errors import InvalidAmount
from marketplace.ledger.money import (
    cap_to_hold,
    check_amount,
    lease_cumulative_micro_usd,
    max_cost_micro_usd,
    split_fee,
    token_cost_micro_usd,
)

tokens = st.integers(min_value=0, max_value=2**32 - 1)
prices = st.integers(min_value=0, max_value=10**12)


def test_cost_rounds_up_once_per_receipt() -> None:
    # 100 * 100_000 + 50 * 300_000 = 25_000_000 -> exactly 25 micro-USD
    assert token_cost_micro_usd(100, 50, 100_000, 300_000) == 25
    # 1 token at 1 micro-USD per million tokens still costs 1 micro-USD
    assert token_cost_micro_usd(1, 0, 1, 0) == 1
    assert token_cost_micro_usd(0, 0, 5, 5) == 0
    # one rounding over input and output together, not one each
    assert token_cost_micro_usd(1, 1, 400_000, 400_000) == 1


def test_fee_rounds_down_and_parts_add_up() -> None:
    assert split_fee(999, 1000) == (900, 99)
    assert split_fee(9, 1000) == (9, 0)
    assert split_fee(100, 10_000) == (0, 100)


@given(tokens, tokens, prices, prices)
def test_cost_is_ceiling(i: int, o: int, pi: int, po: int) -> None:
    cost = token_cost_micro_usd(i, o, pi, po)
    exact = i * pi + o * po
    assert cost * 1_000_000 >= exact > (cost - 1) * 1_000_000 or (exact == 0 and cost == 0)


@given(tokens, tokens, tokens, prices, prices)
def test_hold_covers_any_shorter_output(i: int, o: int, extra: int, pi: int, po: int) -> None:
    assert max_cost_micro_usd(i, o + extra, pi, po) >= token_cost_micro_usd(i, o, pi, po)


@given(st.integers(min_value=0, max_value=2**62), st.integers(min_value=0, max_value=10_000))
def test_split_fee_is_exact(charge: int, bps: int) -> None:
    provider, fee = split_fee(charge, bps)
    assert provider + fee == charge
    assert 0 <= fee <= charge


@given(st.integers(min_value=0, max_value=10**9), st.lists(st.integers(0, 10**6), max_size=8))
def test_cap_never_exceeds_hold(hold: int, costs: list[int]) -> None:
    charges = cap_to_hold(hold, costs)
    assert sum(charges) == min(hold, sum(costs))
    assert all(0 <= c <= cost for c, cost in zip(charges, costs, strict=True))


@given(st.integers(1, 10**12), st.integers(1, 3600))
def test_lease_periods_add_up_to_total(total: int, periods: int) -> None:
    parts = [
        lease_cumulative_micro_usd(total, periods, k)
        - lease_cumulative_micro_usd(total, periods, k - 1)
        for k in range(1, periods + 1)
    ]
    assert sum(parts) == total
    assert all(p >= 0 for p in parts)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "10", True, 2**63])
def test_bad_amounts_are_refused(bad: object) -> None:
    with pytest.raises(InvalidAmount):
        check_amount(bad)  # type: ignore[arg-type]
