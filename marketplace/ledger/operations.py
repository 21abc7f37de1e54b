"""Operations the ledger writer applies, and what each one answers.

An operation is a plain immutable value. Its effects are derived only from its fields
and the state it finds, so applying it twice (a retry, a replay, crash recovery) finds
its own earlier effect and answers the same without writing again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from marketplace.ledger.models import TransferKind


@dataclass(frozen=True)
class PostTransfer:
    """A single-phase transfer with a caller-chosen id (deposit, payout, correction)."""

    transfer_id: str
    kind: TransferKind
    debit_account_id: str
    credit_account_id: str
    amount: int


@dataclass(frozen=True)
class PlaceHold:
    """Reserve a request's maximum cost (pending transfer client -> clearing)."""

    request_id: str
    account_id: str
    amount: int
    expires_at_unix_ms: int
    owner: str
    api_key_id: str | None = None
    # The key's spend limit, from the key row the caller authenticated: the writer
    # refuses the hold if the key's spend and open holds (every coordinator's) plus this
    # one would pass it (SpendLimitExceeded). None: no limit, nothing read.
    spend_limit_micro_usd: int | None = None


@dataclass(frozen=True)
class ReleaseHold:
    """Void (or expire) a request's hold; nothing is charged."""

    request_id: str
    expire: bool = False
    only_if_expired_at_unix_ms: int | None = None  # sweeper: skip holds not yet expired


@dataclass(frozen=True)
class SettleSegment:
    """One verified, countersigned receipt and what it costs."""

    worker_request_id: str
    segment_index: int
    node_id: str
    model: str
    input_tokens: int
    output_tokens: int
    cost_micro_usd: int
    receipt: bytes
    node_public_key: bytes
    node_signature: bytes
    coordinator_public_key: bytes
    coordinator_signature: bytes


@dataclass(frozen=True)
class Settle:
    """Charge a request's actual cost, pay its providers and the fee, release the rest."""

    request_id: str
    account_id: str
    model: str
    fee_bps: int
    segments: tuple[SettleSegment, ...]
    hold_micro_usd: int  # the hold as the caller knows it (used if the hold row is missing)
    api_key_id: str | None = None
    lease_id: str | None = None
    # The key's spend limit: a charge made without its hold (the writer refused it, or
    # it expired) is also capped at what the limit has left. None: no limit.
    spend_limit_micro_usd: int | None = None
    # The coordinator settling (its ledger owner): a hold another coordinator placed for
    # the same request id is not this request's (IdConflict). None: not checked.
    owner: str | None = None


@dataclass(frozen=True)
class RecordRejection:
    """A refused receipt, kept for the provider's record and for audits."""

    request_id: str
    node_id: str
    reason: str
    detail: str
    receipt: bytes | None


@dataclass(frozen=True)
class ReadAvailable:
    """The account's available balance, in order with the operations before it."""

    account_id: str


@dataclass(frozen=True)
class ReadKeySpend:
    """What counts toward a key's spend limit, in order with the operations before it:
    answers ``KeyUsage`` (its settled spend, and the holds of other owners still open)."""

    api_key_id: str
    owner: str  # the asking coordinator: its own holds are not counted (it knows them)


@dataclass(frozen=True)
class CreateLease:
    lease_id: str
    account_id: str
    node_id: str
    gpus: int
    price_micro_usd_per_gpu_hour: int
    hours: int
    period_s: int
    fee_bps: int
    started_at_unix_ms: int
    api_key_id: str | None = None  # the paying key: the price counts toward its spend
    spend_limit_micro_usd: int | None = None  # checked by the writer, as for PlaceHold


@dataclass(frozen=True)
class ChargeLease:
    """Charge the lease's periods elapsed by ``now_unix_ms``."""

    lease_id: str
    now_unix_ms: int


@dataclass(frozen=True)
class EndLease:
    """End a lease early: the client stops it, or its node failed. The rest is refunded."""

    lease_id: str
    now_unix_ms: int
    node_failed: bool = False


@dataclass(frozen=True)
class RunPayouts:
    batch_id: str
    min_micro_usd: int


Operation = (
    PostTransfer
    | PlaceHold
    | ReleaseHold
    | Settle
    | RecordRejection
    | ReadAvailable
    | ReadKeySpend
    | CreateLease
    | ChargeLease
    | EndLease
    | RunPayouts
)


@dataclass(frozen=True)
class TransferResult:
    transfer_id: str
    amount: int
    created: bool


@dataclass(frozen=True)
class HoldResult:
    request_id: str
    account_id: str
    amount: int
    created: bool


@dataclass(frozen=True)
class KeyUsage:
    """What a key's spend limit is checked against, as the database has it."""

    spent_micro_usd: int  # settled, and leases' prepaid prices less refunds
    held_by_others_micro_usd: int  # open holds placed by other owners (coordinators)


@dataclass(frozen=True)
class ReleaseResult:
    request_id: str
    released_micro_usd: int
    status: str  # "released", "expired", "settled", "already_released", "unknown", "not_due"


@dataclass(frozen=True)
class SettlementRecord:
    request_id: str
    account_id: str
    cost_micro_usd: int  # what the client was charged
    fee_micro_usd: int  # the platform's part of it
    provider_micro_usd: int  # the providers' part (cost - fee)
    hold_micro_usd: int
    capped_micro_usd: int  # cost above the hold that was not charged
    input_tokens: int
    output_tokens: int
    created: bool  # False: this request was settled before (an idempotent retry)


@dataclass(frozen=True)
class LeaseRecord:
    lease_id: str
    account_id: str
    node_id: str
    status: str
    total_micro_usd: int
    charged_micro_usd: int
    refunded_micro_usd: int
    periods_total: int
    periods_charged: int
    started_at_unix_ms: int
    ends_at_unix_ms: int
    api_key_id: str | None = None  # the key that created it


@dataclass(frozen=True)
class PayoutResult:
    batch_id: str
    payouts: list[tuple[str, int]] = field(default_factory=list)  # (account id, micro-USD)
    created: bool = False

    @property
    def total_micro_usd(self) -> int:
        return sum(amount for _, amount in self.payouts)
