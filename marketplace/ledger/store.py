"""The ledger's synchronous side: operator commands and reads.

``LedgerStore`` wraps an Engine. Account and key administration write here directly;
anything that moves money goes through ``apply_batch`` in its own transaction (the same
code the group-commit writer runs), so the operator CLI and a running coordinator can
share one database safely: both serialize on the journal head.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mercato.v1 import market_pb2
from sqlalchemy import Engine, and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from marketplace.ledger import api_keys, identifiers, money
from marketplace.ledger.applier import (
    DEPOSITS,
    T_ACCOUNTS,
    T_BALANCES,
    T_HOLDS,
    T_KEY_SPEND,
    T_LEASES,
    T_RECEIPTS,
    T_REJECTIONS,
    T_SETTLEMENTS,
    T_TRANSFERS,
    hold_id,
    now_unix_ms,
)
from marketplace.ledger.database import WRITE_OPTION, open_engine
from marketplace.ledger.errors import (
    IdConflict,
    InvalidInput,
    LedgerError,
    UnknownAccount,
    UnknownKey,
    UnknownReceipt,
)
from marketplace.ledger.models import AccountKind, ApiKey, TransferKind
from marketplace.ledger.operations import (
    LeaseRecord,
    Operation,
    PayoutResult,
    PostTransfer,
    RunPayouts,
)
from marketplace.ledger.settings import LedgerSettings
from marketplace.ledger.writer import commit_ops

T_KEYS = ApiKey.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class AccountView:
    id: str
    kind: str
    name: str
    node_id: str | None
    posted_micro_usd: int  # credits posted - debits posted
    pending_debits_micro_usd: int  # held for requests in flight
    available_micro_usd: int  # posted - pending debits
    created_at_unix_ms: int


@dataclass(frozen=True)
class KeyView:
    id: str
    account_id: str
    name: str
    created_at_unix_ms: int
    revoked_at_unix_ms: int | None
    spend_limit_micro_usd: int | None
    rate_limit_per_minute: int | None


@dataclass(frozen=True)
class IssuedKey:
    key: KeyView
    secret_key: str  # the full "mk_<id>_<secret>"; shown once, never stored


@dataclass(frozen=True)
class UsageRow:
    day: str  # YYYY-MM-DD (UTC)
    api_key_id: str | None
    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    cost_micro_usd: int


@dataclass(frozen=True)
class ReceiptRow:
    """One settled receipt of an account's request, with what it cost."""

    request_id: str
    worker_request_id: str  # the node's request id (unique: a receipt pays once)
    segment_index: int
    node_id: str
    model: str
    input_tokens: int
    output_tokens: int
    cost_micro_usd: int
    settled_at_unix_ms: int
    signed: market_pb2.SignedReceipt  # countersigned


@dataclass(frozen=True)
class KeyRecord:
    """What authentication needs of a key row."""

    id: str
    account_id: str
    account_kind: str
    secret_sha256: str
    revoked: bool
    spend_limit_micro_usd: int | None
    rate_limit_per_minute: int | None


def _account_view(row: Any) -> AccountView:
    posted = row.credits_posted - row.debits_posted
    return AccountView(
        id=row.id,
        kind=row.kind,
        name=row.name,
        node_id=row.node_id,
        posted_micro_usd=posted,
        pending_debits_micro_usd=row.debits_pending,
        available_micro_usd=posted - row.debits_pending,
        created_at_unix_ms=row.created_at_unix_ms,
    )


def _key_view(row: Any) -> KeyView:
    return KeyView(
        id=row.id,
        account_id=row.account_id,
        name=row.name,
        created_at_unix_ms=row.created_at_unix_ms,
        revoked_at_unix_ms=row.revoked_at_unix_ms,
        spend_limit_micro_usd=row.spend_limit_micro_usd,
        rate_limit_per_minute=row.rate_limit_per_minute,
    )


def _day(unix_ms: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(unix_ms // 1000))


class LedgerStore:
    """Synchronous access to one ledger database."""

    def __init__(self, engine: Engine, settings: LedgerSettings) -> None:
        self.engine = engine
        self.settings = settings

    @classmethod
    def open(cls, settings: LedgerSettings | None = None) -> LedgerStore:
        """Open (and migrate) the database named by ``settings``."""
        settings = settings or LedgerSettings()
        return cls(open_engine(settings), settings)

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------ writes

    def apply(self, ops: Sequence[Operation]) -> list[Any]:
        """Apply money-moving operations in one transaction; raise the first refusal."""
        with self.engine.connect().execution_options(**{WRITE_OPTION: True}) as conn:
            answers, _ = commit_ops(conn, ops)
        for answer in answers:
            if isinstance(answer, LedgerError):
                raise answer
        return answers

    def create_account(
        self,
        kind: AccountKind,
        name: str,
        *,
        node_id: str | None = None,
        account_id: str | None = None,
    ) -> AccountView:
        kind = AccountKind(kind)
        identifiers.check_name(name, "account name")
        if kind is AccountKind.PLATFORM:
            raise InvalidInput("platform accounts are built in; create a client or provider")
        if kind is AccountKind.PROVIDER and not node_id:
            raise InvalidInput("a provider account needs --node-id (the node's 12D3KooW... id)")
        if kind is AccountKind.CLIENT and node_id:
            raise InvalidInput("only provider accounts are bound to a node id")
        if node_id is not None:
            identifiers.check_id(node_id, "node id")
        account_id = identifiers.check_id(account_id or identifiers.new_id("acct"), "account id")
        now = now_unix_ms()
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    T_ACCOUNTS.insert().values(
                        id=account_id,
                        kind=kind.value,
                        name=name,
                        node_id=node_id,
                        must_not_overdraw=True,
                        created_at_unix_ms=now,
                    )
                )
                conn.execute(
                    T_BALANCES.insert().values(
                        account_id=account_id,
                        debits_posted=0,
                        credits_posted=0,
                        debits_pending=0,
                        credits_pending=0,
                    )
                )
        except IntegrityError as exc:
            raise IdConflict(
                f"an account with id {account_id!r}, name {name!r}"
                + (f" or node id {node_id!r}" if node_id else "")
                + " exists already; pick another name"
            ) from exc
        return self.account(account_id)

    def issue_key(
        self,
        account_ref: str,
        name: str = "default",
        *,
        spend_limit_micro_usd: int | None = None,
        rate_limit_per_minute: int | None = None,
    ) -> IssuedKey:
        account = self.account(account_ref)
        identifiers.check_name(name, "key name")
        if spend_limit_micro_usd is not None:
            money.check_amount(spend_limit_micro_usd, "spend limit")
        if rate_limit_per_minute is not None and rate_limit_per_minute <= 0:
            raise InvalidInput("rate limit must be a positive number of requests per minute")
        key_id, full_key, digest = api_keys.new_key()
        now = now_unix_ms()
        with self.engine.begin() as conn:
            conn.execute(
                T_KEYS.insert().values(
                    id=key_id,
                    account_id=account.id,
                    name=name,
                    secret_sha256=digest,
                    created_at_unix_ms=now,
                    revoked_at_unix_ms=None,
                    spend_limit_micro_usd=spend_limit_micro_usd,
                    rate_limit_per_minute=rate_limit_per_minute,
                )
            )
        return IssuedKey(self.key(key_id), full_key)

    def revoke_key(self, key_ref: str) -> KeyView:
        """Revoke a key (by id or full key). Revoking twice is harmless."""
        key_id = api_keys.parse_key(key_ref)[0] if key_ref.startswith("mk_") else key_ref
        with self.engine.begin() as conn:
            conn.execute(
                update(T_KEYS)
                .where(T_KEYS.c.id == key_id, T_KEYS.c.revoked_at_unix_ms.is_(None))
                .values(revoked_at_unix_ms=now_unix_ms())
            )
        return self.key(key_id)

    def deposit(self, account_ref: str, amount: int, transfer_id: str | None = None) -> Any:
        money.check_amount(amount)
        account = self.account(account_ref)
        transfer_id = identifiers.check_id(
            transfer_id or identifiers.new_id("deposit"), "transfer id"
        )
        return self.apply(
            [PostTransfer(transfer_id, TransferKind.DEPOSIT, DEPOSITS, account.id, amount)]
        )[0]

    def correct(self, transfer_id: str, debit_ref: str, credit_ref: str, amount: int) -> Any:
        """A correcting transfer (rows are never edited; mistakes are undone by new rows)."""
        money.check_amount(amount)
        identifiers.check_id(transfer_id, "transfer id")
        debit, credit = self.account(debit_ref), self.account(credit_ref)
        return self.apply(
            [PostTransfer(transfer_id, TransferKind.CORRECTION, debit.id, credit.id, amount)]
        )[0]

    def run_payouts(
        self, batch_id: str | None = None, min_micro_usd: int | None = None
    ) -> PayoutResult:
        """Pay every provider's available balance out (records only).

        Idempotent: a run with the id of an earlier batch answers that batch; a run
        without an id that finds nothing due creates nothing. Either way, twice pays once.
        """
        batch_id = identifiers.check_id(batch_id or identifiers.new_id("payouts"), "batch id")
        minimum = min_micro_usd or self.settings.payout_min_micro_usd
        money.check_amount(minimum, "minimum payout")
        return self.apply([RunPayouts(batch_id, minimum)])[0]

    # ------------------------------------------------------------ reads

    def _accounts_query(self):  # type: ignore[no-untyped-def]
        return select(
            T_ACCOUNTS.c.id,
            T_ACCOUNTS.c.kind,
            T_ACCOUNTS.c.name,
            T_ACCOUNTS.c.node_id,
            T_ACCOUNTS.c.created_at_unix_ms,
            T_BALANCES.c.debits_posted,
            T_BALANCES.c.credits_posted,
            T_BALANCES.c.debits_pending,
        ).join(T_BALANCES, T_BALANCES.c.account_id == T_ACCOUNTS.c.id)

    def account(self, ref: str) -> AccountView:
        """An account by id, name or node id."""
        with self.engine.connect() as conn:
            row = conn.execute(
                self._accounts_query().where(
                    or_(
                        T_ACCOUNTS.c.id == ref,
                        T_ACCOUNTS.c.name == ref,
                        T_ACCOUNTS.c.node_id == ref,
                    )
                )
            ).first()
        if row is None:
            raise UnknownAccount(
                f"no account with id, name or node id {ref!r}; see 'mercato accounts list'"
            )
        return _account_view(row)

    def accounts(self, kind: AccountKind | None = None) -> list[AccountView]:
        query = self._accounts_query().order_by(T_ACCOUNTS.c.kind, T_ACCOUNTS.c.name)
        if kind is not None:
            query = query.where(T_ACCOUNTS.c.kind == AccountKind(kind).value)
        with self.engine.connect() as conn:
            return [_account_view(row) for row in conn.execute(query)]

    def key(self, key_id: str) -> KeyView:
        with self.engine.connect() as conn:
            row = conn.execute(select(T_KEYS).where(T_KEYS.c.id == key_id)).first()
        if row is None:
            raise UnknownKey(f"no API key with id {key_id!r}; see 'mercato keys list'")
        return _key_view(row)

    def keys(self, account_ref: str | None = None) -> list[KeyView]:
        query = select(T_KEYS).order_by(T_KEYS.c.created_at_unix_ms)
        if account_ref is not None:
            query = query.where(T_KEYS.c.account_id == self.account(account_ref).id)
        with self.engine.connect() as conn:
            return [_key_view(row) for row in conn.execute(query)]

    def key_record(self, key_id: str) -> KeyRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(
                    T_KEYS.c.id,
                    T_KEYS.c.account_id,
                    T_KEYS.c.secret_sha256,
                    T_KEYS.c.revoked_at_unix_ms,
                    T_KEYS.c.spend_limit_micro_usd,
                    T_KEYS.c.rate_limit_per_minute,
                    T_ACCOUNTS.c.kind,
                )
                .join(T_ACCOUNTS, T_ACCOUNTS.c.id == T_KEYS.c.account_id)
                .where(T_KEYS.c.id == key_id)
            ).first()
        if row is None:
            return None
        return KeyRecord(
            id=row.id,
            account_id=row.account_id,
            account_kind=row.kind,
            secret_sha256=row.secret_sha256,
            revoked=row.revoked_at_unix_ms is not None,
            spend_limit_micro_usd=row.spend_limit_micro_usd,
            rate_limit_per_minute=row.rate_limit_per_minute,
        )

    def key_usage(self, key_id: str) -> tuple[int, int]:
        """What counts toward the key's spend limit: (spent, held by its open holds).

        A limited key's holds are read through the partial index on ``limited_key_id``;
        another key's (only shown, never checked) by a scan of the open holds."""
        with self.engine.connect() as conn:
            spent = conn.execute(
                select(T_KEY_SPEND.c.spent_micro_usd).where(T_KEY_SPEND.c.api_key_id == key_id)
            ).scalar_one_or_none()
            limited = conn.execute(
                select(T_KEYS.c.spend_limit_micro_usd).where(T_KEYS.c.id == key_id)
            ).scalar_one_or_none()
            column = T_HOLDS.c.limited_key_id if limited is not None else T_HOLDS.c.api_key_id
            held = conn.execute(
                select(func.coalesce(func.sum(T_HOLDS.c.amount), 0)).where(column == key_id)
            ).scalar_one()
        return int(spent or 0), int(held)

    def key_spent_micro_usd(self, key_id: str) -> int:
        """What the key has been charged so far (settlements, leases less refunds)."""
        return self.key_usage(key_id)[0]

    def usage(
        self,
        account_ref: str | None = None,
        *,
        since_unix_ms: int | None = None,
        api_key_id: str | None = None,
        model: str | None = None,
    ) -> list[UsageRow]:
        """Requests, tokens and cost grouped by day (UTC), key and model."""
        query = select(
            T_SETTLEMENTS.c.created_at_unix_ms,
            T_SETTLEMENTS.c.api_key_id,
            T_SETTLEMENTS.c.model,
            T_SETTLEMENTS.c.input_tokens,
            T_SETTLEMENTS.c.output_tokens,
            T_SETTLEMENTS.c.cost_micro_usd,
        )
        if account_ref is not None:
            query = query.where(T_SETTLEMENTS.c.account_id == self.account(account_ref).id)
        if since_unix_ms is not None:
            query = query.where(T_SETTLEMENTS.c.created_at_unix_ms >= since_unix_ms)
        if api_key_id is not None:
            query = query.where(T_SETTLEMENTS.c.api_key_id == api_key_id)
        if model is not None:
            query = query.where(T_SETTLEMENTS.c.model == model)
        groups: dict[tuple[str, str | None, str], list[int]] = {}
        with self.engine.connect() as conn:
            for row in conn.execute(query):
                key = (_day(row.created_at_unix_ms), row.api_key_id, row.model)
                sums = groups.setdefault(key, [0, 0, 0, 0])
                sums[0] += 1
                sums[1] += row.input_tokens
                sums[2] += row.output_tokens
                sums[3] += row.cost_micro_usd
        return [
            UsageRow(d, k, m, *sums)
            for (d, k, m), sums in sorted(
                groups.items(), key=lambda item: (item[0][0], str(item[0][1]), item[0][2])
            )
        ]

    def receipts(self, request_id: str) -> list[market_pb2.SignedReceipt]:
        """The countersigned receipts of one request, by segment."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(T_RECEIPTS)
                .where(T_RECEIPTS.c.request_id == request_id)
                .order_by(T_RECEIPTS.c.segment_index)
            ).all()
        if not rows:
            raise UnknownReceipt(
                f"no receipts for request {request_id!r} (not settled, or settled under a lease "
                "with no receipts)"
            )
        return [_signed(row) for row in rows]

    def account_receipts(
        self, account_ref: str, *, limit: int = 100, since_unix_ms: int | None = None
    ) -> list[tuple[str, market_pb2.SignedReceipt]]:
        """``(request id, receipt)`` for an account's requests, newest first."""
        account = self.account(account_ref)
        query = (
            select(T_RECEIPTS)
            .join(T_SETTLEMENTS, T_SETTLEMENTS.c.request_id == T_RECEIPTS.c.request_id)
            .where(T_SETTLEMENTS.c.account_id == account.id)
            .order_by(T_RECEIPTS.c.created_at_unix_ms.desc(), T_RECEIPTS.c.worker_request_id)
            .limit(limit)
        )
        if since_unix_ms is not None:
            query = query.where(T_RECEIPTS.c.created_at_unix_ms >= since_unix_ms)
        with self.engine.connect() as conn:
            return [(row.request_id, _signed(row)) for row in conn.execute(query)]

    def receipt_page(
        self,
        account_id: str,
        *,
        limit: int = 50,
        after: tuple[int, str] | None = None,
        request_id: str | None = None,
        since_unix_ms: int | None = None,
    ) -> list[ReceiptRow]:
        """Receipts of ``account_id``'s requests, newest first, ``limit`` of them, starting
        after the ``(settled_at_unix_ms, worker_request_id)`` of the previous page's last."""
        created = T_RECEIPTS.c.created_at_unix_ms
        worker = T_RECEIPTS.c.worker_request_id
        query = (
            select(T_RECEIPTS)
            .join(T_SETTLEMENTS, T_SETTLEMENTS.c.request_id == T_RECEIPTS.c.request_id)
            .where(T_SETTLEMENTS.c.account_id == account_id)
            .order_by(created.desc(), worker)
            .limit(limit)
        )
        if request_id is not None:
            query = query.where(T_RECEIPTS.c.request_id == request_id)
        if since_unix_ms is not None:
            query = query.where(created >= since_unix_ms)
        if after is not None:
            query = query.where(
                or_(created < after[0], and_(created == after[0], worker > after[1]))
            )
        with self.engine.connect() as conn:
            return [
                ReceiptRow(
                    request_id=row.request_id,
                    worker_request_id=row.worker_request_id,
                    segment_index=row.segment_index,
                    node_id=row.node_id,
                    model=row.model,
                    input_tokens=row.input_tokens,
                    output_tokens=row.output_tokens,
                    cost_micro_usd=row.cost_micro_usd,
                    settled_at_unix_ms=row.created_at_unix_ms,
                    signed=_signed(row),
                )
                for row in conn.execute(query)
            ]

    def settlement(self, request_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(T_SETTLEMENTS).where(T_SETTLEMENTS.c.request_id == request_id)
            ).first()
        return dict(row._mapping) if row is not None else None

    def request_id_use(self, request_id: str) -> str | None:
        """How the journal already knows ``request_id``: "settled", "held" (a hold was
        placed for it: open, or released or expired since), or None (never used)."""
        with self.engine.connect() as conn:
            if conn.execute(
                select(T_SETTLEMENTS.c.request_id).where(T_SETTLEMENTS.c.request_id == request_id)
            ).first():
                return "settled"
            if conn.execute(
                select(T_TRANSFERS.c.seq).where(T_TRANSFERS.c.id == hold_id(request_id))
            ).first():
                return "held"
        return None

    def receipt_owner(self, worker_request_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(
                select(T_RECEIPTS.c.request_id).where(
                    T_RECEIPTS.c.worker_request_id == worker_request_id
                )
            ).scalar_one_or_none()

    def rejections(self, request_id: str | None = None) -> list[dict[str, Any]]:
        query = select(T_REJECTIONS).order_by(T_REJECTIONS.c.id)
        if request_id is not None:
            query = query.where(T_REJECTIONS.c.request_id == request_id)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def open_holds(
        self,
        *,
        owner: str | None = None,
        expired_at_unix_ms: int | None = None,
        request_id: str | None = None,
    ) -> list[dict[str, Any]]:
        query = select(T_HOLDS).order_by(T_HOLDS.c.request_id)
        if request_id is not None:
            query = query.where(T_HOLDS.c.request_id == request_id)
        if owner is not None:
            query = query.where(T_HOLDS.c.owner == owner)
        if expired_at_unix_ms is not None:
            query = query.where(T_HOLDS.c.expires_at_unix_ms <= expired_at_unix_ms)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def lease(self, lease_id: str) -> LeaseRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(T_LEASES).where(T_LEASES.c.id == lease_id)).first()
        return _lease_view(row) if row is not None else None

    def leases(self, *, active_only: bool = False) -> list[LeaseRecord]:
        query = select(T_LEASES).order_by(T_LEASES.c.started_at_unix_ms)
        if active_only:
            query = query.where(T_LEASES.c.status == "active")
        with self.engine.connect() as conn:
            return [_lease_view(row) for row in conn.execute(query)]

    def lease_page(
        self,
        account_id: str,
        *,
        limit: int = 50,
        after: tuple[int, str] | None = None,
        active_only: bool = False,
    ) -> list[LeaseRecord]:
        """``account_id``'s leases, newest first, ``limit`` of them, starting after the
        ``(started_at_unix_ms, lease id)`` of the previous page's last."""
        started = T_LEASES.c.started_at_unix_ms
        lease_id = T_LEASES.c.id
        query = (
            select(T_LEASES)
            .where(T_LEASES.c.account_id == account_id)
            .order_by(started.desc(), lease_id)
            .limit(limit)
        )
        if active_only:
            query = query.where(T_LEASES.c.status == "active")
        if after is not None:
            query = query.where(
                or_(started < after[0], and_(started == after[0], lease_id > after[1]))
            )
        with self.engine.connect() as conn:
            return [_lease_view(row) for row in conn.execute(query)]


def _lease_view(row: Any) -> LeaseRecord:
    ended = row.status != "active"
    return LeaseRecord(
        lease_id=row.id,
        account_id=row.account_id,
        node_id=row.node_id,
        status=row.status,
        total_micro_usd=row.total_micro_usd,
        charged_micro_usd=row.charged_micro_usd,
        refunded_micro_usd=row.total_micro_usd - row.charged_micro_usd if ended else 0,
        periods_total=row.periods_total,
        periods_charged=row.periods_charged,
        started_at_unix_ms=row.started_at_unix_ms,
        ends_at_unix_ms=row.ends_at_unix_ms,
        api_key_id=row.api_key_id,
    )


def _signed(row: Any) -> market_pb2.SignedReceipt:
    return market_pb2.SignedReceipt(
        receipt=bytes(row.receipt),
        node_public_key=bytes(row.node_public_key),
        node_signature=bytes(row.node_signature),
        coordinator_public_key=bytes(row.coordinator_public_key),
        coordinator_signature=bytes(row.coordinator_signature),
    )
