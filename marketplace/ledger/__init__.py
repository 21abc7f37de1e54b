"""The Mercato ledger: every request paid for exactly once.

Design (2026-11, first version)
===============================

**Money.** Integer micro-USD everywhere; token prices are micro-USD per million tokens.
Rounding is decided once in ``money``: one upward rounding per receipt, the platform fee
rounded down (in the provider's favour), ``provider + fee == charge`` exactly, a client
never charged more than it held.

**Double entry, append-only, hash-chained** (TigerBeetle's model). The journal
(``transfers``) holds transfers with caller-derived ids (``hold:<request>``,
``post:<request>``, ``earning:<request>:<segment>`` ...), so a retried operation finds
its own earlier row and answers the same. Two-phase transfers: a hold is a *pending*
transfer client → clearing, resolved by exactly one *post* (the actual cost; the rest
released), *void* or *expire*. Balances (debits/credits, posted/pending per account)
are sums of the journal, kept in ``balances`` in the same transaction; each entry's
hash commits to the previous one. ``audit.verify_ledger`` (``mercato ledger verify``)
recomputes the chain and every balance and names the first entry that does not match.

Accounts: clients (cannot go below zero), providers (bound to a node id; created on a
node's first earning if the operator has not made one), and the platform's own:
``platform.deposits`` (money in), ``platform.payouts`` (money out), ``platform.fees``,
``platform.clearing`` (requests in flight, nets to zero), ``platform.lease_escrow``.

**One settlement, exactly once.** ``settle`` verifies each node's receipt (signature,
and every billed field equal to what the coordinator relayed and counted itself; for a
segment the coordinator cut off, the node's late receipt may count more output than was
relayed, never less, and the relayed count is billed), countersigns it, appends the settlement to the intent log (one ``write``, survives a
killed process), and queues it. The settlement row is keyed by request id and every
receipt by the node's request id, so retries and replays never charge twice; recovery
replays the intent log through the same idempotent path.

**Group commit.** ``writer.GroupCommitWriter`` takes everything queued, applies it in
one transaction on its own thread (one fsync per batch: SQLite WAL with
``synchronous=FULL``, PostgreSQL with ``synchronous_commit=on``) and resolves each
operation's future when durable. The request path never waits for the disk. There is
no timer: the next batch starts the moment a commit returns ("natural" group commit), so
the delay to durable is about one commit at low load and two batch times at high load.
The writer remembers balances, providers and open holds between its batches while the
journal head is the one it wrote last (``writer_cache``), and then skips the look-ups
that only find a retried request's earlier rows: unique keys refuse a duplicate, and the
batch is re-read and re-applied, so retries answer exactly as before. Rows go to the
database as plain tuples (multi-row INSERT on SQLite; COPY on PostgreSQL, where the
statements that take arrays share one pipeline: 12 waits for the server per batch).

**Holds off the disk path.** ``Ledger.place_hold`` admits a hold against an in-memory
available balance (database value adopted after every commit + effects of queued
operations), with no ``await`` between check and reservation; the database re-checks
inside the committing batch (authoritative, also across coordinators). Holds carry an
owner and an expiry: the sweeper expires overdue holds, and a restarted owner releases
the holds its crash orphaned — no money stays stuck.

**Leases** move the whole price to an escrow account up front, pay the provider (and
fee) per elapsed period, and refund the rest when the lease ends early or the node
fails (the failed period is refunded). **Payouts** move each provider's available
balance to ``platform.payouts`` in a batch whose id makes it idempotent.

Alternatives considered: holding in the database on the request path (one commit per
request: simple, but a disk flush per request); TigerBeetle itself (not available as a
Python-embeddable store here; we keep its model); balances computed by ``SUM`` at read
(correct but O(journal) per hold).
"""

from __future__ import annotations

from marketplace.ledger.audit import AuditReport, verify_ledger
from marketplace.ledger.errors import (
    BadReceipt,
    ForgedReceipt,
    IdConflict,
    InsufficientBalance,
    InvalidAmount,
    InvalidInput,
    LedgerBusy,
    LedgerError,
    LedgerUnavailable,
    MiscountedReceipt,
    NodeLeased,
    PermissionDenied,
    RateLimited,
    ReplayedReceipt,
    RevokedKey,
    SpendLimitExceeded,
    Unauthenticated,
    UnknownAccount,
    UnknownLease,
    UnmatchedReceipt,
)
from marketplace.ledger.ledger import Hold, Ledger, Principal, RecoveryReport, SettleOutcome
from marketplace.ledger.models import AccountKind, LeaseStatus, TransferKind, TransferPhase
from marketplace.ledger.money import (
    max_cost_micro_usd,
    split_fee,
    token_cost_micro_usd,
)
from marketplace.ledger.operations import (
    HoldResult,
    LeaseRecord,
    PayoutResult,
    ReleaseResult,
    SettlementRecord,
    TransferResult,
)
from marketplace.ledger.receipts import (
    RelayedSegment,
    check_node_signature,
    check_receipt,
    countersign,
    parse_receipt,
    same_receipt,
    sign_receipt,
    verify_offline,
)
from marketplace.ledger.settings import LedgerSettings
from marketplace.ledger.store import (
    AccountView,
    IssuedKey,
    KeyView,
    LedgerStore,
    ReceiptRow,
    UsageRow,
)

__all__ = [
    "AccountKind",
    "AccountView",
    "AuditReport",
    "BadReceipt",
    "ForgedReceipt",
    "Hold",
    "HoldResult",
    "IdConflict",
    "InsufficientBalance",
    "InvalidAmount",
    "InvalidInput",
    "IssuedKey",
    "KeyView",
    "LeaseRecord",
    "LeaseStatus",
    "Ledger",
    "LedgerBusy",
    "LedgerError",
    "LedgerSettings",
    "LedgerStore",
    "LedgerUnavailable",
    "MiscountedReceipt",
    "NodeLeased",
    "PayoutResult",
    "PermissionDenied",
    "Principal",
    "RateLimited",
    "ReceiptRow",
    "RecoveryReport",
    "RelayedSegment",
    "ReleaseResult",
    "ReplayedReceipt",
    "RevokedKey",
    "SettleOutcome",
    "SettlementRecord",
    "SpendLimitExceeded",
    "TransferKind",
    "TransferPhase",
    "TransferResult",
    "Unauthenticated",
    "UnknownAccount",
    "UnknownLease",
    "UnmatchedReceipt",
    "UsageRow",
    "check_node_signature",
    "check_receipt",
    "countersign",
    "max_cost_micro_usd",
    "parse_receipt",
    "same_receipt",
    "sign_receipt",
    "split_fee",
    "token_cost_micro_usd",
    "verify_ledger",
    "verify_offline",
]
