"""``Ledger``: the asynchronous facade a coordinator uses on its request path.

Lifecycle of one request::

    principal = await ledger.authenticate(api_key)          # UNAUTHENTICATED / RESOURCE_EXHAUSTED
    hold = await ledger.place_hold(request_id, principal, max_cost)   # FAILED_PRECONDITION
    ... route, relay, count tokens ...
    outcome = await ledger.settle(request_id, receipts, relayed)      # verify + countersign
    # outcome.record.cost_micro_usd and outcome.receipts go into GenerateFinal now;
    # outcome.durable resolves when the settlement is committed (no need to wait).
    # On failure before any receipt: ledger.release_hold(request_id).

Holds are admitted against an in-memory view of each account's available balance:
``base`` (the database's value, adopted after every commit that touches the account)
plus the expected effect of operations queued but not yet committed. The check and the
reservation run without an ``await`` between them, so concurrent requests in one
process can never overspend. The database re-checks every hold inside the batch that
commits it (the authoritative check, which also covers several coordinators sharing one
PostgreSQL); a hold refused there fails ``hold.durable``, and settlement then charges at
most what the account has. An account credited by another process (an operator's
deposit) is seen at its next commit, and a hold that looks short re-reads the database
once before it is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mercato.v1 import market_pb2

from marketplace.aio import cancel_and_wait
from marketplace.identity import Identity
from marketplace.ledger import api_keys, identifiers, money
from marketplace.ledger.applier import (
    DEPOSITS,
    now_unix_ms,
    request_id_in_flight,
    request_id_used,
)
from marketplace.ledger.errors import (
    BadReceipt,
    IdConflict,
    InsufficientBalance,
    InvalidInput,
    InvalidKey,
    InvalidLeaseHours,
    LeaseNotActive,
    LedgerError,
    LedgerUnavailable,
    MalformedReceipt,
    MiscountedReceipt,
    PermissionDenied,
    ReplayedReceipt,
    RevokedKey,
    SpendLimitExceeded,
    UnknownHold,
    UnknownLease,
)
from marketplace.ledger.intent_log import IntentLog, read_segments
from marketplace.ledger.models import AccountKind, LeaseStatus, TransferKind
from marketplace.ledger.operations import (
    ChargeLease,
    CreateLease,
    EndLease,
    HoldResult,
    KeyUsage,
    LeaseRecord,
    Operation,
    PlaceHold,
    PostTransfer,
    ReadAvailable,
    ReadKeySpend,
    RecordRejection,
    ReleaseHold,
    ReleaseResult,
    Settle,
    SettlementRecord,
    SettleSegment,
    TransferResult,
)
from marketplace.ledger.rate_limit import KeyRateLimiter
from marketplace.ledger.receipts import RelayedSegment, check_receipt, countersign, same_receipt
from marketplace.ledger.settings import LedgerSettings
from marketplace.ledger.store import AccountView, KeyRecord, LedgerStore, ReceiptRow, UsageRow
from marketplace.ledger.writer import GroupCommitWriter

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_SETTLED_REMEMBERED = 100_000
_LEASES_REMEMBERED = 10_000

# The longest lease, in hours (366 days): what ``mercato lease create --hours`` and
# AccountService.CreateLease accept. A longer one would end past what a timestamp can
# show (year 9999), or far enough that it could never be checked.
LEASE_HOURS_MAX = 24 * 366


def check_lease_hours(hours: object) -> int:
    """``hours`` if it is a whole number in 1..LEASE_HOURS_MAX, else InvalidLeaseHours."""
    if isinstance(hours, bool) or not isinstance(hours, int) or not 1 <= hours <= LEASE_HOURS_MAX:
        raise InvalidLeaseHours(
            f"hours must be a whole number from 1 to {LEASE_HOURS_MAX} (366 days), got "
            f"{hours!r}; lease fewer hours, and lease again when it ends"
        )
    return hours


@dataclass(frozen=True)
class Principal:
    """Who is calling: an authenticated API key and its account."""

    key_id: str
    account_id: str
    account_kind: str
    spend_limit_micro_usd: int | None
    rate_limit_per_minute: int | None

    def require_client(self) -> None:
        """PermissionDenied unless the key belongs to a client account."""
        if self.account_kind != AccountKind.CLIENT.value:
            raise PermissionDenied(
                f"key {self.key_id} belongs to a {self.account_kind} account; only client "
                "accounts can make requests (issue a key for a client account)"
            )


@dataclass
class Hold:
    """A request's reserved maximum cost."""

    request_id: str
    account_id: str
    amount_micro_usd: int
    expires_at_unix_ms: int
    api_key_id: str | None
    durable: asyncio.Future[HoldResult] = field(repr=False)
    spend_limit_micro_usd: int | None = None  # the key's, when the hold was placed


@dataclass
class SettleOutcome:
    """A settled request: what to tell the client now, and when it is durable."""

    record: SettlementRecord  # cost/fee as computed now (the durable one is the same)
    receipts: list[market_pb2.SignedReceipt]  # countersigned, one per segment
    durable: asyncio.Future[SettlementRecord] = field(repr=False)


@dataclass(frozen=True)
class RecoveryReport:
    replayed: int  # settlements read back from the intent log
    settled: int  # of those, settled now (the rest had been settled before the crash)
    released: int  # this owner's holds left open by the crash, released
    expired: int  # other owners' holds past their expiry, expired


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # mark retrieved: callers may ignore a durability future


class Ledger:
    """Async facade over the ledger: auth, holds, settlement, leases, reads."""

    def __init__(
        self,
        settings: LedgerSettings | None = None,
        *,
        coordinator: Identity | None = None,
    ) -> None:
        self.settings = settings or LedgerSettings()
        self.coordinator = coordinator or Identity.generate()
        self._store: LedgerStore | None = None
        self._writer: GroupCommitWriter | None = None
        self._reader = ThreadPoolExecutor(2, thread_name_prefix="ledger-reader")
        self._intents: IntentLog | None = None
        self._rate = KeyRateLimiter()
        self._keys: dict[str, tuple[float, KeyRecord | None]] = {}
        self._holds: dict[str, Hold] = {}
        # Holds no longer held while their request may still run, by request id: refused
        # by the writer (another coordinator had spent the balance, the id was used, ...)
        # or expired (a request running longer than hold_expiry_s). Settling the request
        # charges what it delivered up to that hold and to the balance there is.
        self._unheld: OrderedDict[str, Hold] = OrderedDict()
        self._settled: OrderedDict[str, SettleOutcome] = OrderedDict()
        self._base: dict[str, int] = {}
        self._inflight: dict[str, int] = {}
        self._effects: dict[int, tuple[tuple[str, int], ...]] = {}
        self._loading: dict[str, asyncio.Future[Any]] = {}
        # Limited keys, key id -> [spent, held]: spent is the key's settled spend plus the
        # holds other coordinators had open, as last read through the writer (ReadKeySpend);
        # held is this process's holds in flight. The writer checks the limit again
        # against every open hold of the key; a key it refuses is read again (_stale_spend).
        self._key_spend: dict[str, list[int]] = {}
        self._stale_spend: set[str] = set()
        # Leases asked for by this process, by id (the failed ones dropped): a twin
        # that read the balance while one was made is answered as a retry.
        self._creating_leases: OrderedDict[str, asyncio.Future[LeaseRecord]] = OrderedDict()
        self._sweeper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ lifecycle

    @property
    def store(self) -> LedgerStore:
        if self._store is None:
            raise LedgerUnavailable("the ledger is not started; call 'await ledger.start()'")
        return self._store

    async def start(self, *, recover: bool = True, sweep: bool = True) -> RecoveryReport | None:
        """Open and migrate the database, start the writer, recover what a crash left."""
        # First: refuses (LedgerBusy) while another live process writes as this owner.
        directory = self.settings.resolved_intent_log_dir() / self.settings.owner
        self._intents = IntentLog(directory, fsync=self.settings.intent_log_fsync)
        try:
            self._store = await self._read(LedgerStore.open, self.settings)
        except BaseException:
            self._intents.close()  # lets go of the writer lock (a retry can take it)
            self._intents = None
            raise
        self._writer = GroupCommitWriter(
            self._store.engine,
            batch_max=self.settings.commit_batch_max,
            window_ms=self.settings.commit_window_ms,
            on_batch=self._on_batch,
        )
        self._writer.start()
        report = await self.recover_unsettled() if recover else None
        if sweep:
            self._sweeper = asyncio.get_running_loop().create_task(
                self._sweep_forever(), name="ledger-sweeper"
            )
        return report

    async def close(self) -> None:
        """Commit everything queued, then stop. Unsettled holds stay (they expire)."""
        if self._sweeper is not None:
            await cancel_and_wait(self._sweeper)
            self._sweeper = None
        if self._writer is not None:
            await self._writer.close()
            self._writer = None
        if self._intents is not None:
            self._intents.close()
            self._intents = None
        if self._store is not None:
            await self._read(self._store.close)
            self._store = None
        self._reader.shutdown(wait=True)

    async def __aenter__(self) -> Ledger:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def flush(self) -> None:
        """Wait until every operation queued so far is durable."""
        if self._writer is not None:
            await self._writer.drain()

    # ------------------------------------------------------------ plumbing

    async def _read(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader, lambda: fn(*args, **kwargs))

    def _submit(
        self, op: Operation, effects: tuple[tuple[str, int], ...] = ()
    ) -> asyncio.Future[Any]:
        if self._writer is None:
            raise LedgerUnavailable("the ledger is not started; call 'await ledger.start()'")
        future = self._writer.submit(op)
        future.add_done_callback(_consume)
        if effects:
            self._effects[id(op)] = effects
            for account_id, delta in effects:
                self._inflight[account_id] = self._inflight.get(account_id, 0) + delta
        return future

    def _on_batch(
        self, ops: Sequence[Operation], answers: Sequence[Any], available: dict[str, int]
    ) -> None:
        for op in ops:
            for account_id, delta in self._effects.pop(id(op), ()):
                self._inflight[account_id] -= delta
        self._base.update(available)

    def _available(self, account_id: str) -> int:
        return self._base[account_id] + self._inflight.get(account_id, 0)

    async def _load(self, account_id: str, *, refresh: bool = False) -> int:
        """The account's available balance, reading the database if not known (or asked)."""
        if account_id in self._base and not refresh:
            return self._available(account_id)
        loading = self._loading.get(account_id)
        if loading is None:
            loading = self._submit(ReadAvailable(account_id))
            self._loading[account_id] = loading
            loading.add_done_callback(lambda _f: self._loading.pop(account_id, None))
        await asyncio.shield(loading)
        return self._available(account_id)

    # ------------------------------------------------------------ keys

    async def authenticate(self, api_key: str) -> Principal:
        """The principal of ``api_key``; Unauthenticated or RateLimited otherwise.

        The key row is read from the database on every call unless
        ``key_cache_ttl_s`` is set, so a revoked key stops working at once.
        """
        key_id, secret = api_keys.parse_key(api_key)
        record = await self._key_record(key_id)
        if record is None or not api_keys.secret_matches(secret, record.secret_sha256):
            raise InvalidKey(
                "API key is not valid: check it, or issue a new one with 'mercato keys issue'"
            )
        if record.revoked:
            raise RevokedKey(
                f"API key {key_id} was revoked; issue a new one with 'mercato keys issue'"
            )
        self._rate.check(key_id, record.rate_limit_per_minute)
        return Principal(
            key_id=record.id,
            account_id=record.account_id,
            account_kind=record.account_kind,
            spend_limit_micro_usd=record.spend_limit_micro_usd,
            rate_limit_per_minute=record.rate_limit_per_minute,
        )

    async def _key_record(self, key_id: str) -> KeyRecord | None:
        ttl = self.settings.key_cache_ttl_s
        now = time.monotonic()
        if ttl > 0:
            cached = self._keys.get(key_id)
            if cached is not None and now - cached[0] < ttl:
                return cached[1]
        record = await self._read(self.store.key_record, key_id)
        if ttl > 0:
            self._keys[key_id] = (now, record)
        return record

    def forget_key(self, key_id: str) -> None:
        """Drop a cached key at once (call after revoking through another path)."""
        self._keys.pop(key_id, None)

    async def key_usage(self, key_id: str) -> tuple[int, int]:
        """What the key has spent, and holds in open requests through any coordinator,
        as the database has it (micro-USD): what its spend limit is checked against."""
        return await self._read(self.store.key_usage, key_id)

    async def revoke_key(self, key_id: str) -> None:
        await self._read(self.store.revoke_key, key_id)
        self.forget_key(key_id)

    async def _spend(self, key_id: str, *, refresh: bool = False) -> list[int]:
        """The key's [spent, held], read through the writer when not known, when
        ``refresh`` asks, or when the writer refused one of its holds or leases. Read in
        order with the writer's batches, a settlement of this process is either in the
        figure read or added to it when it becomes durable, never both."""
        usage = self._key_spend.get(key_id)
        if usage is not None and not refresh and key_id not in self._stale_spend:
            return usage
        self._stale_spend.discard(key_id)
        read: KeyUsage = await self._submit(ReadKeySpend(key_id, self.settings.owner))
        usage = self._key_spend.setdefault(key_id, [0, 0])
        usage[0] = read.spent_micro_usd + read.held_by_others_micro_usd
        return usage

    # ------------------------------------------------------------ holds

    async def place_hold(
        self,
        request_id: str,
        payer: Principal | str,
        amount_micro_usd: int,
        *,
        expires_in_s: float | None = None,
        fresh_id: bool = False,
    ) -> Hold:
        """Reserve ``amount_micro_usd`` on the payer's account for ``request_id``.

        Returns once the reservation is made in memory (no disk wait); ``hold.durable``
        resolves when it is committed. Raises InsufficientBalance ("insufficient balance:
        need X, have Y"), SpendLimitExceeded, UnknownAccount, IdConflict (among others
        when an earlier request used ``request_id``: see ``check_request_id``, which this
        runs unless ``fresh_id`` says the caller has just generated the id). Asked again
        for a hold still open, it answers that hold.
        """
        identifiers.check_id(request_id, "request id")
        money.check_amount(amount_micro_usd, "hold amount")
        if isinstance(payer, Principal):
            payer.require_client()
            account_id, key_id, limit = payer.account_id, payer.key_id, payer.spend_limit_micro_usd
        else:
            account_id, key_id, limit = identifiers.check_id(payer, "account id"), None, None
        existing = self._existing_hold(request_id, account_id, amount_micro_usd)
        if existing is not None:
            return existing
        if not fresh_id:
            await self.check_request_id(request_id)
        usage = await self._spend(key_id) if key_id is not None and limit is not None else None
        await self._load(account_id)
        if self._available(account_id) < amount_micro_usd:
            await self._load(account_id, refresh=True)
        if key_id is not None and _over_limit(usage, limit, amount_micro_usd):
            usage = await self._spend(key_id, refresh=True)  # others' holds may have ended
        # No await from here on: the check and the reservation are one step.
        existing = self._existing_hold(request_id, account_id, amount_micro_usd)
        if existing is not None:
            return existing
        have = self._available(account_id)
        if have < amount_micro_usd:
            raise InsufficientBalance(amount_micro_usd, have, account_id)
        _check_limit(key_id, limit, usage, amount_micro_usd)
        expiry_s = self.settings.hold_expiry_s if expires_in_s is None else expires_in_s
        expires_at = now_unix_ms() + int(expiry_s * 1000)
        op = PlaceHold(
            request_id,
            account_id,
            amount_micro_usd,
            expires_at,
            self.settings.owner,
            key_id,
            spend_limit_micro_usd=limit,
        )
        future = self._submit(op, ((account_id, -amount_micro_usd),))
        hold = Hold(request_id, account_id, amount_micro_usd, expires_at, key_id, future, limit)
        self._holds[request_id] = hold
        if usage is not None:
            usage[1] += amount_micro_usd
        future.add_done_callback(lambda f: self._hold_written(hold, f))
        return hold

    def _hold_written(self, hold: Hold, future: asyncio.Future[HoldResult]) -> None:
        if future.cancelled() or future.exception() is None:
            return
        self._learn_refusal(hold.api_key_id, future.exception())
        # A hold released or settled meanwhile was taken off the key's figure then.
        if self._holds.get(hold.request_id) is hold:
            self._unhold_key(hold)
            self._unhold(hold)

    def _learn_refusal(self, key_id: str | None, error: BaseException | None) -> None:
        """The writer refused a hold or lease for the key's limit: another coordinator's
        holds or settlements count toward it. The key is read again before its next use."""
        if key_id is not None and isinstance(error, SpendLimitExceeded):
            self._stale_spend.add(key_id)

    def _unhold(self, hold: Hold) -> None:
        """``hold`` no longer holds (refused, or expired): remembered for its settlement."""
        self._holds.pop(hold.request_id, None)
        self._unheld[hold.request_id] = hold
        if len(self._unheld) > _SETTLED_REMEMBERED:
            self._unheld.popitem(last=False)

    async def check_request_id(self, request_id: str) -> None:
        """Refuse (IdConflict) a request id that an earlier request used: one settled, or
        one whose hold was placed (and may since have been released or expired), here or
        through another coordinator, before or since a restart. A request id pays for one
        request: reused, the second request would be served and never charged. A hold
        open in this process is not refused (``place_hold`` answers it again). One indexed
        read; callers that generate their ids skip it."""
        identifiers.check_id(request_id, "request id")
        if request_id in self._settled:
            raise IdConflict(request_id_used(request_id))
        if request_id in self._holds:
            return
        used = await self._read(self.store.request_id_use, request_id)
        if used is not None and request_id not in self._holds:  # (placed here meanwhile: ok)
            raise IdConflict(request_id_used(request_id))

    def _existing_hold(self, request_id: str, account_id: str, amount: int) -> Hold | None:
        hold = self._holds.get(request_id)
        if hold is not None:
            if hold.account_id != account_id or hold.amount_micro_usd != amount:
                raise IdConflict(f"request id {request_id!r} already holds a different amount")
            return hold
        if request_id in self._settled:
            raise IdConflict(request_id_used(request_id))
        return None

    def _unhold_key(self, hold: Hold) -> None:
        if hold.api_key_id is not None and hold.api_key_id in self._key_spend:
            self._key_spend[hold.api_key_id][1] -= hold.amount_micro_usd

    def release_hold(self, request_id: str) -> asyncio.Future[ReleaseResult]:
        """Release a request's hold (failure or cancellation before any usage). Idempotent."""
        identifiers.check_id(request_id, "request id")
        hold = self._holds.pop(request_id, None)
        self._unheld.pop(request_id, None)
        effects: tuple[tuple[str, int], ...] = ()
        if hold is not None:
            effects = ((hold.account_id, hold.amount_micro_usd),)
            self._unhold_key(hold)
        return self._submit(ReleaseHold(request_id), effects)

    # ------------------------------------------------------------ settlement

    async def settle(
        self,
        request_id: str,
        receipts: Sequence[market_pb2.SignedReceipt],
        relayed: Sequence[RelayedSegment],
        *,
        account_id: str | None = None,
        lease_id: str | None = None,
    ) -> SettleOutcome:
        """Verify the nodes' receipts against what was relayed, countersign them, charge the
        actual cost (capped at the hold), pay providers and the fee, release the rest.

        Idempotent by ``request_id``: a retry answers the first settlement. The settlement
        is in the intent log before this returns, so a killed process loses nothing.
        A refused receipt raises a BadReceipt subclass and is recorded; the hold stays
        until ``release_hold`` or its expiry, and a hold the writer refused or that
        expired is still remembered, so settling the other segments again charges them
        up to it.

        ``account_id`` is used only when the ledger knows no hold for the request (none
        in this process, none open in the database): a request that held nothing (a
        lease, zero prices) costs nothing, and one whose hold this process has forgotten
        (expired or refused, then pushed out of memory by many others) is charged what
        its receipts cost, up to the balance there is (the writer's charge path; its
        key's spend limit is then not known, and the charge is not counted toward it).
        """
        identifiers.check_id(request_id, "request id")
        known = self._settled.get(request_id)
        if known is not None:
            return known
        if not relayed or len(receipts) != len(relayed):
            raise MalformedReceipt(
                f"request {request_id}: {len(receipts)} receipts for {len(relayed)} relayed "
                "segments; every segment needs its node's receipt"
            )
        hold = self._holds.get(request_id)
        held = hold.amount_micro_usd if hold is not None else 0
        key_id = hold.api_key_id if hold is not None else None
        limit = hold.spend_limit_micro_usd if hold is not None else None
        # Not taken out of _unheld before the receipts pass: a refused receipt raises,
        # and the retry without it must still charge up to this hold (not nothing).
        unheld = self._unheld.get(request_id) if hold is None else None
        forgotten = False  # no hold known at all: charged up to what the receipts cost
        if hold is not None:
            account_id = hold.account_id
        elif unheld is not None:
            # Not held after all: charged up to what it would have held, to the balance
            # there is and to what the key's limit has left (the writer's charge path).
            account_id, held, key_id, limit = (
                unheld.account_id,
                unheld.amount_micro_usd,
                unheld.api_key_id,
                unheld.spend_limit_micro_usd,
            )
        else:
            previous = await self._read(self.store.settlement, request_id)
            if previous is not None:
                return await self._settled_before(previous)
            rows = await self._read(self.store.open_holds, request_id=request_id)
            for row in rows:
                if row["owner"] != self.settings.owner:
                    raise IdConflict(request_id_in_flight(request_id, elsewhere=True))
                account_id, held, key_id = row["account_id"], row["amount"], row["api_key_id"]
            if account_id is None:
                raise UnknownHold(
                    f"request {request_id} has no hold to settle against; place a hold first"
                )
            forgotten = not rows
        signed_out: list[market_pb2.SignedReceipt] = []
        segments: list[SettleSegment] = []
        for signed, segment in zip(receipts, relayed, strict=True):
            try:
                check_receipt(signed, segment)
            except BadReceipt as exc:
                raise await self._refuse(request_id, signed, segment, exc) from None
            out = countersign(signed, self.coordinator)
            signed_out.append(out)
            segments.append(
                SettleSegment(
                    worker_request_id=segment.worker_request_id,
                    segment_index=segment.segment_index,
                    node_id=segment.node_id,
                    model=segment.model,
                    input_tokens=segment.input_tokens,
                    output_tokens=segment.output_tokens,
                    cost_micro_usd=0 if lease_id else segment.cost_micro_usd,
                    receipt=out.receipt,
                    node_public_key=out.node_public_key,
                    node_signature=out.node_signature,
                    coordinator_public_key=out.coordinator_public_key,
                    coordinator_signature=out.coordinator_signature,
                )
            )
        if forgotten:
            # Held nothing (a lease, zero prices: every cost is 0), or its hold is out of
            # memory: what the receipts cost, capped by the writer at the balance there is.
            held = sum(s.cost_micro_usd for s in segments)
            forgotten = held > 0  # (nothing to charge: answered at once, as with a hold)
            if forgotten:
                log.warning(
                    "request %s settled without a known hold: charged up to what its "
                    "receipts cost (%d micro-USD) and to the balance; not counted toward "
                    "its key's spend limit",
                    request_id,
                    held,
                )
        fee_bps = self.settings.platform_fee_bps
        op = Settle(
            request_id=request_id,
            account_id=account_id,
            model=relayed[0].model,
            fee_bps=fee_bps,
            segments=tuple(segments),
            hold_micro_usd=held,
            api_key_id=key_id,
            lease_id=lease_id,
            spend_limit_micro_usd=limit,
            owner=self.settings.owner,
        )
        costs = [s.cost_micro_usd for s in segments]
        charges = money.cap_to_hold(held, costs)
        cost = sum(charges)
        fee = sum(money.split_fee(c, fee_bps)[1] for c in charges)
        record = SettlementRecord(
            request_id=request_id,
            account_id=account_id,
            cost_micro_usd=cost,
            fee_micro_usd=fee,
            provider_micro_usd=cost - fee,
            hold_micro_usd=held,
            capped_micro_usd=sum(costs) - cost,
            input_tokens=sum(s.input_tokens for s in segments),
            output_tokens=sum(s.output_tokens for s in segments),
            created=True,
        )
        assert self._intents is not None
        segment_no = self._intents.append(op)  # (refused: the hold is still known)
        if unheld is not None:
            self._unheld.pop(request_id, None)
        effects = ((account_id, held - cost),) if hold is not None else ()
        future = self._submit(op, effects)
        if hold is not None:
            self._holds.pop(request_id, None)
        outcome = SettleOutcome(record, signed_out, future)
        self._settled[request_id] = outcome
        if len(self._settled) > _SETTLED_REMEMBERED:
            self._settled.popitem(last=False)

        def _durable(f: asyncio.Future[Any]) -> None:
            error = f.exception()
            if not isinstance(error, LedgerUnavailable) and self._intents is not None:
                self._intents.done(segment_no)  # else: stays in the log, replayed on restart
            if error is not None:
                self._settled.pop(request_id, None)
            if key_id is not None and key_id in self._key_spend:
                usage = self._key_spend[key_id]
                usage[1] -= held if hold is not None else 0
                if error is None:
                    usage[0] += f.result().cost_micro_usd

        future.add_done_callback(_durable)
        if unheld is not None or forgotten:  # what the writer charged, not what was promised
            with contextlib.suppress(LedgerUnavailable):  # (then the intent log settles it)
                outcome = SettleOutcome(await future, signed_out, future)
                self._settled[request_id] = outcome
        return outcome

    async def _settled_before(self, row: dict[str, Any]) -> SettleOutcome:
        receipts = await self._read(self.store.receipts, row["request_id"])
        record = SettlementRecord(
            request_id=row["request_id"],
            account_id=row["account_id"],
            cost_micro_usd=row["cost_micro_usd"],
            fee_micro_usd=row["fee_micro_usd"],
            provider_micro_usd=row["cost_micro_usd"] - row["fee_micro_usd"],
            hold_micro_usd=row["hold_micro_usd"],
            capped_micro_usd=row["capped_micro_usd"],
            input_tokens=row["input_tokens"],
            output_tokens=row["output_tokens"],
            created=False,
        )
        done: asyncio.Future[SettlementRecord] = asyncio.get_running_loop().create_future()
        done.set_result(record)
        return SettleOutcome(record, receipts, done)

    async def _refuse(
        self,
        request_id: str,
        signed: market_pb2.SignedReceipt,
        segment: RelayedSegment,
        error: BadReceipt,
    ) -> BadReceipt:
        """Record a refused receipt; tell a replay apart from a plain mismatch."""
        if isinstance(error, MiscountedReceipt):
            usage = market_pb2.UsageReceipt()
            with contextlib.suppress(Exception):
                usage.ParseFromString(signed.receipt)
            if usage.request_id and usage.request_id != segment.worker_request_id:
                owner = await self._read(self.store.receipt_owner, usage.request_id)
                if owner is not None:
                    error = ReplayedReceipt(
                        f"receipt for node request {usage.request_id!r} was already settled with "
                        f"request {owner!r}; a receipt pays once"
                    )
        self._submit(
            RecordRejection(
                request_id=request_id,
                node_id=segment.node_id,
                reason=error.code,
                detail=str(error),
                receipt=bytes(signed.receipt) or None,
            )
        )
        log.warning(
            "receipt refused for request %s from node %s: %s", request_id, segment.node_id, error
        )
        return error

    def reject_receipt(
        self, request_id: str, node_id: str, error: BadReceipt, receipt: bytes | None
    ) -> asyncio.Future[Any]:
        """Record a receipt refused outside a settlement (a late receipt that is forged or
        that no pending settlement awaits). Queued like any write; never waits."""
        future = self._submit(
            RecordRejection(
                request_id=request_id,
                node_id=node_id,
                reason=error.code,
                detail=str(error),
                receipt=receipt or None,
            )
        )
        log.warning("receipt refused for request %s from node %s: %s", request_id, node_id, error)
        return future

    def settled_with(self, request_id: str, signed: market_pb2.SignedReceipt) -> bool:
        """Whether this process settled ``request_id`` (recently) with this very receipt:
        the same bytes and node signature. A late copy of such a receipt is no news."""
        outcome = self._settled.get(request_id)
        return outcome is not None and any(
            same_receipt(known, signed) for known in outcome.receipts
        )

    # ------------------------------------------------------------ recovery and expiry

    async def recover_unsettled(self) -> RecoveryReport:
        """Settle what the intent log holds, release this owner's orphaned holds, expire
        others' overdue holds. Safe to run again: everything it does is idempotent."""
        assert self._intents is not None
        paths = self._intents.previous_segments()
        ops = await self._read(read_segments, paths)
        answers = await asyncio.gather(*(self._submit(op) for op in ops), return_exceptions=True)
        if any(isinstance(a, LedgerUnavailable) for a in answers):
            raise LedgerUnavailable("recovery could not settle the intent log; is the database up?")
        settled = sum(1 for a in answers if isinstance(a, SettlementRecord) and a.created)
        for path in paths:
            path.unlink(missing_ok=True)
        now = now_unix_ms()
        mine = await self._read(self.store.open_holds, owner=self.settings.owner)
        released = [
            self._submit(ReleaseHold(row["request_id"]))
            for row in mine
            if row["request_id"] not in self._holds
        ]
        overdue = await self._read(self.store.open_holds, expired_at_unix_ms=now)
        expired = [
            self._submit(
                ReleaseHold(row["request_id"], expire=True, only_if_expired_at_unix_ms=now)
            )
            for row in overdue
            if row["owner"] != self.settings.owner
        ]
        await asyncio.gather(*released, *expired, return_exceptions=True)
        return RecoveryReport(len(ops), settled, len(released), len(expired))

    async def expire_holds(self, now_ms: int | None = None) -> int:
        """Expire every hold past its expiry (any owner); returns how many."""
        now = now_unix_ms() if now_ms is None else now_ms
        rows = await self._read(self.store.open_holds, expired_at_unix_ms=now)
        futures = []
        for row in rows:
            hold = self._holds.get(row["request_id"])
            effects: tuple[tuple[str, int], ...] = ()
            if hold is not None:  # its request may still be running: it pays on settling
                effects = ((hold.account_id, hold.amount_micro_usd),)
                self._unhold_key(hold)
                self._unhold(hold)
            futures.append(
                self._submit(
                    ReleaseHold(row["request_id"], expire=True, only_if_expired_at_unix_ms=now),
                    effects,
                )
            )
        answers = await asyncio.gather(*futures, return_exceptions=True)
        return sum(1 for a in answers if isinstance(a, ReleaseResult) and a.status == "expired")

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.hold_sweep_interval_s)
            try:
                await self.expire_holds()
                await self.charge_leases()
            except LedgerError as exc:
                log.warning("ledger sweep failed: %s", exc)

    # ------------------------------------------------------------ money in

    async def deposit(
        self, account_id: str, amount_micro_usd: int, *, transfer_id: str | None = None
    ) -> TransferResult:
        """Credit a client account (credits bought). Idempotent by ``transfer_id``."""
        money.check_amount(amount_micro_usd, "deposit")
        identifiers.check_id(account_id, "account id")
        transfer_id = identifiers.check_id(
            transfer_id or identifiers.new_id("deposit"), "transfer id"
        )
        op = PostTransfer(transfer_id, TransferKind.DEPOSIT, DEPOSITS, account_id, amount_micro_usd)
        return await self._submit(op)

    # ------------------------------------------------------------ leases

    async def create_lease(
        self,
        payer: Principal | str,
        node_id: str,
        *,
        gpus: int,
        price_micro_usd_per_gpu_hour: int,
        hours: int,
        lease_id: str | None = None,
        period_s: int = 3600,
    ) -> LeaseRecord:
        """Lease a node for ``hours`` (1..LEASE_HOURS_MAX, else InvalidLeaseHours): the
        whole price is taken up front (durable before this returns), charged per elapsed
        period, the unused part refunded.

        Idempotent by ``lease_id``: asked again for a lease that exists (or is being
        created), it answers that lease, before any balance or limit check, so a retry
        is never refused for the money its first attempt already paid. An id taken by a
        different lease (another account, node or length) is IdConflict."""
        key_id = limit = None
        if isinstance(payer, Principal):
            payer.require_client()
            account_id, key_id, limit = payer.account_id, payer.key_id, payer.spend_limit_micro_usd
        else:
            account_id = identifiers.check_id(payer, "account id")
        identifiers.check_id(node_id, "node id")
        chosen = lease_id is not None  # by the caller: perhaps a retry
        lease_id = identifiers.check_id(lease_id or identifiers.new_id("lease"), "lease id")
        check_lease_hours(hours)
        for name, value in (("gpus", gpus), ("period_s", period_s)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidInput(f"{name} must be a positive integer, got {value!r}")
        if 3600 % period_s:
            raise InvalidInput(f"period_s must divide an hour (3600 s), got {period_s}")
        money.check_amount(price_micro_usd_per_gpu_hour, "price per GPU-hour")
        total = money.lease_total_micro_usd(price_micro_usd_per_gpu_hour, gpus, hours)
        money.check_amount(total, "lease total")
        if chosen:
            retried = await self.existing_lease(lease_id, account_id, node_id, hours)
            if retried is not None:
                return retried
        # A limited key's spend is checked (read once); an unlimited one's is kept in step
        # only if it is cached already.
        usage = (
            await self._spend(key_id)
            if key_id is not None and limit is not None
            else self._key_spend.get(key_id or "")
        )
        await self._load(account_id)
        if self._available(account_id) < total:
            await self._load(account_id, refresh=True)
        if key_id is not None and _over_limit(usage, limit, total):
            usage = await self._spend(key_id, refresh=True)
        # No await from here on: the checks and the reservation are one step.
        if lease_id in self._creating_leases:  # a twin got ahead while we read: a retry
            return await self.create_lease(
                payer,
                node_id,
                gpus=gpus,
                price_micro_usd_per_gpu_hour=price_micro_usd_per_gpu_hour,
                hours=hours,
                lease_id=lease_id,
                period_s=period_s,
            )
        have = self._available(account_id)
        if have < total:
            raise InsufficientBalance(total, have, account_id)
        _check_limit(key_id, limit, usage, total, lease=True)
        op = CreateLease(
            lease_id=lease_id,
            account_id=account_id,
            node_id=node_id,
            gpus=gpus,
            price_micro_usd_per_gpu_hour=price_micro_usd_per_gpu_hour,
            hours=hours,
            period_s=period_s,
            fee_bps=self.settings.platform_fee_bps,
            started_at_unix_ms=now_unix_ms(),
            api_key_id=key_id,
            spend_limit_micro_usd=limit,
        )
        future: asyncio.Future[LeaseRecord] = self._submit(op, ((account_id, -total),))
        self._creating_leases[lease_id] = future
        future.add_done_callback(
            lambda f: (
                (f.cancelled() or f.exception() is not None)
                and self._creating_leases.pop(lease_id, None)
            )
        )
        if len(self._creating_leases) > _LEASES_REMEMBERED:
            self._creating_leases.popitem(last=False)
        if usage is None:
            return await future
        usage[1] += total  # in flight until durable, like a hold
        try:
            record: LeaseRecord = await future
        except LedgerError as exc:
            self._learn_refusal(key_id, exc)
            raise
        finally:
            usage[1] -= total
        if record.started_at_unix_ms == op.started_at_unix_ms:  # made now, not a retry
            usage[0] += total
        return record

    async def existing_lease(
        self, lease_id: str, account_id: str, node_id: str, hours: int
    ) -> LeaseRecord | None:
        """The lease ``lease_id`` if it exists or is being created (None if not, or if its
        creation failed); IdConflict if it is not the lease asked for."""
        creating = self._creating_leases.get(lease_id)
        if creating is not None:
            with contextlib.suppress(LedgerError):
                await asyncio.shield(creating)
        record = await self.lease(lease_id)
        if record is None:
            return None
        if (
            record.account_id != account_id
            or record.node_id != node_id
            or record.ends_at_unix_ms - record.started_at_unix_ms != hours * 3_600_000
        ):
            raise IdConflict(
                f"lease id {lease_id!r} is taken by another lease (account, node or hours "
                "differ); choose another id, or leave it empty"
            )
        return record

    async def end_lease(
        self, lease_id: str, *, node_failed: bool = False, now_ms: int | None = None
    ) -> LeaseRecord:
        """End a lease early (the client stops it, or its node failed); refund the rest."""
        identifiers.check_id(lease_id, "lease id")
        record: LeaseRecord = await self._submit(
            EndLease(lease_id, now_unix_ms() if now_ms is None else now_ms, node_failed)
        )
        usage = self._key_spend.get(record.api_key_id or "")
        if usage is not None:
            usage[0] -= record.refunded_micro_usd  # the refund is no longer spent
        return record

    async def charge_leases(self, now_ms: int | None = None) -> list[LeaseRecord]:
        """Charge every active lease for the periods elapsed (run by the sweeper)."""
        now = now_unix_ms() if now_ms is None else now_ms
        leases = await self._read(self.store.leases, active_only=True)
        return list(
            await asyncio.gather(
                *(self._submit(ChargeLease(lease.lease_id, now)) for lease in leases)
            )
        )

    async def lease(self, lease_id: str) -> LeaseRecord | None:
        return await self._read(self.store.lease, lease_id)

    async def lease_page(
        self,
        account_id: str,
        *,
        limit: int = 50,
        after: tuple[int, str] | None = None,
        active_only: bool = False,
    ) -> list[LeaseRecord]:
        """A page of ``account_id``'s leases, newest first (see ``LedgerStore.lease_page``)."""
        return await self._read(
            self.store.lease_page, account_id, limit=limit, after=after, active_only=active_only
        )

    async def active_leases(self) -> list[LeaseRecord]:
        """Leases in force: the router keeps serverless traffic off their nodes."""
        return await self._read(self.store.leases, active_only=True)

    async def lease_node(self, principal: Principal, lease_id: str) -> str:
        """The node a request under ``lease_id`` must go to, if the caller may use it."""
        lease = await self.lease(lease_id)
        if lease is None or lease.account_id != principal.account_id:
            # Another account's lease is answered as if it did not exist (as AccountService
            # does): whether a lease id is taken is not the caller's to learn.
            raise UnknownLease(f"lease {lease_id!r} does not exist")
        if lease.status != LeaseStatus.ACTIVE.value or now_unix_ms() >= lease.ends_at_unix_ms:
            raise LeaseNotActive(f"lease {lease_id!r} is {lease.status}; create a new lease")
        return lease.node_id

    # ------------------------------------------------------------ reads

    async def balance(self, account_id: str) -> AccountView:
        return await self._read(self.store.account, account_id)

    async def receipts(self, request_id: str) -> list[market_pb2.SignedReceipt]:
        return await self._read(self.store.receipts, request_id)

    async def account_receipts(
        self, account_id: str, *, limit: int = 100, since_unix_ms: int | None = None
    ) -> list[tuple[str, market_pb2.SignedReceipt]]:
        return await self._read(
            self.store.account_receipts, account_id, limit=limit, since_unix_ms=since_unix_ms
        )

    async def usage(
        self,
        account_id: str,
        *,
        since_unix_ms: int | None = None,
        api_key_id: str | None = None,
        model: str | None = None,
    ) -> list[UsageRow]:
        """Requests, tokens and cost of ``account_id`` by day (UTC), key and model."""
        return await self._read(
            self.store.usage,
            account_id,
            since_unix_ms=since_unix_ms,
            api_key_id=api_key_id,
            model=model,
        )

    async def receipt_page(
        self,
        account_id: str,
        *,
        limit: int = 50,
        after: tuple[int, str] | None = None,
        request_id: str | None = None,
        since_unix_ms: int | None = None,
    ) -> list[ReceiptRow]:
        """A page of ``account_id``'s settled receipts, newest first (see
        ``LedgerStore.receipt_page``)."""
        return await self._read(
            self.store.receipt_page,
            account_id,
            limit=limit,
            after=after,
            request_id=request_id,
            since_unix_ms=since_unix_ms,
        )


def _over_limit(usage: list[int] | None, limit: int | None, amount: int) -> bool:
    return usage is not None and limit is not None and usage[0] + usage[1] + amount > limit


def _check_limit(
    key_id: str | None,
    limit: int | None,
    usage: list[int] | None,
    amount: int,
    *,
    lease: bool = False,
) -> None:
    """SpendLimitExceeded if ``amount`` more takes the key past its limit, as this
    process knows the key's spend and holds (the writer checks again)."""
    if key_id is not None and limit is not None and _over_limit(usage, limit, amount):
        assert usage is not None
        raise SpendLimitExceeded.reached(key_id, limit, usage[0] + usage[1], amount, lease=lease)
