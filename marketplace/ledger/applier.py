"""Apply a batch of operations in one database transaction.

The writer (and the operator commands, with batches of one) call ``apply_batch``. It
locks the journal head (every writer serializes on it, so balances read under it are
exact), loads in a few queries all the state the batch touches that the writer does not
already remember (``writer_cache``), applies the operations one by one in memory, then
writes every new row with one executemany (SQLite) or COPY (PostgreSQL) per table.

Each operation is all-or-nothing: its transfers are checked against the balances as they
stand after the operations before it in the batch, and a refused operation leaves nothing
behind (its answer is the exception). The batch is committed once.
"""

from __future__ import annotations

import functools
import operator
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from itertools import chain
from typing import Any

from sqlalchemy import Connection, bindparam, func, select, update

from marketplace.ledger import money
from marketplace.ledger.errors import (
    IdConflict,
    InsufficientBalance,
    LeaseNotActive,
    LedgerError,
    NodeLeased,
    ReplayedReceipt,
    SpendLimitExceeded,
    UnknownAccount,
    UnknownLease,
    WrongAccountKind,
)
from marketplace.ledger.journal import row_hash
from marketplace.ledger.models import (
    Account,
    AccountKind,
    Balance,
    JournalHead,
    KeySpend,
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
    KeyUsage,
    LeaseRecord,
    Operation,
    PayoutResult,
    PlaceHold,
    PostTransfer,
    ReadAvailable,
    ReadKeySpend,
    RecordRejection,
    ReleaseHold,
    ReleaseResult,
    RunPayouts,
    Settle,
    SettlementRecord,
    TransferResult,
)
from marketplace.ledger.writer_cache import (
    KIND,
    MUST_NOT_OVERDRAW,
    AccountState,
    WriterCache,
    available,
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
T_KEY_SPEND = KeySpend.__table__  # type: ignore[attr-defined]
T_HOLDS = OpenHold.__table__  # type: ignore[attr-defined]
T_SETTLEMENTS = Settlement.__table__  # type: ignore[attr-defined]
T_RECEIPTS = Receipt.__table__  # type: ignore[attr-defined]
T_REJECTIONS = ReceiptRejection.__table__  # type: ignore[attr-defined]
T_LEASES = Lease.__table__  # type: ignore[attr-defined]
T_PAYOUT_BATCHES = PayoutBatch.__table__  # type: ignore[attr-defined]

_SQLITE_ROWS_PER_INSERT = 64
# The journal since a writer's last head: what another writer (a coordinator, the
# operator CLI) changed. Further behind than _CATCH_UP_MAX entries, the writer forgets all.
_JOURNAL_SINCE_SQLITE = (
    "SELECT seq, debit_account_id, credit_account_id, request_id, hash FROM transfers "
    "WHERE seq >= ? ORDER BY seq"
)
_JOURNAL_SINCE_PG = _JOURNAL_SINCE_SQLITE.replace("?", "%s")
_CATCH_UP_MAX = 50_000
_HEAD_SQLITE = "SELECT seq, hash FROM journal_head WHERE id = 1"
_HEAD_LOCK_PG = _HEAD_SQLITE + " FOR UPDATE"  # every writer serializes here
_HEAD_UPDATE_SQLITE = "UPDATE journal_head SET seq = ?, hash = ? WHERE id = 1"
_HEAD_UPDATE_PG = "UPDATE journal_head SET seq = %s, hash = %s WHERE id = 1"
_KEY_SPEND_INSERT = "INSERT INTO key_spend (api_key_id, spent_micro_usd) "
_KEY_SPEND_ADD = (  # a key's first settlement inserts its row; later ones add to it
    " ON CONFLICT (api_key_id) DO UPDATE "
    "SET spent_micro_usd = key_spend.spent_micro_usd + excluded.spent_micro_usd"
)
# Array parameters go in binary (%b): psycopg dumps a list of strings as a text array
# literal with a regular-expression test per element for quoting (1.7 us per element,
# 169 us for 100 account ids) and in binary at 0.2 us per element.
_KEY_SPEND_ADD_PG = (  # one statement for the whole batch
    _KEY_SPEND_INSERT + "SELECT * FROM unnest(%b::text[], %b::bigint[])" + _KEY_SPEND_ADD
)
_BALANCES_UPDATE_PG = (  # one statement for the whole batch
    "UPDATE balances AS b SET debits_posted = v.dp, credits_posted = v.cp, "
    "debits_pending = v.dpp, credits_pending = v.cpp "
    "FROM unnest(%b::varchar[], %b::bigint[], %b::bigint[], %b::bigint[], %b::bigint[]) "
    "AS v(id, dp, cp, dpp, cpp) WHERE b.account_id = v.id"
)
_TRANSFER_COLUMNS = [c.name for c in T_TRANSFERS.columns]
_HOLD_COLUMNS = [c.name for c in T_HOLDS.columns]
_SETTLEMENT_COLUMNS = [c.name for c in T_SETTLEMENTS.columns]
# Positions in a journal entry (a list in the column order of ``transfers``).
_SEQ, _ID, _KIND, _PHASE, _DEBIT, _CREDIT, _AMOUNT = range(7)
_CREATED, _PREV_HASH, _HASH = 10, 11, 12
if _TRANSFER_COLUMNS != [
    "seq",
    "id",
    "kind",
    "phase",
    "debit_account_id",
    "credit_account_id",
    "amount",
    "pending_id",
    "request_id",
    "expires_at_unix_ms",
    "created_at_unix_ms",
    "prev_hash",
    "hash",
]:
    raise ImportError("transfers columns changed: update the entry positions in applier.py")
if [c.name for c in T_SETTLEMENTS.columns] != [
    "request_id",
    "account_id",
    "api_key_id",
    "model",
    "lease_id",
    "input_tokens",
    "output_tokens",
    "hold_micro_usd",
    "cost_micro_usd",
    "fee_micro_usd",
    "capped_micro_usd",
    "created_at_unix_ms",
] or [c.name for c in T_RECEIPTS.columns] != [
    "worker_request_id",
    "request_id",
    "segment_index",
    "node_id",
    "model",
    "input_tokens",
    "output_tokens",
    "cost_micro_usd",
    "receipt",
    "node_public_key",
    "node_signature",
    "coordinator_public_key",
    "coordinator_signature",
    "created_at_unix_ms",
]:
    raise ImportError("settlements/receipts columns changed: update _settle in applier.py")


def now_unix_ms() -> int:
    return time.time_ns() // 1_000_000


def _chunks(values: Iterable[str]) -> Iterable[list[str]]:
    items = list(dict.fromkeys(values))
    for start in range(0, len(items), _IN_CHUNK):
        yield items[start : start + _IN_CHUNK]


class _Batch:
    """The state one batch reads and the rows it will write.

    Journal entries are lists in the column order of ``transfers`` (``_SEQ`` ... ``_HASH``);
    settlements and receipts are tuples in their tables' column order, so writing them
    is one executemany (or COPY) of plain sequences.
    """

    def __init__(self, conn: Connection, now_ms: int, cache: WriterCache | None = None) -> None:
        self.conn = conn
        self.now_ms = now_ms
        self.postgres = conn.dialect.name == "postgresql"
        self.driver: Any = conn.connection.driver_connection
        seq, hash_ = self.driver.execute(
            _HEAD_LOCK_PG if self.postgres else _HEAD_SQLITE
        ).fetchone()
        self.head_seq: int = seq
        self.head_hash: bytes = bytes(hash_)
        self.cache = cache
        self.optimistic = False
        if cache is not None:
            if cache.matches(self.head_seq, self.head_hash):
                self.optimistic = True
                cache.hits += 1
            elif self._catch_up(cache):
                self.optimistic = True
                cache.caught_up += 1
                cache.key_usage.clear()
            else:
                cache.clear()
                cache.misses += 1
            self.accounts = cache.accounts
            self.provider_by_node = cache.provider_by_node
            self.open_holds = cache.open_holds
            self.key_usage = cache.key_usage
        else:
            self.accounts = {}
            self.provider_by_node = {}
            self.open_holds = {}  # request id -> row
            self.key_usage = {}
        self.dirty: set[str] = set()
        self.transfers: dict[str, Sequence[Any]] = {}  # id -> entry (columns of transfers)
        self.settlements: dict[str, SettlementRecord] = {}
        self.receipt_owner: dict[str, str] = {}  # worker request id -> request id
        self.leases: dict[str, dict[str, Any]] = {}
        self.payout_batches: dict[str, PayoutResult] = {}
        self.payable: list[str] = []
        # rows to write
        self.new_transfers: list[list[Any]] = []
        self.new_accounts: list[dict[str, Any]] = []
        self.new_holds: dict[str, dict[str, Any]] = {}  # transfer id -> row
        self.closed_holds: list[str] = []
        self.new_settlements: list[tuple[Any, ...]] = []
        self.key_spend: dict[str, int] = {}  # API key id -> cost settled in this batch
        # Keys whose spend limit is checked (self.key_usage, set above): key id -> [spent,
        # {owner: open holds}], read in ``load`` unless the writer's cache has it, and
        # kept in step by every change.
        self.new_receipts: list[tuple[Any, ...]] = []
        self.new_rejections: list[dict[str, Any]] = []
        self.new_leases: list[dict[str, Any]] = []
        self.dirty_leases: set[str] = set()
        self.new_payout_batches: list[dict[str, Any]] = []

    def _catch_up(self, cache: WriterCache) -> bool:
        """Forget only what others changed since this writer's last batch: the accounts
        and holds named by the journal entries after the head it committed (every change
        of a balance or of an open hold is such an entry). False, and nothing forgotten,
        when that head is no longer in the journal as it was, or too far behind."""
        if cache.head_seq is None or not 0 < self.head_seq - cache.head_seq <= _CATCH_UP_MAX:
            return False
        rows = self.driver.execute(
            _JOURNAL_SINCE_PG if self.postgres else _JOURNAL_SINCE_SQLITE, (cache.head_seq,)
        ).fetchall()
        if (
            len(rows) != self.head_seq - cache.head_seq + 1
            or rows[0][0] != cache.head_seq
            or bytes(rows[0][4]) != cache.head_hash
        ):
            return False
        accounts, holds = cache.accounts, cache.open_holds
        for _seq, debit, credit, request_id, _hash in rows[1:]:
            accounts.pop(debit, None)
            accounts.pop(credit, None)
            if request_id is not None:
                holds.pop(request_id, None)
        return True

    # ---------------------------------------------------------------- loading

    def load(self, ops: Sequence[Operation]) -> None:
        """Read what the batch needs and this writer does not already know.

        When ``optimistic``, holds and settlements skip the look-ups that can only find
        an earlier row of the same request: unique keys refuse a duplicate instead.
        """
        optimistic = self.optimistic
        known_accounts = self.accounts
        known_holds = self.open_holds
        account_ids: set[str] = set()
        node_ids: set[str] = set()
        transfer_ids: set[str] = set()
        hold_requests: set[str] = set()  # open holds to read
        settled_requests: set[str] = set()  # settlements to read
        worker_ids: set[str] = set()
        lease_ids: set[str] = set()
        leased_nodes: set[str] = set()  # nodes asked for: their active leases are read
        batch_ids: set[str] = set()
        placed: set[str] = set()
        limited_keys: set[str] = set()  # keys whose spend limit is checked
        limited_settles: dict[str, str] = {}  # request id -> key: capped if its hold is gone
        for op in ops:
            kind = type(op)
            if kind is Settle:
                account_ids.add(op.account_id)
                if op.spend_limit_micro_usd is not None and op.api_key_id is not None:
                    limited_settles[op.request_id] = op.api_key_id
                if op.request_id not in known_holds and op.request_id not in placed:
                    hold_requests.add(op.request_id)
                if not optimistic:
                    settled_requests.add(op.request_id)
                for segment in op.segments:
                    node_ids.add(segment.node_id)
                    if not optimistic:
                        worker_ids.add(segment.worker_request_id)
            elif kind is PlaceHold:
                account_ids.add(op.account_id)
                if op.spend_limit_micro_usd is not None and op.api_key_id is not None:
                    limited_keys.add(op.api_key_id)
                if optimistic:
                    # Its hold is new (a duplicate hold transfer would be refused), so a
                    # settlement later in this batch need not look for it either.
                    placed.add(op.request_id)
                else:
                    hold_requests.add(op.request_id)
                    settled_requests.add(op.request_id)
                    transfer_ids.add(hold_id(op.request_id))
            elif kind is PostTransfer:
                account_ids.update((op.debit_account_id, op.credit_account_id))
                transfer_ids.add(op.transfer_id)
            elif kind is ReleaseHold:
                hold_requests.add(op.request_id)
                settled_requests.add(op.request_id)
                transfer_ids.add(hold_id(op.request_id))
            elif kind is ReadAvailable:
                account_ids.add(op.account_id)
            elif kind is CreateLease:
                account_ids.add(op.account_id)
                if op.spend_limit_micro_usd is not None and op.api_key_id is not None:
                    limited_keys.add(op.api_key_id)
                node_ids.add(op.node_id)
                lease_ids.add(op.lease_id)
                leased_nodes.add(op.node_id)
            elif kind is ChargeLease or kind is EndLease:
                lease_ids.add(op.lease_id)
            elif kind is RunPayouts:
                batch_ids.add(op.batch_id)
            elif kind is ReadKeySpend:
                limited_keys.add(op.api_key_id)
        conn = self.conn
        if lease_ids:
            for chunk in _chunks(lease_ids):
                for row in conn.execute(select(T_LEASES).where(T_LEASES.c.id.in_(chunk))):
                    lease = dict(row._mapping)
                    self.leases[lease["id"]] = lease
                    account_ids.update((lease["account_id"], lease["provider_account_id"]))
        if leased_nodes:
            for chunk in _chunks(leased_nodes):
                for row in conn.execute(
                    select(T_LEASES).where(
                        T_LEASES.c.node_id.in_(chunk),
                        T_LEASES.c.status == LeaseStatus.ACTIVE.value,
                    )
                ):
                    self.leases.setdefault(row.id, dict(row._mapping))
        if batch_ids:
            self._load_payouts(batch_ids, account_ids)
        provider_by_node = self.provider_by_node
        for node_id in node_ids.intersection(provider_by_node):
            # (its account may have been forgotten, changed by another writer: read again)
            account_ids.add(provider_by_node[node_id])
        node_ids.difference_update(provider_by_node)
        if node_ids:
            for chunk in _chunks(node_ids):
                for row in conn.execute(
                    select(T_ACCOUNTS.c.id, T_ACCOUNTS.c.node_id).where(
                        T_ACCOUNTS.c.node_id.in_(chunk)
                    )
                ):
                    self.provider_by_node[row.node_id] = row.id
                    account_ids.add(row.id)
        hold_requests.difference_update(known_holds)
        if hold_requests:
            for row in _select_in(conn, T_HOLDS, _HOLD_COLUMNS, "request_id", hold_requests):
                hold = dict(zip(_HOLD_COLUMNS, row, strict=True))
                known_holds[hold["request_id"]] = hold
                account_ids.add(hold["account_id"])
        for hold_request in settled_requests:
            hold = known_holds.get(hold_request)
            if hold is not None:
                account_ids.add(hold["account_id"])
        account_ids.update(PLATFORM_ACCOUNTS)
        account_ids.difference_update(known_accounts)
        if account_ids:
            self._load_accounts(account_ids)
        if settled_requests:
            for row in _select_in(
                conn, T_SETTLEMENTS, _SETTLEMENT_COLUMNS, "request_id", settled_requests
            ):
                mapping = dict(zip(_SETTLEMENT_COLUMNS, row, strict=True))
                self.settlements[row[0]] = _settlement_record(mapping, False)
        if transfer_ids:
            for row in _select_in(conn, T_TRANSFERS, _TRANSFER_COLUMNS, "id", transfer_ids):
                self.transfers[row[_ID]] = row
        if worker_ids:
            for row in _select_in(
                conn,
                T_RECEIPTS,
                ["worker_request_id", "request_id"],
                "worker_request_id",
                worker_ids,
            ):
                self.receipt_owner[row[0]] = row[1]
        for request_id, key_id in limited_settles.items():
            if request_id not in known_holds and request_id not in placed:
                limited_keys.add(key_id)  # charged without its hold: capped at the limit
        if limited_keys:
            self._load_key_usage(limited_keys)

    def _load_key_usage(self, key_ids: set[str]) -> None:
        """Each key's recorded spend and its open holds by owner (every coordinator's),
        unless already known."""
        key_ids = key_ids.difference(self.key_usage)
        for key_id in key_ids:
            self.key_usage[key_id] = [0, {}]
        for chunk in _chunks(key_ids):
            for key_id, spent in self.conn.execute(
                select(T_KEY_SPEND.c.api_key_id, T_KEY_SPEND.c.spent_micro_usd).where(
                    T_KEY_SPEND.c.api_key_id.in_(chunk)
                )
            ):
                self.key_usage[key_id][0] = spent
            for key_id, owner, held in self.conn.execute(
                select(T_HOLDS.c.limited_key_id, T_HOLDS.c.owner, func.sum(T_HOLDS.c.amount))
                .where(T_HOLDS.c.limited_key_id.in_(chunk))
                .group_by(T_HOLDS.c.limited_key_id, T_HOLDS.c.owner)
            ):
                self.key_usage[key_id][1][owner] = int(held)

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
                self.accounts[row.id] = (
                    row.kind,
                    bool(row.must_not_overdraw),
                    row.node_id,
                    row.debits_posted,
                    row.credits_posted,
                    row.debits_pending,
                    row.credits_pending,
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
        spendable = (
            T_BALANCES.c.credits_posted - T_BALANCES.c.debits_posted - T_BALANCES.c.debits_pending
        )
        self.payable = [
            row.id
            for row in conn.execute(
                select(T_ACCOUNTS.c.id)
                .join(T_BALANCES, T_BALANCES.c.account_id == T_ACCOUNTS.c.id)
                .where(T_ACCOUNTS.c.kind == AccountKind.PROVIDER.value, spendable > 0)
                .order_by(T_ACCOUNTS.c.id)
            )
        ]
        account_ids.update(self.payable)

    # ---------------------------------------------------------------- helpers

    def spend(self, key_id: str, delta: int) -> None:
        """``delta`` more (or, a refund, less) spent by the key."""
        self.key_spend[key_id] = self.key_spend.get(key_id, 0) + delta
        usage = self.key_usage.get(key_id)
        if usage is not None:
            usage[0] += delta

    def committed(self, key_id: str) -> int:
        """What counts toward the key's limit: its spend and every open hold of it,
        whichever coordinator placed it (the key must be in ``key_usage``)."""
        spent, held = self.key_usage[key_id]
        return int(spent + sum(held.values()))

    def limit_left(self, op: Settle) -> int:
        """What the key of ``op`` may still spend or hold under its limit (no limit: the
        op's hold)."""
        if op.api_key_id not in self.key_usage or op.spend_limit_micro_usd is None:
            return op.hold_micro_usd
        return op.spend_limit_micro_usd - self.committed(op.api_key_id)

    def check_spend_limit(self, key_id: str, limit: int, amount: int, *, lease: bool) -> None:
        """SpendLimitExceeded if ``amount`` more would take the key past ``limit``."""
        committed = self.committed(key_id)
        if committed + amount > limit:
            raise SpendLimitExceeded.reached(key_id, limit, committed, amount, lease=lease)

    def account(self, account_id: str) -> AccountState:
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
        self.accounts[account_id] = (AccountKind.PROVIDER.value, True, node_id, 0, 0, 0, 0)
        self.provider_by_node[node_id] = account_id
        return account_id

    def post(self, entries: list[list[Any]], resolved_micro_usd: int = 0) -> None:
        """Apply an operation's transfers: all of them, or (on a refused limit) none.

        ``resolved_micro_usd`` is the amount of the pending transfer that a post, void or
        expire entry among ``entries`` resolves.
        """
        accounts = self.accounts
        # account id -> [debits posted, credits posted, debits pending, credits pending]
        # (items 3-6 of its AccountState), changed here and written back as a new tuple
        touched: dict[str, list[int]] = {}
        for entry in entries:
            debit_id = entry[_DEBIT]
            credit_id = entry[_CREDIT]
            debit = touched.get(debit_id)
            if debit is None:
                state = self.account(debit_id)
                debit = touched[debit_id] = [state[3], state[4], state[5], state[6]]
            credit = touched.get(credit_id)
            if credit is None:
                state = self.account(credit_id)
                credit = touched[credit_id] = [state[3], state[4], state[5], state[6]]
            amount = entry[_AMOUNT]
            phase = entry[_PHASE]
            if phase == _SINGLE:
                debit[0] += amount
                credit[1] += amount
            elif phase == _PENDING:
                debit[2] += amount
                credit[3] += amount
            else:
                debit[2] -= resolved_micro_usd
                credit[3] -= resolved_micro_usd
                if phase == _POST:
                    debit[0] += amount
                    credit[1] += amount
        for account_id, sums in touched.items():
            state = accounts[account_id]
            if state[MUST_NOT_OVERDRAW] and sums[0] + sums[2] > sums[1]:
                need = sum(
                    e[_AMOUNT] for e in entries if e[_DEBIT] == account_id and e[_PHASE] != _POST
                )
                raise InsufficientBalance(need, available(state), account_id)
        dirty = self.dirty
        for account_id, sums in touched.items():
            state = accounts[account_id]
            accounts[account_id] = (
                state[0],
                state[1],
                state[2],
                sums[0],
                sums[1],
                sums[2],
                sums[3],
            )
            dirty.add(account_id)
        now_ms = self.now_ms
        head_hash = self.head_hash
        seq = self.head_seq
        transfers = self.transfers
        for entry in entries:
            seq += 1
            entry[_SEQ] = seq
            entry[_CREATED] = now_ms
            entry[_PREV_HASH] = head_hash
            entry[_HASH] = head_hash = row_hash(head_hash, entry)
            transfers[entry[_ID]] = entry
        self.new_transfers.extend(entries)
        self.head_seq = seq
        self.head_hash = head_hash

    # ---------------------------------------------------------------- writing

    def flush(self) -> None:
        conn = self.conn
        if self.new_accounts:
            _insert(conn, T_ACCOUNTS, self.new_accounts)
            _insert_rows(conn, T_BALANCES, [(a["id"], 0, 0, 0, 0) for a in self.new_accounts])
        if self.new_transfers:
            _insert_rows(conn, T_TRANSFERS, self.new_transfers)
        if self.postgres:
            self._flush_arrays_pg()
        elif self.closed_holds:
            _execute_many(
                conn,
                f"DELETE FROM {T_HOLDS.name} WHERE transfer_id = {_mark(conn)}",
                [(tid,) for tid in self.closed_holds],
            )
        if self.new_holds:
            _insert(conn, T_HOLDS, list(self.new_holds.values()))
        if self.new_settlements:
            _insert_rows(conn, T_SETTLEMENTS, self.new_settlements)
        if self.new_receipts:
            _insert_rows(conn, T_RECEIPTS, self.new_receipts)
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
        if self.postgres:
            return  # balances, key spend and head went with the closed holds
        if self.dirty:  # one statement per up to 64 accounts, not one per account
            _sqlite_multi_row(
                self.driver,
                [(a, *self.accounts[a][3:]) for a in sorted(self.dirty)],
                _sqlite_balances_sql,
            )
        if self.key_spend:
            _sqlite_multi_row(self.driver, list(self.key_spend.items()), _sqlite_key_spend_sql)
        if self.new_transfers:
            self.driver.execute(_HEAD_UPDATE_SQLITE, (self.head_seq, self.head_hash))

    def _flush_arrays_pg(self) -> None:
        """PostgreSQL: the batch's statements that take arrays (holds closed, balances,
        key spend, journal head) in one pipeline: one round trip instead of four. They
        run before the new holds are copied, as the closed holds' delete always has, and
        none of them reads a row that a later COPY writes."""
        driver = self.driver
        with driver.pipeline():
            if self.closed_holds:
                driver.execute(
                    f"DELETE FROM {T_HOLDS.name} WHERE transfer_id = ANY(%b)", (self.closed_holds,)
                )
            if self.dirty:
                changed = sorted(self.dirty)
                sums = [self.accounts[a][3:] for a in changed]
                driver.execute(
                    _BALANCES_UPDATE_PG, (changed, *([s[i] for s in sums] for i in range(4)))
                )
            if self.key_spend:
                driver.execute(
                    _KEY_SPEND_ADD_PG, (list(self.key_spend), list(self.key_spend.values()))
                )
            if self.new_transfers:
                driver.execute(_HEAD_UPDATE_PG, (self.head_seq, self.head_hash))


def _select_in(
    conn: Connection, table: Any, columns: list[str], key: str, values: Iterable[str]
) -> Iterable[tuple[Any, ...]]:
    """Rows of ``table`` whose ``key`` is one of ``values`` (in chunks), on the driver."""
    head = f"SELECT {', '.join(columns)} FROM {table.name} WHERE {key}"
    if conn.dialect.name == "postgresql":
        yield from conn.exec_driver_sql(f"{head} = ANY(%b)", (list(set(values)),)).all()
        return
    mark = _mark(conn)
    head += " IN "
    for chunk in _chunks(values):
        sql = head + "(" + ", ".join([mark] * len(chunk)) + ")"
        yield from conn.exec_driver_sql(sql, tuple(chunk)).all()


def _mark(conn: Connection) -> str:
    return "?" if conn.dialect.paramstyle == "qmark" else "%s"


def _execute_many(conn: Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """executemany straight on the driver's connection (same transaction): the hot path
    skips SQLAlchemy's per-row work. Driver errors arrive unwrapped (see ``writer``)."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(sql, [tuple(row) for row in rows])
        return
    conn.connection.driver_connection.executemany(sql, rows)  # type: ignore[union-attr]


def _insert(conn: Connection, table: Any, rows: list[dict[str, Any]]) -> None:
    """Insert dict rows (keyed by column name)."""
    getter = operator.itemgetter(*[c.name for c in table.columns])
    _insert_rows(conn, table, [getter(row) for row in rows])


def _insert_rows(conn: Connection, table: Any, rows: Sequence[Sequence[Any]]) -> None:
    """Insert rows given as sequences in the table's column order.

    PostgreSQL: one COPY (executemany would cost a round trip per row). SQLite:
    multi-row INSERTs of up to ``_SQLITE_ROWS_PER_INSERT`` rows (a power of two, so a
    handful of statements stay prepared): sqlite3 lets go of the GIL at every statement
    step, and a thread that takes it back behind a busy event loop waits a switch
    interval each time; one step per 64 rows instead of one per row keeps the writer off
    that convoy.
    """
    driver: Any = conn.connection.driver_connection
    if conn.dialect.name == "postgresql":
        statement, types = _pg_copy(table)
        with driver.cursor().copy(statement) as copy:
            copy.set_types(types)
            write_row = copy.write_row
            for row in rows:
                write_row(row)
        return
    _sqlite_multi_row(driver, rows, functools.partial(_sqlite_insert_sql, table.name))


def _sqlite_multi_row(
    driver: Any, rows: Sequence[Sequence[Any]], statement: Callable[[int, int], str]
) -> None:
    """Run ``statement(columns, count)`` (a statement with ``count`` rows of ``columns``
    placeholders) over ``rows`` in chunks of up to ``_SQLITE_ROWS_PER_INSERT`` rows."""
    total = len(rows)
    if not total:
        return
    columns = len(rows[0])
    start = 0
    while start < total:
        count = _SQLITE_ROWS_PER_INSERT
        while count > total - start:
            count //= 2
        params = list(chain.from_iterable(rows[start : start + count]))
        driver.execute(statement(columns, count), params)
        start += count


# PostgreSQL's binary COPY format by column type: values go over as their binary
# representations, so byte strings are not hex-escaped and numbers not printed, and the
# server does not parse text back (client CPU per settlement and the server's share of
# each batch both drop; see docs/benchmarks.md, ledger).
_PG_BINARY_TYPES = {
    "BIGINT": "int8",
    "INTEGER": "int4",
    "VARCHAR": "text",
    "BYTEA": "bytea",
    "BOOLEAN": "bool",
}


@functools.cache
def _pg_copy(table: Any) -> tuple[str, tuple[str, ...]]:
    """The binary COPY statement for ``table`` and its columns' type names."""
    from sqlalchemy.dialects import postgresql

    dialect = postgresql.dialect()
    types = []
    for column in table.columns:
        name = column.type.compile(dialect=dialect).split("(")[0]
        types.append(_PG_BINARY_TYPES[name])  # a new column type needs an entry here
    columns = ", ".join(c.name for c in table.columns)
    return f"COPY {table.name} ({columns}) FROM STDIN (FORMAT BINARY)", tuple(types)


def _sqlite_values(columns: int, rows: int) -> str:
    row = "(" + ", ".join(["?"] * columns) + ")"
    return ", ".join([row] * rows)


@functools.cache
def _sqlite_insert_sql(table: str, columns: int, rows: int) -> str:
    return f"INSERT INTO {table} VALUES " + _sqlite_values(columns, rows)


@functools.cache
def _sqlite_balances_sql(columns: int, rows: int) -> str:
    """Set the sums of ``rows`` accounts: rows of (account id, debits posted, credits
    posted, debits pending, credits pending)."""
    return (
        "UPDATE balances SET debits_posted = v.column2, credits_posted = v.column3, "
        "debits_pending = v.column4, credits_pending = v.column5 "
        f"FROM (VALUES {_sqlite_values(columns, rows)}) AS v "
        "WHERE balances.account_id = v.column1"
    )


@functools.cache
def _sqlite_key_spend_sql(columns: int, rows: int) -> str:
    """Add to the spend of ``rows`` keys: rows of (key id, micro-USD)."""
    return _KEY_SPEND_INSERT + f"VALUES {_sqlite_values(columns, rows)}" + _KEY_SPEND_ADD


_LEASE_MUTABLE = ("periods_charged", "charged_micro_usd", "status", "ended_at_unix_ms")


_USE_A_NEW_ID = (
    "a request id is used once: send a new one, or leave request_id empty and the "
    "coordinator assigns one"
)


def request_id_in_flight(request_id: str, *, elsewhere: bool = False) -> str:
    """The refusal of a request id a running request holds: here, or (``elsewhere``) one
    whose hold another coordinator placed."""
    where = " through another coordinator" if elsewhere else ""
    return f"request id {request_id!r} is in flight already{where}; {_USE_A_NEW_ID}"


def request_id_used(request_id: str) -> str:
    """The refusal of a request id that an earlier request used."""
    return f"request id {request_id!r} was used by an earlier request; {_USE_A_NEW_ID}"


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
        api_key_id=lease.get("api_key_id"),
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
) -> list[Any]:
    """A journal entry in the column order of ``transfers``; ``post`` fills in the
    sequence number, time and hashes."""
    return [
        0,
        transfer_id,
        _VALUE[kind],
        _VALUE[phase],
        debit,
        credit,
        amount,
        pending_id,
        request_id,
        expires_at_unix_ms,
        0,
        b"",
        b"",
    ]


# -------------------------------------------------------------------- operations


def _post_transfer(batch: _Batch, op: PostTransfer) -> TransferResult:
    existing = batch.transfers.get(op.transfer_id)
    if existing is not None:
        same = (
            existing[_KIND] == op.kind.value
            and existing[_DEBIT] == op.debit_account_id
            and existing[_CREDIT] == op.credit_account_id
            and existing[_AMOUNT] == op.amount
        )
        if not same:
            raise IdConflict(
                f"transfer id {op.transfer_id!r} was already used for a different transfer; "
                "choose a new id"
            )
        return TransferResult(op.transfer_id, op.amount, created=False)
    debit = batch.account(op.debit_account_id)
    credit = batch.account(op.credit_account_id)
    if op.kind is TransferKind.DEPOSIT and credit[KIND] == AccountKind.PLATFORM.value:
        raise WrongAccountKind(
            f"cannot deposit into platform account {op.credit_account_id!r}; "
            "deposit into a client or provider account"
        )
    if debit[MUST_NOT_OVERDRAW] and available(debit) < op.amount:
        raise InsufficientBalance(op.amount, available(debit), op.debit_account_id)
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
    known = batch.open_holds.get(op.request_id)
    existing = batch.transfers.get(tid)
    if op.request_id in batch.settlements or (existing is not None and known is None):
        # Settled, or its hold released or expired: a request id pays for one request.
        raise IdConflict(request_id_used(op.request_id))
    if existing is None and known is not None and known["transfer_id"] == tid:
        existing = _entry(
            tid,
            TransferKind.HOLD,
            TransferPhase.PENDING,
            known["account_id"],
            CLEARING,
            known["amount"],
        )
    if existing is not None:
        if known is not None and known["owner"] != op.owner:
            # The same id sent to two coordinators at once: one hold, one payment, two
            # requests served. The second to reach the journal is refused.
            raise IdConflict(request_id_in_flight(op.request_id, elsewhere=True))
        if existing[_DEBIT] != op.account_id or existing[_AMOUNT] != op.amount:
            raise IdConflict(
                f"request id {op.request_id!r} already has a different hold; use a new request id"
            )
        return HoldResult(op.request_id, op.account_id, op.amount, created=False)
    account = batch.account(op.account_id)
    if account[KIND] != AccountKind.CLIENT.value:
        raise WrongAccountKind(f"account {op.account_id!r} is not a client account")
    if available(account) < op.amount:
        raise InsufficientBalance(op.amount, available(account), op.account_id)
    key_id = op.api_key_id
    if op.spend_limit_micro_usd is not None and key_id is not None:
        batch.check_spend_limit(key_id, op.spend_limit_micro_usd, op.amount, lease=False)
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
        "api_key_id": key_id,
        "amount": op.amount,
        "expires_at_unix_ms": op.expires_at_unix_ms,
        "owner": op.owner,
        "limited_key_id": key_id if op.spend_limit_micro_usd is not None else None,
    }
    batch.open_holds[op.request_id] = row
    batch.new_holds[tid] = row
    usage = batch.key_usage.get(key_id) if key_id is not None else None
    if usage is not None:
        usage[1][op.owner] = usage[1].get(op.owner, 0) + op.amount
    return HoldResult(op.request_id, op.account_id, op.amount, created=True)


def _close_hold(batch: _Batch, hold: dict[str, Any]) -> None:
    del batch.open_holds[hold["request_id"]]
    usage = batch.key_usage.get(hold["api_key_id"])
    if usage is not None:
        usage[1][hold["owner"]] -= hold["amount"]
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
            )
        ],
        hold["amount"],
    )
    _close_hold(batch, hold)
    return ReleaseResult(op.request_id, hold["amount"], "expired" if op.expire else "released")


def _settle(batch: _Batch, op: Settle) -> SettlementRecord:
    rid = op.request_id
    known = batch.settlements.get(rid)
    if known is not None:
        return SettlementRecord(**{**known.__dict__, "created": False})
    segments = op.segments
    receipt_owner = batch.receipt_owner
    for segment in segments:
        owner = receipt_owner.get(segment.worker_request_id)
        if owner is not None and owner != rid:
            raise ReplayedReceipt(
                f"receipt for node request {segment.worker_request_id!r} was already settled "
                f"with request {owner!r}; a receipt pays once"
            )
    client = batch.account(op.account_id)
    hold = batch.open_holds.get(rid)
    if hold is not None and op.owner is not None and hold["owner"] != op.owner:
        raise IdConflict(request_id_in_flight(rid, elsewhere=True))
    if hold is not None and hold["account_id"] != op.account_id:
        raise IdConflict(
            f"request {rid!r} holds money on account {hold['account_id']!r}, not {op.account_id!r}"
        )
    costs = [segment.cost_micro_usd for segment in segments]
    # Without a hold (lost in a crash before it was durable, refused, or expired): charge
    # directly, never more than the hold promised, than the account has, nor than the
    # key's spend limit has left.
    if hold is not None:
        held = hold["amount"]
    else:
        held = max(0, min(op.hold_micro_usd, available(client), batch.limit_left(op)))
    charges = money.cap_to_hold(held, costs)
    cost = sum(charges)
    entries: list[list[Any]] = []
    if hold is not None:
        if cost > 0:
            entries.append(
                _entry(
                    f"post:{rid}",
                    TransferKind.CHARGE,
                    TransferPhase.POST,
                    op.account_id,
                    CLEARING,
                    cost,
                    pending_id=hold["transfer_id"],
                    request_id=rid,
                )
            )
        else:
            entries.append(
                _entry(
                    f"void:{rid}",
                    TransferKind.RELEASE,
                    TransferPhase.VOID,
                    op.account_id,
                    CLEARING,
                    hold["amount"],
                    pending_id=hold["transfer_id"],
                    request_id=rid,
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
    fee_bps = op.fee_bps
    for segment, charge in zip(segments, charges, strict=True):
        if charge <= 0:
            continue
        provider_amount, fee = money.split_fee(charge, fee_bps)
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
    batch.post(entries, hold["amount"] if hold is not None else 0)
    if hold is not None:
        _close_hold(batch, hold)
    now_ms = batch.now_ms
    input_tokens = output_tokens = 0
    new_receipts = batch.new_receipts
    for segment, charge in zip(segments, charges, strict=True):
        input_tokens += segment.input_tokens
        output_tokens += segment.output_tokens
        receipt_owner[segment.worker_request_id] = rid
        new_receipts.append(
            (
                segment.worker_request_id,
                rid,
                segment.segment_index,
                segment.node_id,
                segment.model,
                segment.input_tokens,
                segment.output_tokens,
                charge,
                segment.receipt,
                segment.node_public_key,
                segment.node_signature,
                segment.coordinator_public_key,
                segment.coordinator_signature,
                now_ms,
            )
        )
    capped = sum(costs) - cost
    key_id = op.api_key_id
    if key_id is not None and cost:
        batch.spend(key_id, cost)
    batch.new_settlements.append(
        (
            rid,
            op.account_id,
            op.api_key_id,
            op.model,
            op.lease_id,
            input_tokens,
            output_tokens,
            held,
            cost,
            fee_total,
            capped,
            now_ms,
        )
    )
    record = SettlementRecord(
        rid,
        op.account_id,
        cost,
        fee_total,
        cost - fee_total,
        held,
        capped,
        input_tokens,
        output_tokens,
        True,
    )
    batch.settlements[rid] = record
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
    if client[KIND] != AccountKind.CLIENT.value:
        raise WrongAccountKind(f"account {op.account_id!r} is not a client account")
    _refuse_if_leased(batch, op)
    total = money.lease_total_micro_usd(op.price_micro_usd_per_gpu_hour, op.gpus, op.hours)
    money.check_amount(total, "lease total")
    if available(client) < total:
        raise InsufficientBalance(total, available(client), op.account_id)
    if op.spend_limit_micro_usd is not None and op.api_key_id is not None:
        batch.check_spend_limit(op.api_key_id, op.spend_limit_micro_usd, total, lease=True)
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
        "api_key_id": op.api_key_id,
    }
    batch.leases[op.lease_id] = lease
    batch.new_leases.append(lease)
    if op.api_key_id is not None:  # the key spent the prepaid price (a refund gives back)
        batch.spend(op.api_key_id, total)
    return _lease_record(lease)


def _refuse_if_leased(batch: _Batch, op: CreateLease) -> None:
    """A node is leased whole, to one client at a time: its engine serves one lessee.

    The batch holds every active lease of the node (read in ``load``, or created or
    ended earlier in this batch). A lease past its end that the sweeper has not closed
    yet no longer holds the node."""
    for other in batch.leases.values():
        if (
            other["node_id"] == op.node_id
            and other["status"] == LeaseStatus.ACTIVE.value
            and other["ends_at_unix_ms"] > op.started_at_unix_ms
        ):
            until = _utc(other["ends_at_unix_ms"])
            if other["account_id"] == op.account_id:
                raise NodeLeased(
                    f"you already lease node {op.node_id!r} (lease {other['id']!r}, until "
                    f"{until}); send that lease_id with your requests, or end it first"
                )
            raise NodeLeased(
                f"node {op.node_id!r} is leased to another client until {until}; choose "
                "another node (ListNodes marks the leased ones) or lease it after then"
            )


def _utc(unix_ms: int) -> str:
    return datetime.fromtimestamp(unix_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


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
    key_id = lease.get("api_key_id")
    if refund and key_id is not None:
        batch.spend(key_id, -refund)
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
        amount = available(batch.account(account_id))
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


def apply_batch(
    conn: Connection,
    ops: Sequence[Operation],
    now_ms: int | None = None,
    *,
    cache: WriterCache | None = None,
) -> tuple[list[Any], dict[str, int]]:
    """Apply ``ops`` inside the caller's open transaction on ``conn``.

    Returns one answer per operation (its result, or the LedgerError that refused it) and
    the available balance of every account the batch touched. Database errors propagate
    (the caller rolls back and retries or fails the batch). With ``cache``, the batch
    starts from what the writer remembers when the journal head allows it; the caller
    calls ``cache.committed()`` after the commit and ``cache.clear()`` on any failure.
    """
    batch = _Batch(conn, now_unix_ms() if now_ms is None else now_ms, cache)
    batch.load(ops)
    answers: list[Any] = []
    handlers = _HANDLERS
    read: set[str] = set()  # accounts whose balance the caller must learn though unchanged
    for op in ops:
        try:
            if type(op) is ReadAvailable:
                answers.append(available(batch.account(op.account_id)))
                read.add(op.account_id)
            elif type(op) is ReadKeySpend:
                spent, held = batch.key_usage[op.api_key_id]
                others = sum(amount for owner, amount in held.items() if owner != op.owner)
                answers.append(KeyUsage(spent, others))
            else:
                answers.append(handlers[type(op)](batch, op))
        except LedgerError as exc:
            answers.append(exc)
            # A refused hold or lease: the caller's idea of the balance was wrong (another
            # coordinator spent it), so it learns the database's.
            if type(op) is PlaceHold or type(op) is CreateLease:
                read.add(op.account_id)
    batch.flush()
    accounts = batch.accounts
    balances = {account_id: available(accounts[account_id]) for account_id in batch.dirty}
    for account_id in read:
        if account_id in accounts:
            balances[account_id] = available(accounts[account_id])
    if cache is not None:
        cache.pending_head = (batch.head_seq, batch.head_hash)
    return answers, balances
