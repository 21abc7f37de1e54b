"""Money arithmetic: the rounding rules, decided once.

All amounts are integers in micro-USD. Token prices are micro-USD per million tokens.

* **Token cost of one segment** (one node's receipt):
  ``ceil((input_tokens * input_price + output_tokens * output_price) / 1_000_000)`` —
  one rounding per receipt, upwards, so a node is never paid less than its prices say
  and a request that used any token costs at least 1 micro-USD.
* **Hold (maximum cost)**: the same formula with ``max_tokens`` as the output count.
* **Platform fee**: ``floor(charge * fee_bps / 10_000)``; the provider gets
  ``charge - fee``. Rounding favours the provider. ``provider + fee == charge`` exactly.
* **Cap**: a client is never charged more than it held. Segments are charged in order
  until the hold is used up; a segment that does not fit is charged what is left
  (the shortfall is reported as ``capped_micro_usd``).
* **Leases**: total = ``price_per_gpu_hour * gpus * hours``; after ``k`` of ``n`` periods
  the cumulative charge is ``floor(total * k / n)``, so the periods add up to the total
  exactly and the refund is ``total - charged``.
"""

from __future__ import annotations

from collections.abc import Sequence

from marketplace.ledger.errors import InvalidAmount
from marketplace.ledger.settings import BASIS_POINTS_PER_UNIT

TOKENS_PER_PRICE_UNIT = 1_000_000
AMOUNT_MAX_MICRO_USD = 2**62  # far below BIGINT, so sums of a batch cannot overflow


def check_amount(amount: int, what: str = "amount") -> int:
    """``amount`` if it is a positive integer within range, else InvalidAmount."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidAmount(f"{what} must be an integer number of micro-USD, got {amount!r}")
    if amount <= 0:
        raise InvalidAmount(f"{what} must be positive (micro-USD), got {amount}")
    if amount > AMOUNT_MAX_MICRO_USD:
        raise InvalidAmount(f"{what} {amount} is larger than {AMOUNT_MAX_MICRO_USD} micro-USD")
    return amount


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def token_cost_micro_usd(
    input_tokens: int,
    output_tokens: int,
    price_input_micro_usd_per_mtok: int,
    price_output_micro_usd_per_mtok: int,
) -> int:
    """What one segment costs: one upward rounding over input and output together."""
    if min(input_tokens, output_tokens) < 0:
        raise InvalidAmount("token counts cannot be negative")
    if min(price_input_micro_usd_per_mtok, price_output_micro_usd_per_mtok) < 0:
        raise InvalidAmount("prices cannot be negative")
    total = (
        input_tokens * price_input_micro_usd_per_mtok
        + output_tokens * price_output_micro_usd_per_mtok
    )
    return _ceil_div(total, TOKENS_PER_PRICE_UNIT)


def max_cost_micro_usd(
    input_tokens: int,
    max_tokens: int,
    price_input_micro_usd_per_mtok: int,
    price_output_micro_usd_per_mtok: int,
) -> int:
    """The hold for a request: input tokens plus ``max_tokens`` at the matched prices."""
    return token_cost_micro_usd(
        input_tokens, max_tokens, price_input_micro_usd_per_mtok, price_output_micro_usd_per_mtok
    )


def split_fee(charge_micro_usd: int, fee_bps: int) -> tuple[int, int]:
    """``(provider, fee)`` of a charge; they add up to the charge exactly."""
    fee = charge_micro_usd * fee_bps // BASIS_POINTS_PER_UNIT
    return charge_micro_usd - fee, fee


def cap_to_hold(hold_micro_usd: int, segment_costs: Sequence[int]) -> list[int]:
    """Each segment's charge, in order, so that the total never exceeds the hold."""
    left = hold_micro_usd
    charges = []
    for cost in segment_costs:
        charge = min(cost, left)
        charges.append(charge)
        left -= charge
    return charges


def lease_total_micro_usd(price_micro_usd_per_gpu_hour: int, gpus: int, hours: int) -> int:
    """What a lease of ``hours`` costs in full."""
    return price_micro_usd_per_gpu_hour * gpus * hours


def lease_cumulative_micro_usd(total_micro_usd: int, periods_total: int, periods: int) -> int:
    """What the first ``periods`` of ``periods_total`` cost together."""
    periods = max(0, min(periods, periods_total))
    return total_micro_usd * periods // periods_total
