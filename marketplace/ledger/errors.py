"""Every way a ledger call can be refused, and the gRPC status each one maps to.

```
LedgerError                      INTERNAL           a bug or a broken invariant
├── InvalidInput                 INVALID_ARGUMENT   a field is malformed
│   ├── InvalidAmount            INVALID_ARGUMENT   zero, negative or too large
│   ├── InvalidIdentifier        INVALID_ARGUMENT   an id with characters or length not allowed
│   └── InvalidLeaseHours        INVALID_ARGUMENT   a lease of 0 hours, or longer than 366 days
├── NotFound                     NOT_FOUND
│   ├── UnknownAccount           NOT_FOUND
│   ├── UnknownKey               NOT_FOUND          (operator commands; auth uses Unauthenticated)
│   ├── UnknownHold              NOT_FOUND
│   ├── UnknownLease             NOT_FOUND
│   └── UnknownReceipt           NOT_FOUND
├── IdConflict                   ALREADY_EXISTS     an id reused with different content
├── FailedPrecondition           FAILED_PRECONDITION
│   ├── InsufficientBalance      FAILED_PRECONDITION "insufficient balance: need X, have Y"
│   ├── WrongAccountKind         FAILED_PRECONDITION e.g. a deposit into a platform account
│   ├── LeaseNotActive           FAILED_PRECONDITION
│   └── NodeLeased               FAILED_PRECONDITION another active lease holds the node
├── Unauthenticated              UNAUTHENTICATED
│   ├── MalformedKey             UNAUTHENTICATED    not "mk_<id>_<secret>"
│   ├── InvalidKey               UNAUTHENTICATED    unknown id or wrong secret (not told apart)
│   └── RevokedKey               UNAUTHENTICATED
├── PermissionDenied             PERMISSION_DENIED  a valid key that may not do this
├── LimitExceeded                RESOURCE_EXHAUSTED
│   ├── RateLimited              RESOURCE_EXHAUSTED the key's requests per minute
│   └── SpendLimitExceeded       RESOURCE_EXHAUSTED the key's spend limit
├── BadReceipt                   INVALID_ARGUMENT   a usage receipt refused (and recorded)
│   ├── MalformedReceipt         INVALID_ARGUMENT   bytes that do not parse, missing fields
│   ├── MiscountedReceipt        INVALID_ARGUMENT   counts/prices/ids differ from what was relayed
│   ├── ForgedReceipt            PERMISSION_DENIED  a signature that does not verify
│   ├── ReplayedReceipt          ALREADY_EXISTS     a receipt already settled for another request
│   └── UnmatchedReceipt         FAILED_PRECONDITION a late receipt no pending settlement awaits
└── LedgerUnavailable            UNAVAILABLE        the writer is stopped or the database is down
    └── LedgerBusy               UNAVAILABLE        another process writes as this owner
```

Each class carries ``grpc_status`` (a ``grpc.StatusCode``) and a short ``code`` for JSON
output. Messages are written for a person: they say what is wrong and what to do.
"""

from __future__ import annotations

import grpc


class LedgerError(Exception):
    """Base of every ledger error."""

    grpc_status: grpc.StatusCode = grpc.StatusCode.INTERNAL
    code: str = "internal"


class InvalidInput(LedgerError):
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT
    code = "invalid_argument"


class InvalidAmount(InvalidInput):
    code = "invalid_amount"


class InvalidIdentifier(InvalidInput):
    code = "invalid_identifier"


class InvalidLeaseHours(InvalidInput):
    """A lease's ``hours`` out of 1..``LEASE_HOURS_MAX`` (``marketplace.ledger.ledger``)."""

    code = "invalid_lease_hours"


class NotFound(LedgerError):
    grpc_status = grpc.StatusCode.NOT_FOUND
    code = "not_found"


class UnknownAccount(NotFound):
    code = "unknown_account"


class UnknownKey(NotFound):
    code = "unknown_key"


class UnknownHold(NotFound):
    code = "unknown_hold"


class UnknownLease(NotFound):
    code = "unknown_lease"


class UnknownReceipt(NotFound):
    code = "unknown_receipt"


class IdConflict(LedgerError):
    grpc_status = grpc.StatusCode.ALREADY_EXISTS
    code = "id_conflict"


class FailedPrecondition(LedgerError):
    grpc_status = grpc.StatusCode.FAILED_PRECONDITION
    code = "failed_precondition"


class InsufficientBalance(FailedPrecondition):
    code = "insufficient_balance"

    def __init__(self, need_micro_usd: int, have_micro_usd: int, account_id: str = "") -> None:
        self.need_micro_usd = need_micro_usd
        self.have_micro_usd = have_micro_usd
        self.account_id = account_id
        super().__init__(
            f"insufficient balance: need {need_micro_usd}, have {have_micro_usd}"
            " (micro-USD; deposit credits or lower max_tokens)"
        )


class WrongAccountKind(FailedPrecondition):
    code = "wrong_account_kind"


class LeaseNotActive(FailedPrecondition):
    code = "lease_not_active"


class NodeLeased(FailedPrecondition):
    """The node is under another active lease: a node is leased whole, to one client."""

    code = "node_leased"


class Unauthenticated(LedgerError):
    grpc_status = grpc.StatusCode.UNAUTHENTICATED
    code = "unauthenticated"


class MalformedKey(Unauthenticated):
    code = "malformed_key"


class InvalidKey(Unauthenticated):
    code = "invalid_key"


class RevokedKey(Unauthenticated):
    code = "revoked_key"


class PermissionDenied(LedgerError):
    grpc_status = grpc.StatusCode.PERMISSION_DENIED
    code = "permission_denied"


class LimitExceeded(LedgerError):
    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED
    code = "resource_exhausted"


class RateLimited(LimitExceeded):
    code = "rate_limited"


class SpendLimitExceeded(LimitExceeded):
    code = "spend_limit_exceeded"

    @classmethod
    def reached(
        cls, key_id: str, limit: int, committed: int, amount: int, *, lease: bool = False
    ) -> SpendLimitExceeded:
        """``committed``: what the key has spent and holds in open requests; ``amount``:
        what the request (or, ``lease``, the lease) would add."""
        needs, fix = (
            ("this lease costs", ", lease fewer hours") if lease else ("this request needs", "")
        )
        return cls(
            f"spend limit of key {key_id} reached: limit {limit}, spent or held by requests "
            f"in flight {committed}, {needs} {amount} (micro-USD); raise the limit{fix} or "
            "use another key"
        )


class BadReceipt(LedgerError):
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT
    code = "bad_receipt"


class MalformedReceipt(BadReceipt):
    code = "malformed_receipt"


class MiscountedReceipt(BadReceipt):
    code = "miscounted_receipt"


class ForgedReceipt(BadReceipt):
    grpc_status = grpc.StatusCode.PERMISSION_DENIED
    code = "forged_receipt"


class ReplayedReceipt(BadReceipt):
    grpc_status = grpc.StatusCode.ALREADY_EXISTS
    code = "replayed_receipt"


class UnmatchedReceipt(BadReceipt):
    """A late receipt (sent on a node's heartbeat stream) that no pending settlement
    awaits: its request was settled or released already, is unknown, or relayed nothing
    from that node request."""

    grpc_status = grpc.StatusCode.FAILED_PRECONDITION
    code = "unmatched_receipt"


class LedgerUnavailable(LedgerError):
    grpc_status = grpc.StatusCode.UNAVAILABLE
    code = "unavailable"


class LedgerBusy(LedgerUnavailable):
    """Another live process is this owner's ledger writer (same coordinator identity and
    data directory): starting a second would void the first one's open holds."""

    code = "busy"
