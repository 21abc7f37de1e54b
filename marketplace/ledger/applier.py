"""Apply a batch of operations in one database transaction.

The writer (and the operator commands, with batches of one) call ``apply_batch``. It
locks the journal head (every writer serializes on it, so balances read under it are
exact), loads in a few queries all the state the batch touches, applies the operations
one by one in memory, then writes every new row with one executemany per table.

Each operation is all-or-nothing: its transfers are checked against the balances as they
stand after the operations before it in the batch, and a refused operation leaves nothing
behind (its answer is the exception). The batch is committed once.
"""

from __future__ import annotations

import operator
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, select, update

from marketplace.ledger import money
from marketplace.ledger.errors import (
    IdConflict,
    InsufficientBalance,
    LeaseNotActive,
    LedgerError,
    ReplayedReceipt,
    UnknownAccount,
    UnknownLease,
    WrongAccountKind,
)
from marketplace.ledger.journal import entry_hash
from marketplace.ledger.models import (
    Account,
    AccountKind,
    Balance,
    JournalHead,
    Lease,
    LeaseStatus,
    OpenHold,
    PayoutBatch,
    Receipt,
    ReceiptRejection,
    Settlement,
    Transfer,
    TransferKind,
    TransferPhase,
)
from marketplace.ledger.operations import (
    ChargeLease,
    CreateLease,
    EndLease,
    HoldResult,
    LeaseRecord,
    Operation,
    PayoutResult,
    PlaceHold,
    PostTransfer,
    ReadAvailable,
    RecordRejection,
    ReleaseHold,
    ReleaseResult,
    RunPayouts,
    Settle,
    SettlementRecord,
    TransferResult,
)

FEES = "platform.fees"
CLEARING = "platform.clearing"
LEASE_ESCROW = "platform.lease_escrow"
DEPOSITS = "platform.deposits"
PAYOUTS = "platform.payouts"
PLATFORM_ACCOUNTS = (FEES, CLEARING, LEASE_ESCROW, DEPOSITS, PAYOUTS)

_IN_CHUNK = 900
_SINGLE = TransferPhase.SINGLE.value
_PENDING = TransferPhase.PENDING.value
_POST = TransferPhase.POST.value
_VALUE: dict[Any, str] = {m: m.value for m in (*TransferKind, *TransferPhase)}

T_TRANSFERS = Transfer.__table__  # type: ignore[attr-defined]
T_BALANCES = Balance.__table__  # type: ignore[attr-defined]
T_ACCOUNTS = Account.__table__  # type: ignore[attr-defined]
T_HEAD = JournalHead.__table__  # type: ignore[attr-defined]
T_HOLDS = OpenHold.__table__  # type: ignore[attr-defined]
T_SETTLEMENTS = Settlement.__table__  # type: ignore[attr-defined]
T_RECEIPTS = Receipt.__table__  # type: ignore[attr-defined]
T_REJECTIONS = ReceiptRejection.__table__  # type: ignore[attr-defined]
T_LEASES = Lease.__table__  # type: ignore[attr-defined]
T_PAYOUT_BATCHES = PayoutBatch.__table__  # type: ignore[attr-defined]


def now_unix_ms() -> int:
    return time.time_ns() // 1_000_000


def _chunks(values: Iterable[str]) -> Iterable[list[str]]:
    items = list(dict.fromkeys(values))
    for start in range(0, len(items), _IN_CHUNK):
        yield items[start : start + _IN_CHUNK]


@dataclass
class _AccountState:
    kind: str
    must_not_overdraw: bool
    node_id: str | None
    # [debits_posted, credits_posted, debits_pending, credits_pending]
    sums: list[int]

    @property
    def available(self) -> int:
        return self.sums[1] - self.sums[0] - self.sums[2]


class _Batch:
    """The state one batch reads and the rows it will write."""

    def __init__(self, conn: Connection, now_ms: int) -> None:
        self.conn = conn
        self.now_ms = now_ms
        head = conn.execute(
            select(T_HEAD.c.seq, T_HEAD.c.hash).where(T_HEAD.c.id == 1).with_for_update()
        ).one()
        self.head_seq: int = head.seq
        self.head_hash: bytes = bytes(head.hash)
        self.accounts: dict[str, _AccountState] = {}
        self.provider_by_node: dict[str, str] = {}
        self.dirty: set[str] = set()
        self.transfers: dict[str, dict[str, Any]] = {}  # id -> fields, DB and new
        self.open_holds: dict[str, dict[str, Any]] = {}  # request id -> row
        self.settlements: dict[str, SettlementRecord] = {}
        self.receipt_owner: dict[str, str] = {}  # worker request id -> request id
        self.leases: dict[str, dict[str, Any]] = {}
        self.payout_batches: dict[str, PayoutResult] = {}
        self.payable: list[str] = []
        # rows to write
        self.new_transfers: list[dict[str, Any]] = []
        self.new_accounts: list[dict[str, Any]] = []
        self.new_holds: dict[str, dict[str, Any]] = {}  # transfer id -> row
        self.closed_holds: list[str] = []
        self.new_settlements: list[dict[str, Any]] = []
        self.new_receipts: list[dict[str, Any]] = []
        self.new_rejections: list[dict[str, Any]] = []
        self.new_leases: list[dict[str, Any]] = []
        self.dirty_leases: set[str] = set()
        self.new_payout_batches: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- loading

    def load(self, ops: Sequence[Operation]) -> None:
        account_ids: set[str] = set(PLATFORM_ACCOUNTS)
        node_ids: set[str] = set()
        transfer_ids: set[str] = set()
        request_ids: set[str] = set()
        worker_ids: set[str] = set()
        lease_ids: set[str] = set()
        batch_ids: set[str] = set()
        for op in ops:
            if isinstance(op, PostTransfer):
                account_ids.update((op.debit_account_id, op.credit_account_id))
                transfer_ids.add(op.transfer_id)
            elif isinstance(op, PlaceHold):
                account_ids.add(op.account_id)
                request_ids.add(op.request_id)
                transfer_ids.add(hold_id(op.request_id))
            elif isinstance(op, ReleaseHold):
                request_ids.add(op.request_id)
                transfer_ids.add(hold_id(op.request_id))
            elif isinstance(op, Settle):
                account_ids.add(op.account_id)
                request_ids.add(op.request_id)
                for segment in op.segments:
                    node_ids.add(segment.node_id)
                    worker_ids.add(segment.worker_request_id)
            elif isinstance(op, ReadAvailable):
                account_ids.add(op.account_id)
            elif isinstance(op, CreateLease):
                account_ids.add(op.account_id)
                node_ids.add(op.node_id)
                lease_ids.add(op.lease_id)
            elif isinstance(op, ChargeLease | EndLease):
                lease_ids.add(op.lease_id)
            elif isinstance(op, RunPayouts):
                batch_ids.add(op.batch_id)
        conn = self.conn
        if lease_ids:
            for chunk in _chunks(lease_ids):
                for row in conn.execute(select(T_LEASES).where(T_LEASES.c.id.in_(chunk))):
                    lease = dict(row._mapping)
                    self.leases[lease["id"]] = lease
                    account_ids.update((lease["account_id"], lease["provider_account_id"]))
        if batch_ids:
            self._load_payouts(batch_ids, account_ids)
        if node_ids:
            for chunk in _chunks(node_ids):
                for row in conn.execute(
                    select(T_ACCOUNTS.c.id, T_ACCOUNTS.c.node_id).where(
                        T_ACCOUNTS.c.node_id.in_(chunk)
                    )
                ):
                    self.provider_by_node[row.node_id] = row.id
                    account_ids.add(row.id)
        if request_ids:
            hold_cols = [c.name for c in T_HOLDS.columns]
            for row in _select_in(conn, T_HOLDS, hold_cols, "request_id", request_ids):
                hold = dict(zip(hold_cols, row, strict=True))
                self.open_holds[hold["request_id"]] = hold
                account_ids.add(hold["account_id"])
        self._load_accounts(account_ids)
        if request_ids:
            settle_cols = [c.name for c in T_SETTLEMENTS.columns]
            for row in _select_in(conn, T_SETTLEMENTS, settle_cols, "request_id", request_ids):
                mapping = dict(zip(settle_cols, row, strict=True))
                self.settlements[row[0]] = _settlement_record(mapping, False)
        if transfer_ids:
            cols = ["id", "kind", "phase", "debit_account_id", "credit_account_id", "amount"]
            for row in _select_in(conn, T_TRANSFERS, cols, "id", transfer_ids):
                self.transfers[row[0]] = dict(zip(cols, row, strict=True))
        if worker_ids:
            for row in _select_in(
                conn,
                T_RECEIPTS,
                ["worker_request_id", "request_id"],
                "worker_request_id",
                worker_ids,
            ):
                self.receipt_owner[row[0]] = row[1]

    def _load_accounts(self, account_ids: set[str]) -> None:
        for chunk in _chunks(account_ids):
            rows = self.conn.execute(
                select(
                    T_ACCOUNTS.c.id,
                    T_ACCOUNTS.c.kind,
                    T_ACCOUNTS.c.must_not_overdraw,
                    T_ACCOUNTS.c.node_id,
                    T_BALANCES.c.debits_posted,
                    T_BALANCES.c.credits_posted,
                    T_BALANCES.c.debits_pending,
                    T_BALANCES.c.credits_pending,
                )
                .join(T_BALANCES, T_BALANCES.c.account_id == T_ACCOUNTS.c.id)
                .where(T_ACCOUNTS.c.id.in_(chunk))
            )
            for row in rows:
                self.accounts[row.id] = _AccountState(
                    row.kind,
                    bool(row.must_not_overdraw),
                    row.node_id,
                    [
                        row.debits_posted,
                        row.credits_posted,
                        row.debits_pending,
                        row.credits_pending,
                    ],
                )
                if row.node_id:
                    self.provider_by_node[row.node_id] = row.id

    def _load_payouts(self, batch_ids: set[str], account_ids: set[str]) -> None:
        conn = self.conn
        for chunk in _chunks(batch_ids):
            for row in conn.execute(
                select(T_PAYOUT_BATCHES.c.id).where(T_PAYOUT_BATCHES.c.id.in_(chunk))
            ):
                payouts = [
                    (t.debit_account_id, t.amount)
                    for t in conn.execute(
                        select(T_TRANSFERS.c.debit_account_id, T_TRANSFERS.c.amount)
                        .where(T_TRANSFERS.c.id.like(f"payout:{row.id}:%"))
                        .order_by(T_TRANSFERS.c.seq)
                    )
                ]
                self.payout_batches[row.id] = PayoutResult(row.id, payouts, created=False)
        available = (
            T_BALANCES.c.credits_posted - T_BALANCES.c.debits_posted - T_BALANCES.c.debits_pending
        )
        self.payable = [
            row.id
            for row in conn.execute(
                select(T_ACCOUNTS.c.id)
                .join(T_BALANCES, T_BALANCES.c.account_id == T_ACCOUNTS.c.id)
                .where(T_ACCOUNTS.c.kind == AccountKind.PROVIDER.value, available > 0)
                .order_by(T_ACCOUNTS.c.id)
            )
        ]
        account_ids.update(self.payable)

    # ---------------------------------------------------------------- helpers

    def account(self, account_id: str) -> _AccountState:
        state = self.accounts.get(account_id)
        if state is None:
            raise UnknownAccount(
                f"account {account_id!r} does not exist; list accounts with "
                "'mercato accounts list' or create it with 'mercato accounts create'"
            )
        return state

    def provider_account(self, node_id: str) -> str:
        """The provider account bound to ``node_id``; created on the node's first earning."""
        account_id = self.provider_by_node.get(node_id)
        if account_id is not None:
            return account_id
        account_id = f"prov_{secrets.token_hex(8)}"
        self.new_accounts.append(
            {
                "id": account_id,
                "kind": AccountKind.PROVIDER.value,
                "name": f"node-{node_id}"[:64],
                "node_id": node_id,
                "must_not_overdraw": True,
                "created_at_unix_ms": self.now_ms,
            }
        )
        self.accounts[account_id] = _AccountState(
            AccountKind.PROVIDER.value, True, node_id, [0] * 4
        )
        self.provider_by_node[node_id] = account_id
        return account_id

    def post(self, entries: list[dict[str, Any]]) -> None:
        """Apply an operation's transfers: all of them, or (on a refused limit) none."""
        accounts = self.accounts
        touched: dict[str, list[int]] = {}
        for entry in entries:
            debit_id = entry["debit_account_id"]
            credit_id = entry["credit_account_id"]
            debit = touched.get(debit_id)
            if debit is None:
                state = accounts.get(debit_id) or self.account(debit_id)
                debit = touched[debit_id] = list(state.sums)
            credit = touched.get(credit_id)
            if credit is None:
                state = accounts.get(credit_id) or self.account(credit_id)
                credit = touched[credit_id] = list(state.sums)
            amount = entry["amount"]
            phase = entry["phase"]
            if phase == _SINGLE:
                debit[0] += amount
                credit[1] += amount
            elif phase == _PENDING:
                debit[2] += amount
                credit[3] += amount
            else:
                pending_amount = entry.pop("_pending_amount")
                debit[2] -= pending_amount
                credit[3] -= pending_amount
                if phase == _POST:
                    debit[0] += amount
                    credit[1] += amount
        for account_id, sums in touched.items():
            state = accounts[account_id]
            if state.must_not_overdraw and sums[0] + sums[2] > sums[1]:
                need = sum(
                    e["amount"]
                    for e in entries
                    if e["debit_account_id"] == account_id and e["phase"] != _POST
                )
                raise InsufficientBalance(need, state.available, account_id)
        for account_id, sums in touched.items():
            accounts[account_id].sums = sums
        self.dirty.update(touched)
        now_ms = self.now_ms
        head_hash = self.head_hash
        seq = self.head_seq
        for entry in entries:
            seq += 1
            entry["seq"] = seq
            entry["created_at_unix_ms"] = now_ms
            entry["prev_hash"] = head_hash
            entry["hash"] = head_hash = entry_hash(head_hash, entry)
            self.transfers[entry["id"]] = entry
        self.new_transfers.extend(entries)
        self.head_seq = seq
        self.head_hash = head_hash

    # ---------------------------------------------------------------- writing

    def flush(self) -> None:
        conn = self.conn
        if self.new_accounts:
            _insert(conn, T_ACCOUNTS, self.new_accounts)
            _insert(
                conn,
                T_BALANCES,
                [
                    {
                        "account_id": a["id"],
                        "debits_posted": 0,
                        "credits_posted": 0,
                        "debits_pending": 0,
                        "credits_pending": 0,
                    }
                    for a in self.new_accounts
                ],
            )
        if self.new_transfers:
            _insert(conn, T_TRANSFERS, self.new_transfers)
        if self.closed_holds and conn.dialect.name == "postgresql":
            conn.exec_driver_sql(
                f"DELETE FROM {T_HOLDS.name} WHERE transfer_id = ANY(%s)", (self.closed_holds,)
            )
        elif self.closed_holds:
            _execute_many(
                conn,
                f"DELETE FROM {T_HOLDS.name} WHERE transfer_id = {_mark(conn)}",
                [(tid,) for tid in self.closed_holds],
            )
        if self.new_holds:
            _insert(conn, T_HOLDS, list(self.new_holds.values()))
        if self.new_settlements:
            _insert(conn, T_SETTLEMENTS, self.new_settlements)
        if self.new_receipts:
            _insert(conn, T_RECEIPTS, self.new_receipts)
        if self.new_rejections:
            conn.execute(T_REJECTIONS.insert(), self.new_rejections)
        new_lease_ids = {lease["id"] for lease in self.new_leases}
        if self.new_leases:
            _insert(conn, T_LEASES, self.new_leases)
        changed = [
            {"b_id": lid, **{k: self.leases[lid][k] for k in _LEASE_MUTABLE}}
            for lid in self.dirty_leases - new_lease_ids
        ]
        if changed:
            conn.execute(
                update(T_LEASES)
                .where(T_LEASES.c.id == bindparam("b_id"))
                .values({k: bindparam(k) for k in _LEASE_MUTABLE}),
                changed,
            )
        if self.new_payout_batches:
            _insert(conn, T_PAYOUT_BATCHES, self.new_payout_batches)
        if self.dirty:
            mark = _mark(conn)
            _execute_many(
                conn,
                f"UPDATE {T_BALANCES.name} SET debits_posted = {mark}, credits_posted = {mark}, "
                f"debits_pending = {mark}, credits_pending = {mark} WHERE account_id = {mark}",
                [(*self.accounts[a].sums, a) for a in sorted(self.dirty)],
            )
        if self.new_transfers:
            conn.execute(
                update(T_HEAD)
                .where(T_HEAD.c.id == 1)
                .values(seq=self.head_seq, hash=self.head_hash)
            )


def _select_in(
    conn: Connection, table: Any, columns: list[str], key: str, values: Iterable[str]
) -> Iterable[tuple[Any, ...]]:
    """Rows of ``table`` whose ``key`` is one of ``values`` (in chunks), on the driver."""
    head = f"SELECT {', '.join(columns)} FROM {table.name} WHERE {key}"
    if conn.dialect.name == "postgresql":
        yield from conn.exec_driver_sql(f"{head} = ANY(%s)", (list(set(values)),)).all()
        return
    mark = _mark(conn)
    head += " IN "
    for chunk in _chunks(values):
        sql = head + "(" + ", ".join([mark] * len(chunk)) + ")"
        yield from conn.exec_driver_sql(sql, tuple(chunk)).all()


def _mark(conn: Connection) -> str:
    return "?" if conn.dialect.paramstyle == "qmark" else "%s"


def _execute_many(conn: Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
    """executemany straight on the driver: the hot path skips SQLAlchemy's per-row work."""
    conn.exec_driver_sql(sql, rows)


def _insert(conn: Connection, table: Any, rows: list[dict[str, Any]]) -> None:
    columns = [c.name for c in table.columns]
    mark = _mark(conn)
    sql = (
        f"INSERT INTO {table.name} ({', '.join(columns)}) "
        f"VALUES ({', '.join([mark] * len(columns))})"
    )
    getter = operator.itemgetter(*columns)
    if conn.dialect.name == "postgresql":
        # COPY: one round trip for the whole batch (executemany costs one per row).
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(f"COPY {table.name} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(getter(row))
        return
    _execute_many(conn, sql, [getter(row) for row in rows])


_LEASE_MUTABLE = ("periods_charged", "charged_micro_usd", "status", "ended_at_unix_ms")


def hold_id(request_id: str) -> str:
    return f"hold:{request_id}"


def _settlement_record(row: Any, created: bool) -> SettlementRecord:
    return SettlementRecord(
        request_id=row["request_id"],
        account_id=row["account_id"],
        cost_micro_usd=row["cost_micro_usd"],
        fee_micro_usd=row["fee_micro_usd"],
        provider_micro_usd=row["cost_micro_usd"] - row["fee_micro_usd"],
        hold_micro_usd=row["hold_micro_usd"],
        capped_micro_usd=row["capped_micro_usd"],
        input_tokens=row["input_tokens"],
        output_tokens=row["output_tokens"],
        created=created,
    )


def _lease_record(lease: dict[str, Any], refunded: int = 0) -> LeaseRecord:
    return LeaseRecord(
        lease_id=lease["id"],
        account_id=lease["account_id"],
        node_id=lease["node_id"],
        status=lease["status"],
        total_micro_usd=lease["total_micro_usd"],
        charged_micro_usd=lease["charged_micro_usd"],
        refunded_micro_usd=refunded,
        periods_total=lease["periods_total"],
        periods_charged=lease["periods_charged"],
        started_at_unix_ms=lease["started_at_unix_ms"],
        ends_at_unix_ms=lease["ends_at_unix_ms"],
    )


def _entry(
    transfer_id: str,
    kind: TransferKind,
    phase: TransferPhase,
    debit: str,
    credit: str,
    amount: int,
    *,
    pending_id: str | None = None,
    request_id: str | None = None,
    expires_at_unix_ms: int | None = None,
    _pending_amount: int | None = None,
) -> dict[str, Any]:
    entry = {
        "id": transfer_id,
        "kind": _VALUE[kind],
        "phase": _VALUE[phase],
        "debit_account_id": debit,
        "credit_account_id": credit,
        "amount": amount,
        "pending_id": pending_id,
        "request_id": request_id,
        "expires_at_unix_ms": expires_at_unix_ms,
    }
    if _pending_amount is not None:
        entry["_pending_amount"] = _pending_amount
    return entry


# -------------------------------------------------------------------- operations


def _post_transfer(batch: _Batch, op: PostTransfer) -> TransferResult:
    existing = batch.transfers.get(op.transfer_id)
    if existing is not None:
        same = (
            existing["kind"] == op.kind.value
            and existing["debit_account_id"] == op.debit_account_id
            and existing["credit_account_id"] == op.credit_account_id
            and existing["amount"] == op.amount
        )
        if not same:
            raise IdConflict(
                f"transfer id {op.transfer_id!r} was already used for a different transfer; "
                "choose a new id"
            )
        return TransferResult(op.transfer_id, op.amount, created=False)
    debit = batch.account(op.debit_account_id)
    credit = batch.account(op.credit_account_id)
    if op.kind is TransferKind.DEPOSIT and credit.kind == AccountKind.PLATFORM.value:
        raise WrongAccountKind(
            f"cannot deposit into platform account {op.credit_account_id!r}; "
            "deposit into a client or provider account"
        )
    if debit.must_not_overdraw and debit.available < op.amount:
        raise InsufficientBalance(op.amount, debit.available, op.debit_account_id)
    batch.post(
        [
            _entry(
                op.transfer_id,
                op.kind,
                TransferPhase.SINGLE,
                op.debit_account_id,
                op.credit_account_id,
                op.amount,
            )
        ]
    )
    return TransferResult(op.transfer_id, op.amount, created=True)


def _place_hold(batch: _Batch, op: PlaceHold) -> HoldResult:
    tid = hold_id(op.request_id)
    existing = batch.transfers.get(tid)
    if existing is not None:
        if existing["debit_account_id"] != op.account_id or existing["amount"] != op.amount:
            raise IdConflict(
                f"request id {op.request_id!r} already has a different hold; use a new request id"
            )
        return HoldResult(op.request_id, op.account_id, op.amount, created=False)
    account = batch.account(op.account_id)
    if account.kind != AccountKind.CLIENT.value:
        raise WrongAccountKind(f"account {op.account_id!r} is not a client account")
    if account.available < op.amount:
        raise InsufficientBalance(op.amount, account.available, op.account_id)
    batch.post(
        [
            _entry(
                tid,
                TransferKind.HOLD,
                TransferPhase.PENDING,
                op.account_id,
                CLEARING,
                op.amount,
                request_id=op.request_id,
                expires_at_unix_ms=op.expires_at_unix_ms,
            )
        ]
    )
    row = {
        "transfer_id": tid,
        "request_id": op.request_id,
        "account_id": op.account_id,
        "api_key_id": op.api_key_id,
        "amount": op.amount,
        "expires_at_unix_ms": op.expires_at_unix_ms,
        "owner": op.owner,
    }
    batch.open_holds[op.request_id] = row
    batch.new_holds[tid] = row
    return HoldResult(op.request_id, op.account_id, op.amount, created=True)


def _close_hold(batch: _Batch, hold: dict[str, Any]) -> None:
    del batch.open_holds[hold["request_id"]]
    if batch.new_holds.pop(hold["transfer_id"], None) is None:
        batch.closed_holds.append(hold["transfer_id"])


def _release_hold(batch: _Batch, op: ReleaseHold) -> ReleaseResult:
    hold = batch.open_holds.get(op.request_id)
    if hold is None:
        if op.request_id in batch.settlements:
            status = "settled"
        elif hold_id(op.request_id) in batch.transfers:
            status = "already_released"
        else:
            status = "unknown"
        return ReleaseResult(op.request_id, 0, status)
    if (
        op.only_if_expired_at_unix_ms is not None
        and hold["expires_at_unix_ms"] > op.only_if_expired_at_unix_ms
    ):
        return ReleaseResult(op.request_id, 0, "not_due")
    phase = TransferPhase.EXPIRE if op.expire else TransferPhase.VOID
    kind = TransferKind.EXPIRE if op.expire else TransferKind.RELEASE
    batch.post(
        [
            _entry(
                f"{phase.value}:{op.request_id}",
                kind,
                phase,
                hold["account_id"],
                CLEARING,
                hold["amount"],
                pending_id=hold["transfer_id"],
                request_id=op.request_id,
                _pending_amount=hold["amount"],
            )
        ]
    )
    _close_hold(batch, hold)
    return ReleaseResult(op.request_id, hold["amount"], "expired" if op.expire else "released")


def _settle(batch: _Batch, op: Settle) -> SettlementRecord:
    known = batch.settlements.get(op.request_id)
    if known is not None:
        return SettlementRecord(**{**known.__dict__, "created": False})
    for segment in op.segments:
        owner = batch.receipt_owner.get(segment.worker_request_id)
        if owner is not None and owner != op.request_id:
            raise ReplayedReceipt(
                f"receipt for node request {segment.worker_request_id!r} was already settled "
                f"with request {owner!r}; a receipt pays once"
            )
    client = batch.account(op.account_id)
    hold = batch.open_holds.get(op.request_id)
    if hold is not None and hold["account_id"] != op.account_id:
        raise IdConflict(
            f"request {op.request_id!r} holds money on account {hold['account_id']!r}, "
            f"not {op.account_id!r}"
        )
    costs = [segment.cost_micro_usd for segment in op.segments]
    held = hold["amount"] if hold is not None else op.hold_micro_usd
    if hold is None:
        # The hold was lost (crash before it was durable) or expired: charge directly,
        # never more than the hold promised nor than the account has.
        held = max(0, min(held, client.available))
    charges = money.cap_to_hold(held, costs)
    cost = sum(charges)
    entries: list[dict[str, Any]] = []
    rid = op.request_id
    if hold is not None:
        phase = TransferPhase.POST if cost > 0 else TransferPhase.VOID
        entries.append(
            _entry(
                f"{phase.value}:{rid}",
                TransferKind.CHARGE if cost > 0 else TransferKind.RELEASE,
                phase,
                op.account_id,
                CLEARING,
                cost if cost > 0 else hold["amount"],
                pending_id=hold["transfer_id"],
                request_id=rid,
                _pending_amount=hold["amount"],
            )
        )
    elif cost > 0:
        entries.append(
            _entry(
                f"charge:{rid}",
                TransferKind.CHARGE,
                TransferPhase.SINGLE,
                op.account_id,
                CLEARING,
                cost,
                request_id=rid,
            )
        )
    fee_total = 0
    for segment, charge in zip(op.segments, charges, strict=True):
        if charge <= 0:
            continue
        provider_amount, fee = money.split_fee(charge, op.fee_bps)
        fee_total += fee
        provider = batch.provider_account(segment.node_id)
        i = segment.segment_index
        if provider_amount:
            entries.append(
                _entry(
                    f"earning:{rid}:{i}",
                    TransferKind.EARNING,
                    TransferPhase.SINGLE,
                    CLEARING,
                    provider,
                    provider_amount,
                    request_id=rid,
                )
            )
        if fee:
            entries.append(
                _entry(
                    f"fee:{rid}:{i}",
                    TransferKind.FEE,
                    TransferPhase.SINGLE,
                    CLEARING,
                    FEES,
                    fee,
                    request_id=rid,
                )
            )
    batch.post(entries)
    if hold is not None:
        _close_hold(batch, hold)
    input_tokens = sum(s.input_tokens for s in op.segments)
    output_tokens = sum(s.output_tokens for s in op.segments)
    row = {
        "request_id": rid,
        "account_id": op.account_id,
        "api_key_id": op.api_key_id,
        "model": op.model,
        "lease_id": op.lease_id,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "hold_micro_usd": held,
        "cost_micro_usd": cost,
        "fee_micro_usd": fee_total,
        "capped_micro_usd": sum(costs) - cost,
        "created_at_unix_ms": batch.now_ms,
    }
    batch.new_settlements.append(row)
    record = _settlement_record(row, True)
    batch.settlements[rid] = record
    for segment, charge in zip(op.segments, charges, strict=True):
        batch.receipt_owner[segment.worker_request_id] = rid
        batch.new_receipts.append(
            {
                "worker_request_id": segment.worker_request_id,
                "request_id": rid,
                "segment_index": segment.segment_index,
                "node_id": segment.node_id,
                "model": segment.model,
                "input_tokens": segment.input_tokens,
                "output_tokens": segment.output_tokens,
                "cost_micro_usd": charge,
                "receipt": segment.receipt,
                "node_public_key": segment.node_public_key,
                "node_signature": segment.node_signature,
                "coordinator_public_key": segment.coordinator_public_key,
                "coordinator_signature": segment.coordinator_signature,
                "created_at_unix_ms": batch.now_ms,
            }
        )
    return record


def _record_rejection(batch: _Batch, op: RecordRejection) -> None:
    batch.new_rejections.append(
        {
            "request_id": op.request_id[:128],
            "node_id": op.node_id[:128],
            "reason": op.reason[:32],
            "detail": op.detail[:1024],
            "receipt": op.receipt,
            "created_at_unix_ms": batch.now_ms,
        }
    )


def _create_lease(batch: _Batch, op: CreateLease) -> LeaseRecord:
    existing = batch.leases.get(op.lease_id)
    if existing is not None:
        if existing["account_id"] != op.account_id or existing["node_id"] != op.node_id:
            raise IdConflict(f"lease id {op.lease_id!r} is taken; choose another")
        return _lease_record(existing)
    client = batch.account(op.account_id)
    if client.kind != AccountKind.CLIENT.value:
        raise WrongAccountKind(f"account {op.account_id!r} is not a client account")
    total = money.lease_total_micro_usd(op.price_micro_usd_per_gpu_hour, op.gpus, op.hours)
    money.check_amount(total, "lease total")
    if client.available < total:
        raise InsufficientBalance(total, client.available, op.account_id)
    provider = batch.provider_account(op.node_id)
    batch.post(
        [
            _entry(
                f"lease_prepay:{op.lease_id}",
                TransferKind.LEASE_PREPAY,
                TransferPhase.SINGLE,
                op.account_id,
                LEASE_ESCROW,
                total,
            )
        ]
    )
    lease = {
        "id": op.lease_id,
        "account_id": op.account_id,
        "provider_account_id": provider,
        "node_id": op.node_id,
        "gpus": op.gpus,
        "price_micro_usd_per_gpu_hour": op.price_micro_usd_per_gpu_hour,
        "period_s": op.period_s,
        "periods_total": op.hours * 3600 // op.period_s,
        "periods_charged": 0,
        "total_micro_usd": total,
        "charged_micro_usd": 0,
        "fee_bps": op.fee_bps,
        "status": LeaseStatus.ACTIVE.value,
        "started_at_unix_ms": op.started_at_unix_ms,
        "ends_at_unix_ms": op.started_at_unix_ms + op.hours * 3_600_000,
        "ended_at_unix_ms": None,
    }
    batch.leases[op.lease_id] = lease
    batch.new_leases.append(lease)
    return _lease_record(lease)


def _lease(batch: _Batch, lease_id: str) -> dict[str, Any]:
    lease = batch.leases.get(lease_id)
    if lease is None:
        raise UnknownLease(f"lease {lease_id!r} does not exist")
    return lease


def _charge_lease_to(batch: _Batch, lease: dict[str, Any], periods: int) -> None:
    periods = min(periods, lease["periods_total"])
    if periods <= lease["periods_charged"]:
        return
    cumulative = money.lease_cumulative_micro_usd(
        lease["total_micro_usd"], lease["periods_total"], periods
    )
    amount = cumulative - lease["charged_micro_usd"]
    provider_amount, fee = money.split_fee(amount, lease["fee_bps"])
    entries = []
    if provider_amount:
        entries.append(
            _entry(
                f"lease_earning:{lease['id']}:{periods}",
                TransferKind.EARNING,
                TransferPhase.SINGLE,
                LEASE_ESCROW,
                lease["provider_account_id"],
                provider_amount,
            )
        )
    if fee:
        entries.append(
            _entry(
                f"lease_fee:{lease['id']}:{periods}",
                TransferKind.FEE,
                TransferPhase.SINGLE,
                LEASE_ESCROW,
                FEES,
                fee,
            )
        )
    batch.post(entries)
    lease["periods_charged"] = periods
    lease["charged_micro_usd"] = cumulative
    batch.dirty_leases.add(lease["id"])


def _elapsed_periods(lease: dict[str, Any], now_ms: int, round_up: bool) -> int:
    elapsed_ms = max(0, now_ms - lease["started_at_unix_ms"])
    period_ms = lease["period_s"] * 1000
    periods = -(-elapsed_ms // period_ms) if round_up else elapsed_ms // period_ms
    return min(periods, lease["periods_total"])


def _charge_lease(batch: _Batch, op: ChargeLease) -> LeaseRecord:
    lease = _lease(batch, op.lease_id)
    if lease["status"] != LeaseStatus.ACTIVE.value:
        return _lease_record(lease)
    _charge_lease_to(batch, lease, _elapsed_periods(lease, op.now_unix_ms, round_up=False))
    if lease["periods_charged"] == lease["periods_total"]:
        lease["status"] = LeaseStatus.ENDED.value
        lease["ended_at_unix_ms"] = lease["ends_at_unix_ms"]
    return _lease_record(lease)


def _end_lease(batch: _Batch, op: EndLease) -> LeaseRecord:
    lease = _lease(batch, op.lease_id)
    if lease["status"] != LeaseStatus.ACTIVE.value:
        raise LeaseNotActive(f"lease {op.lease_id!r} is already {lease['status']}")
    # The client pays for every period it started; a node failure is the provider's:
    # the period it failed in is refunded.
    periods = _elapsed_periods(lease, op.now_unix_ms, round_up=not op.node_failed)
    _charge_lease_to(batch, lease, periods)
    refund = lease["total_micro_usd"] - lease["charged_micro_usd"]
    if refund:
        batch.post(
            [
                _entry(
                    f"lease_refund:{lease['id']}",
                    TransferKind.LEASE_REFUND,
                    TransferPhase.SINGLE,
                    LEASE_ESCROW,
                    lease["account_id"],
                    refund,
                )
            ]
        )
    lease["status"] = (LeaseStatus.FAILED if op.node_failed else LeaseStatus.ENDED).value
    lease["ended_at_unix_ms"] = op.now_unix_ms
    batch.dirty_leases.add(lease["id"])
    return _lease_record(lease, refunded=refund)


def _run_payouts(batch: _Batch, op: RunPayouts) -> PayoutResult:
    known = batch.payout_batches.get(op.batch_id)
    if known is not None:
        return known
    payouts: list[tuple[str, int]] = []
    for account_id in batch.payable:
        amount = batch.account(account_id).available
        if amount >= op.min_micro_usd:
            batch.post(
                [
                    _entry(
                        f"payout:{op.batch_id}:{account_id}",
                        TransferKind.PAYOUT,
                        TransferPhase.SINGLE,
                        account_id,
                        PAYOUTS,
                        amount,
                    )
                ]
            )
            payouts.append((account_id, amount))
    result = PayoutResult(op.batch_id, payouts, created=bool(payouts))
    if payouts:
        batch.new_payout_batches.append(
            {
                "id": op.batch_id,
                "payouts": len(payouts),
                "total_micro_usd": result.total_micro_usd,
                "created_at_unix_ms": batch.now_ms,
            }
        )
    batch.payout_batches[op.batch_id] = result
    return result


_HANDLERS: dict[type, Any] = {
    PostTransfer: _post_transfer,
    PlaceHold: _place_hold,
    ReleaseHold: _release_hold,
    Settle: _settle,
    RecordRejection: _record_rejection,
    CreateLease: _create_lease,
    ChargeLease: _charge_lease,
    EndLease: _end_lease,
    RunPayouts: _run_payouts,
}


def apply_batch(conn: Connection, ops: Sequence[Operation], now_ms: int | None = None) -> list[Any]:
    """Apply ``ops`` inside the caller's open transaction on ``conn``.

    Returns one answer per operation: its result, or the LedgerError that refused it.
    Database errors propagate (the caller rolls back and retries or fails the batch).
    """
    batch = _Batch(conn, now_unix_ms() if now_ms is None else now_ms)
    batch.load(ops)
    answers: list[Any] = []
    for op in ops:
        try:
            if isinstance(op, ReadAvailable):
                answers.append(batch.account(op.account_id).available)
            else:
                answers.append(_HANDLERS[type(op)](batch, op))
        except LedgerError as exc:
            answers.append(exc)
    batch.flush()
    available = {account_id: batch.accounts[account_id].available for account_id in batch.dirty}
    for op in ops:
        if isinstance(op, ReadAvailable) and op.account_id in batch.accounts:
            available[op.account_id] = batch.accounts[op.account_id].available
    return answers, available
