"""The ledger's tables (SQLModel). The journal (``transfers``) is append-only; the other
tables are either immutable records (settlements, receipts, rejections) or state derived
from the journal and kept in the same transaction (balances, open holds, journal head,
leases' progress), which ``mercato ledger verify`` recomputes and compares.

Enum values are stored as their strings, so the schema is the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

import enum

from sqlalchemy import BigInteger, Column, Index, Integer, LargeBinary, UniqueConstraint, text
from sqlmodel import Field, SQLModel


class AccountKind(enum.StrEnum):
    """Who owns an account."""

    CLIENT = "client"  # pays for requests and leases; cannot go below zero
    PROVIDER = "provider"  # a node's earnings; bound to the node id; cannot go below zero
    PLATFORM = "platform"  # the platform's own accounts (fees, clearing, escrow, world)


class TransferKind(enum.StrEnum):
    """Why value moved."""

    DEPOSIT = "deposit"  # world -> client: credits bought
    HOLD = "hold"  # client -> clearing, pending: a request's maximum cost reserved
    CHARGE = "charge"  # posts a hold: the actual cost moves client -> clearing
    RELEASE = "release"  # voids a hold: nothing charged (failure, cancellation)
    EXPIRE = "expire"  # a hold nobody settled in time, released
    EARNING = "earning"  # clearing/escrow -> provider: what the node earned
    FEE = "fee"  # clearing/escrow -> platform fees
    LEASE_PREPAY = "lease_prepay"  # client -> lease escrow: a lease paid up front
    LEASE_REFUND = "lease_refund"  # lease escrow -> client: the unused part
    PAYOUT = "payout"  # provider -> world: earnings paid out
    CORRECTION = "correction"  # an operator's correcting transfer


class TransferPhase(enum.StrEnum):
    """Two-phase transfers, as in TigerBeetle."""

    SINGLE = "single"  # posted at once
    PENDING = "pending"  # reserves the amount; resolved by exactly one of the three below
    POST = "post"  # posts (part of) a pending transfer; the rest is released
    VOID = "void"  # releases a pending transfer
    EXPIRE = "expire"  # releases a pending transfer whose time ran out


class LeaseStatus(enum.StrEnum):
    """Where a dedicated lease stands."""

    ACTIVE = "active"  # paid up front, node reserved
    ENDED = "ended"  # ended by the client or at its end time; the rest refunded
    FAILED = "failed"  # the node failed; the unused part refunded


# The rows of ix_open_holds_limited_key_id.
_LIMITED_KEY = "limited_key_id IS NOT NULL"


def _big(nullable: bool = False) -> Column:
    return Column(BigInteger, nullable=nullable)


class Account(SQLModel, table=True):
    __tablename__ = "accounts"

    id: str = Field(primary_key=True, max_length=128)
    kind: str = Field(max_length=16)
    name: str = Field(max_length=64, unique=True)
    node_id: str | None = Field(default=None, max_length=128, unique=True)
    must_not_overdraw: bool = True
    created_at_unix_ms: int = Field(sa_column=_big())


class Balance(SQLModel, table=True):
    """Sums of the journal per account, updated in the same transaction as each posting."""

    __tablename__ = "balances"

    account_id: str = Field(primary_key=True, foreign_key="accounts.id", max_length=128)
    debits_posted: int = Field(default=0, sa_column=_big())
    credits_posted: int = Field(default=0, sa_column=_big())
    debits_pending: int = Field(default=0, sa_column=_big())
    credits_pending: int = Field(default=0, sa_column=_big())


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"

    id: str = Field(primary_key=True, max_length=16)
    account_id: str = Field(foreign_key="accounts.id", index=True, max_length=128)
    name: str = Field(max_length=64)
    secret_sha256: str = Field(max_length=64)
    created_at_unix_ms: int = Field(sa_column=_big())
    revoked_at_unix_ms: int | None = Field(default=None, sa_column=_big(nullable=True))
    spend_limit_micro_usd: int | None = Field(default=None, sa_column=_big(nullable=True))
    rate_limit_per_minute: int | None = None


class KeySpend(SQLModel, table=True):
    """What each API key has been charged: the sum of its settlements' costs, kept in the
    same transaction as each settlement (a spend limit is checked against it without
    summing the key's settlements)."""

    __tablename__ = "key_spend"

    api_key_id: str = Field(primary_key=True, max_length=16)
    spent_micro_usd: int = Field(default=0, sa_column=_big())


class Transfer(SQLModel, table=True):
    """One journal entry. Append-only; ``hash`` commits to ``prev_hash`` and every field."""

    __tablename__ = "transfers"

    seq: int = Field(
        sa_column=Column(
            BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=False
        )
    )
    id: str = Field(max_length=160, unique=True)
    kind: str = Field(max_length=16)
    phase: str = Field(max_length=8)
    debit_account_id: str = Field(max_length=128)
    credit_account_id: str = Field(max_length=128)
    amount: int = Field(sa_column=_big())
    pending_id: str | None = Field(default=None, max_length=160)
    request_id: str | None = Field(default=None, max_length=128)
    expires_at_unix_ms: int | None = Field(default=None, sa_column=_big(nullable=True))
    created_at_unix_ms: int = Field(sa_column=_big())
    prev_hash: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    hash: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class JournalHead(SQLModel, table=True):
    """The last journal entry: one row, locked by every writer for its batch."""

    __tablename__ = "journal_head"

    id: int = Field(default=1, primary_key=True)
    seq: int = Field(default=0, sa_column=_big())
    hash: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class OpenHold(SQLModel, table=True):
    """Pending holds not yet resolved (an index of the journal, for expiry and recovery)."""

    __tablename__ = "open_holds"
    __table_args__ = (
        # Only the holds of keys with a spend limit: the writer reads a key's open holds
        # to check that limit (applier._load_key_usage), and a key's limit is fixed when
        # it is issued. Holds of other keys stay out of the index (migration 0005).
        Index(
            "ix_open_holds_limited_key_id",
            "limited_key_id",
            sqlite_where=text(_LIMITED_KEY),
            postgresql_where=text(_LIMITED_KEY),
        ),
        {"sqlite_with_rowid": False},
    )

    transfer_id: str = Field(primary_key=True, max_length=160)
    request_id: str = Field(max_length=128, unique=True)
    account_id: str = Field(max_length=128)
    api_key_id: str | None = Field(default=None, max_length=16)
    amount: int = Field(sa_column=_big())
    expires_at_unix_ms: int = Field(sa_column=_big())
    owner: str = Field(max_length=64)
    # api_key_id when that key has a spend limit, else None (last: added by 0005).
    limited_key_id: str | None = Field(default=None, max_length=16)


class Settlement(SQLModel, table=True):
    """What one request was charged; the idempotency record of settlement."""

    __tablename__ = "settlements"
    __table_args__ = (
        Index("ix_settlements_account_created", "account_id", "created_at_unix_ms"),
        {"sqlite_with_rowid": False},
    )

    request_id: str = Field(primary_key=True, max_length=128)
    account_id: str = Field(max_length=128)
    api_key_id: str | None = Field(default=None, max_length=16)
    model: str = Field(max_length=256)
    lease_id: str | None = Field(default=None, max_length=128)
    input_tokens: int = Field(sa_column=_big())
    output_tokens: int = Field(sa_column=_big())
    hold_micro_usd: int = Field(sa_column=_big())
    cost_micro_usd: int = Field(sa_column=_big())
    fee_micro_usd: int = Field(sa_column=_big())
    capped_micro_usd: int = Field(sa_column=_big())
    created_at_unix_ms: int = Field(sa_column=_big())


class Receipt(SQLModel, table=True):
    """A node's usage receipt, verified and countersigned. The node's request id is unique:
    a receipt can be settled once."""

    __tablename__ = "receipts"
    __table_args__ = (
        UniqueConstraint("request_id", "segment_index"),
        {"sqlite_with_rowid": False},
    )

    worker_request_id: str = Field(primary_key=True, max_length=128)
    request_id: str = Field(max_length=128)  # indexed by the unique (request, segment)
    segment_index: int
    node_id: str = Field(max_length=128)
    model: str = Field(max_length=256)
    input_tokens: int = Field(sa_column=_big())
    output_tokens: int = Field(sa_column=_big())
    cost_micro_usd: int = Field(sa_column=_big())
    receipt: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    node_public_key: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    node_signature: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    coordinator_public_key: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    coordinator_signature: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at_unix_ms: int = Field(sa_column=_big())


class ReceiptRejection(SQLModel, table=True):
    """A receipt refused at settlement: forged, altered, replayed or miscounted."""

    __tablename__ = "receipt_rejections"

    id: int | None = Field(default=None, primary_key=True)
    request_id: str = Field(max_length=128, index=True)
    node_id: str = Field(max_length=128)
    reason: str = Field(max_length=32)
    detail: str = Field(max_length=1024)
    receipt: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    created_at_unix_ms: int = Field(sa_column=_big())


class Lease(SQLModel, table=True):
    """A node leased for dedicated use. Money moves only through the journal."""

    __tablename__ = "leases"

    id: str = Field(primary_key=True, max_length=128)
    account_id: str = Field(max_length=128, index=True)
    provider_account_id: str = Field(max_length=128)
    node_id: str = Field(max_length=128, index=True)
    gpus: int
    price_micro_usd_per_gpu_hour: int = Field(sa_column=_big())
    period_s: int
    periods_total: int
    periods_charged: int = 0
    total_micro_usd: int = Field(sa_column=_big())
    charged_micro_usd: int = Field(default=0, sa_column=_big())
    fee_bps: int
    status: str = Field(max_length=16)
    started_at_unix_ms: int = Field(sa_column=_big())
    ends_at_unix_ms: int = Field(sa_column=_big())
    ended_at_unix_ms: int | None = Field(default=None, sa_column=_big(nullable=True))
    # The API key that created the lease: its prepaid price, less any refund, counts
    # against that key's spend limit (key_spend). None for leases made without a key.
    api_key_id: str | None = Field(default=None, max_length=16)


class PayoutBatch(SQLModel, table=True):
    """One payout run: the transfers are ``payout:<batch id>:<account id>``."""

    __tablename__ = "payout_batches"

    id: str = Field(primary_key=True, max_length=128)
    payouts: int
    total_micro_usd: int = Field(sa_column=_big())
    created_at_unix_ms: int = Field(sa_column=_big())
