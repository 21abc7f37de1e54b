"""Billing on the request path: API keys, holds, settlement and leases, on the ledger.

One :class:`Billing` per coordinator owns the :class:`~marketplace.ledger.Ledger`
(started with the server; ``recover_unsettled`` runs first, so a settlement a crash left
in the intent log is committed before any new request). For one Generate::

    principal = await billing.authenticate(context)        # "authorization: Bearer <key>"
    valid = await billing.constrain(principal, valid)      # lease -> its node only;
                                                           # serverless -> no leased node
    admission = await billing.admit(principal, valid, candidates)   # the hold
    ... relay ...
    charge = await billing.settle(admission, segments)      # cost + countersigned receipts

**The hold** (the request's maximum cost, reserved before routing) is
``ceil((input_max * price_in + max_tokens * price_out) / 1e6)`` micro-USD with

* ``input_max`` = the UTF-8 bytes of the text (a byte-level BPE never yields more tokens
  than bytes) + ``template_overhead_tokens_max`` (BOS, a default system prompt, the
  generation prompt) + ``message_overhead_tokens_max`` per chat message (role markers),
  plus each role name's bytes. No tokenizer is needed on the coordinator.
* ``price_in``, ``price_out`` = the highest input and output prices among the eligible
  candidates (each is within the request's price caps, so the caps bound the hold too).

A request under a dedicated lease holds nothing and settles at zero per-token cost: the
lease pays (its price was taken into escrow when it was created).

**Settlement.** Every segment with a node receipt is billed from the coordinator's own
counts: output tokens it relayed, and the node's input-token count accepted only up to
the provable bound above (plus the tokens a resumed segment was given), at the matched
offer's prices. The ledger checks each receipt against these numbers. A receipt that
is forged, miscounted or replayed is refused and recorded by the ledger, and that
segment is charged *nothing* (client not charged, provider not paid): a provider is
paid only against its own valid signature, and the client is never charged for a number
nobody signed. No billable segment: the hold is released. Charges never exceed the hold
(``money.cap_to_hold``).

**Cut-off segments and late receipts.** A segment the coordinator stopped reading before
the node's final (the client cancelled, its deadline passed, or the request failed) has
no receipt from the relay; a live node signs one anyway for what it wrote to the stream
and sends it on its heartbeat stream (:meth:`Billing.accept_late_receipt`, called by
``coordinator.control``). Such a request settles in the background
(:meth:`Billing.settle_in_background`) after waiting at most ``late_receipt_wait_s`` for
the late receipts of its cut-off segments whose nodes are still in the market (a dead
node sends nothing), then once with what it has. A late receipt is checked like any
other, except that its output count may exceed what the coordinator relayed (tokens in
flight when the call was cut) up to what the node was asked for, never fall short of
it; the client pays the coordinator's count. A segment still without a receipt is not
billed. A request that completes settles at once (its final is not delayed); it uses the
late receipts that arrived by then. A late receipt that is forged, sent by another node,
or awaited by no pending settlement (settled or released already, unknown) is refused and
recorded; a late copy of a receipt already billed is ignored. Pending settlements live
only in memory: a coordinator that crashes while waiting releases the hold on restart,
like any hold its crash orphaned.

The request path never waits for a disk flush: holds are admitted in memory, the
settlement is in the ledger's intent log (one ``write``) before the final goes out, and
the commit happens in the ledger's group-commit writer.

**Leases.** A refresh task re-reads the active leases every
``lease_refresh_interval_s``: their nodes take no serverless traffic, and a leased node
this coordinator saw live and then saw leave the market (and stay away for
``lease_node_grace_s``) ends its leases with a refund (``node_failed=True``). The ledger's sweeper charges elapsed lease periods.

Errors: a ledger refusal becomes :class:`BillingRefused`, a CoordinatorError carrying
the ledger error's gRPC status and message (UNAUTHENTICATED, PERMISSION_DENIED,
RESOURCE_EXHAUSTED, FAILED_PRECONDITION "insufficient balance: need X, have Y",
NOT_FOUND for an unknown lease). API keys are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
import grpc.aio
from mercato.v1 import inference_pb2, market_pb2, node_pb2

from coordinator.errors import CoordinatorError, NoNodeAvailable
from coordinator.outcome import client_request_id
from coordinator.registry import NodeRegistry
from coordinator.settings import CoordinatorSettings, FaultPoint
from coordinator.validation import ValidRequest
from marketplace.aio import cancel_and_wait
from marketplace.identity import Identity
from marketplace.ledger import (
    BadReceipt,
    ForgedReceipt,
    IdConflict,
    Ledger,
    LedgerError,
    LedgerSettings,
    LedgerUnavailable,
    Principal,
    RecoveryReport,
    RelayedSegment,
    Unauthenticated,
    UnmatchedReceipt,
    check_node_signature,
    check_receipt,
    max_cost_micro_usd,
    parse_receipt,
    same_receipt,
)
from marketplace.ledger.applier import request_id_in_flight

__all__ = [
    "Admission",
    "Billing",
    "BillingRefused",
    "Charge",
    "LateReceipt",
    "ServedPart",
    "api_key_from_metadata",
    "crash_if",
    "hold_prices",
    "input_tokens_max",
    "ledger_settings",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

AUTHORIZATION_METADATA = "authorization"
FAULT_EXIT_CODE = 70  # what a process killed by a FaultPoint exits with


class BillingRefused(CoordinatorError):
    """A ledger refusal, with the ledger error's gRPC status and message."""

    def __init__(self, error: LedgerError) -> None:
        super().__init__(str(error))
        self.status_code = error.grpc_status
        self.error = error


class ServedPart(Protocol):
    """What billing reads of one node's part of a request (the relay's SegmentOutcome)."""

    node_id: str
    worker_request_id: str
    segment_index: int
    price_input_micro_usd_per_mtok: int
    price_output_micro_usd_per_mtok: int
    resumed_tokens: int
    input_tokens: int
    output_tokens: int
    receipt: market_pb2.SignedReceipt | None
    completed: bool  # the node's final arrived (False: it died, or the stream was cut)


class _HasTerms(Protocol):
    def terms_for(self, model: str) -> Any: ...


@dataclass(frozen=True)
class LateReceipt:
    """A node's receipt for a segment cut off before its final, from its heartbeat
    stream: the node's signature checked, sent by the node it names."""

    signed: market_pb2.SignedReceipt
    usage: market_pb2.UsageReceipt


@dataclass
class Admission:
    """A request admitted by billing: who pays, its hold, and its lease."""

    request_id: str
    model: str
    principal: Principal
    hold_micro_usd: int  # 0: nothing held (a lease request, or free prices)
    input_tokens_max: int  # the bound of the hold rule
    lease_id: str = ""
    finished: bool = False  # settled or released
    max_tokens: int = 0  # sampling.max_tokens of the request (0: unknown, no bound)
    # Late receipts received while the request awaits settlement, by (worker request id,
    # node id): a node cannot crowd out the receipt of the node that served the segment.
    late_receipts: dict[tuple[str, str], LateReceipt] = field(default_factory=dict, repr=False)
    # Set when a late receipt arrives (or billing closes): wakes a waiting settlement.
    late_arrival: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    # True once settlement has begun: late receipts are refused from then on.
    settling: bool = False
    # Node signatures of the receipts settlement has in hand (late copies are no news).
    known_receipts: set[bytes] = field(default_factory=set, repr=False)
    # The hold's write; the request is stopped if the writer refuses it (stop_if_refused).
    hold_written: asyncio.Future[Any] | None = field(default=None, repr=False)
    hold_refused: LedgerError | None = None
    relaying: bool = False  # the handler is relaying tokens (a refusal may cut it off)


@dataclass(frozen=True)
class Charge:
    """What the client pays for a request, with the countersigned receipts."""

    cost_micro_usd: int
    receipts: list[market_pb2.SignedReceipt] = field(default_factory=list)
    refused_segments: int = 0  # receipts refused (forged, miscounted, replayed): unbilled
    unreceipted_segments: int = 0  # segments whose node sent no receipt: unbilled
    late_segments: int = 0  # segments billed on a late receipt (cut off before the final)


# ---------------------------------------------------------------- pure rules


def ledger_settings(settings: CoordinatorSettings, identity: Identity) -> LedgerSettings:
    """The ledger's settings for this coordinator: the environment's (MERCATO_DATABASE_URL,
    MERCATO_LEDGER_*) where set, else SQLite at ``home/mercato.db`` (the database the
    operator CLI opens by default), the intent log under ``home/coordinator`` and the
    coordinator's node id as the hold owner (what crash recovery releases)."""
    from_env = LedgerSettings()
    defaults: dict[str, Any] = {
        "database_url": f"sqlite:///{settings.home / 'mercato.db'}",
        "intent_log_dir": settings.home / "coordinator" / "ledger-intents",
        "owner": identity.node_id[-64:],
    }
    return LedgerSettings(
        **{k: v for k, v in defaults.items() if k not in from_env.model_fields_set}
    )


def api_key_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The key of an ``authorization: Bearer <key>`` metadata entry; Unauthenticated if
    there is none or it is not a bearer key. The key itself is never put in a message."""
    for name, value in metadata or ():
        if name != AUTHORIZATION_METADATA or not isinstance(value, str):
            continue
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        raise Unauthenticated(
            "authorization metadata must be 'Bearer <API key>'; issue a key with "
            "'mercato keys issue'"
        )
    raise Unauthenticated(
        "missing API key: send gRPC metadata 'authorization: Bearer <API key>' (issue one "
        "with 'mercato keys issue'; 'mercato up' stores one in <home>/client.key)"
    )


def input_tokens_max(
    worker_request: node_pb2.WorkerGenerateRequest, settings: CoordinatorSettings
) -> int:
    """An upper bound on the prompt tokens of ``worker_request``, without a tokenizer."""
    bound = settings.template_overhead_tokens_max
    if worker_request.WhichOneof("input") == "prompt":
        return bound + len(worker_request.prompt.encode("utf-8"))
    for message in worker_request.chat.messages:
        bound += settings.message_overhead_tokens_max
        bound += len(message.role.encode("utf-8")) + len(message.content.encode("utf-8"))
    return bound


def hold_prices(candidates: Sequence[_HasTerms], model: str) -> tuple[int, int]:
    """The highest input and output prices among the candidates that may serve ``model``."""
    price_in = price_out = 0
    for candidate in candidates:
        terms = candidate.terms_for(model)
        if terms is not None:
            price_in = max(price_in, terms.price_input_micro_usd_per_mtok)
            price_out = max(price_out, terms.price_output_micro_usd_per_mtok)
    return price_in, price_out


def crash_if(settings: CoordinatorSettings, point: FaultPoint) -> None:
    """Test hook: end the process at once (no cleanup, like a kill) at ``point``."""
    if settings.fault is point and point is not FaultPoint.NONE:
        log.error("fault injection: exiting at %s", point.value)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(FAULT_EXIT_CODE)


# ---------------------------------------------------------------- the service


class Billing:
    """The coordinator's ledger and the billing steps of every request."""

    def __init__(
        self,
        settings: CoordinatorSettings,
        identity: Identity,
        registry: NodeRegistry,
        *,
        ledger: Ledger | None = None,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self.ledger = ledger or Ledger(ledger_settings(settings, identity), coordinator=identity)
        self._leased: dict[str, str] = {}  # node id -> lease id, active leases
        self._leased_nodes: frozenset[str] = frozenset()  # its keys, for routing
        self._seen_live: set[str] = set()  # leased nodes seen in the market
        self._missing_since_s: dict[str, float] = {}  # seen leased nodes now gone
        self._refresher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        # Admitted requests not yet settled or released, by request id: where late
        # receipts go.
        self._pending: dict[str, Admission] = {}
        self._closing = False
        self.recovery: RecoveryReport | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> RecoveryReport | None:
        """Open the ledger and settle what a crash left; start the lease refresher."""
        self.recovery = await self.ledger.start(recover=True)
        if self.recovery is not None:
            log.info(
                "ledger recovery: %d settlement(s) replayed from the intent log (%d newly "
                "settled), %d orphaned hold(s) released, %d expired",
                self.recovery.replayed,
                self.recovery.settled,
                self.recovery.released,
                self.recovery.expired,
            )
        await self.refresh_leases()
        self._refresher = asyncio.get_running_loop().create_task(
            self._refresh_forever(), name="billing-leases"
        )
        return self.recovery

    async def wait_settled(self, timeout_s: float) -> None:
        """Wait at most ``timeout_s`` for the settlements running in the background (those
        of cut-off requests, waiting for their late receipts) to finish."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout_s)

    async def close(self) -> None:
        """Stop the refresher, let pending settlements finish (without waiting for more
        late receipts), close the ledger."""
        self._closing = True
        for admission in self._pending.values():
            admission.late_arrival.set()
        if self._refresher is not None:
            await cancel_and_wait(self._refresher)
            self._refresher = None
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.ledger.close()

    # ------------------------------------------------------------ keys

    async def authenticate(self, context: grpc.aio.ServicerContext) -> Principal:
        """The caller's principal from its metadata; BillingRefused otherwise."""
        try:
            return await self.ledger.authenticate(
                api_key_from_metadata(context.invocation_metadata())
            )
        except LedgerError as exc:
            raise BillingRefused(exc) from None

    # ------------------------------------------------------------ leases and routing

    async def constrain(self, principal: Principal, request: ValidRequest) -> ValidRequest:
        """``request`` with billing's routing constraints: a lease request may go only
        to its lease's node; a serverless one never to a node under an active lease."""
        lease_id = request.worker_request.lease_id
        if not lease_id:
            if not self._leased_nodes:
                return request
            return dataclasses.replace(request, leased_nodes=self._leased_nodes)
        try:
            principal.require_client()
            node_id = await self.ledger.lease_node(principal, lease_id)
        except LedgerError as exc:
            raise BillingRefused(exc) from None
        if node_id not in self._registry:
            raise NoNodeAvailable(
                f"the node of lease {lease_id!r} ({node_id}) is not live now; retry later "
                "or end the lease (its unused part is refunded)"
            )
        routing = inference_pb2.RoutingPreferences()
        routing.CopyFrom(request.routing)
        del routing.only_nodes[:]
        routing.only_nodes.append(node_id)
        if node_id not in self._leased:  # a lease not read yet: mark its node now
            self._leased[node_id] = lease_id
            self._leased_nodes = frozenset(self._leased)
        return dataclasses.replace(request, routing=routing)

    def is_leased(self, node_id: str) -> bool:
        """Whether an active lease holds ``node_id`` (as of the last refresh)."""
        return node_id in self._leased

    async def refresh_leases(self) -> None:
        """Re-read the active leases; end those whose node left the market.

        A node counts once this coordinator has seen it, live or draining (registered
        but out of the market: it is leaving); one never seen (after a restart, before
        it registers again) keeps its lease. A node gone for ``lease_node_grace_s``
        loses it."""
        try:
            leases = await self.ledger.active_leases()
        except LedgerError as exc:
            log.warning("cannot read the active leases: %s", exc)
            return
        live = {node.node_id for node in self._registry.snapshot().nodes}
        now_s = time.monotonic()
        leased: dict[str, str] = {}
        for lease in leases:
            node_id = lease.node_id
            if node_id in live:
                self._seen_live.add(node_id)
                self._missing_since_s.pop(node_id, None)
                leased[node_id] = lease.lease_id
                continue
            if node_id in self._registry:
                # Draining (leased just as it began to leave, say): seen, and leaving.
                self._seen_live.add(node_id)
            if node_id in self._seen_live and (
                now_s - self._missing_since_s.setdefault(node_id, now_s)
                >= self._settings.lease_node_grace_s
            ):
                log.warning("node %s left the market: ending lease %s", node_id, lease.lease_id)
                try:
                    await self.ledger.end_lease(lease.lease_id, node_failed=True)
                except LedgerError as exc:
                    log.warning("cannot end lease %s: %s", lease.lease_id, exc)
                continue
            leased[node_id] = lease.lease_id
        self._seen_live &= leased.keys()
        for node_id in self._missing_since_s.keys() - leased.keys():
            del self._missing_since_s[node_id]
        self._leased = leased
        self._leased_nodes = frozenset(leased)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.lease_refresh_interval_s)
            try:
                await self.refresh_leases()
            except Exception:  # keep refreshing; a bug here must not stop billing
                log.exception("lease refresh failed")

    # ------------------------------------------------------------ holds

    async def admit(
        self, principal: Principal, request: ValidRequest, candidates: Sequence[_HasTerms]
    ) -> Admission:
        """Hold the request's maximum cost on the caller's account (see the module doc)."""
        worker = request.worker_request
        bound = input_tokens_max(worker, self._settings)
        admission = Admission(
            request_id=request.request_id,
            model=request.model,
            principal=principal,
            hold_micro_usd=0,
            input_tokens_max=bound,
            lease_id=worker.lease_id,
            max_tokens=worker.sampling.max_tokens,
        )
        request_id = request.request_id
        if request_id in self._pending:
            raise BillingRefused(IdConflict(request_id_in_flight(request_id)))
        self._pending[request_id] = admission  # taken now: a concurrent twin is refused
        try:
            principal.require_client()
            amount = 0
            if not worker.lease_id:
                price_in, price_out = hold_prices(candidates, request.model)
                amount = max_cost_micro_usd(bound, worker.sampling.max_tokens, price_in, price_out)
            if amount > 0:
                hold = await self.ledger.place_hold(
                    request_id, principal, amount, fresh_id=request.id_assigned
                )
                admission.hold_micro_usd = amount
                admission.hold_written = hold.durable
            elif not request.id_assigned:  # nothing held, but the id is still used once
                await self.ledger.check_request_id(request_id)
        except BaseException as exc:
            if self._pending.get(request_id) is admission:
                del self._pending[request_id]
            if isinstance(exc, LedgerError):
                raise BillingRefused(exc) from None
            raise
        return admission

    def stop_if_refused(self, admission: Admission, task: asyncio.Task[Any]) -> None:
        """Cancel ``task`` (the request's handler) if the ledger's writer refuses the
        hold while the request is relaying: the hold was admitted from this coordinator's
        memory, and the database knew better (another coordinator spent the balance, the
        key's limit, a used id). The handler tells the client ``admission.hold_refused``;
        what was delivered is charged up to that hold and to the balance there is. A
        database that is down (LedgerUnavailable) stops nothing: the settlement waits in
        the intent log."""
        written = admission.hold_written
        if written is None:
            return

        def check(future: asyncio.Future[Any]) -> None:
            if future.cancelled():
                return
            error = future.exception()
            if not isinstance(error, LedgerError) or isinstance(error, LedgerUnavailable):
                return
            admission.hold_refused = error
            log.warning("request %s stopped: its hold was refused: %s", admission.request_id, error)
            if admission.relaying and not task.done():
                task.cancel()

        written.add_done_callback(check)

    def release(self, admission: Admission) -> None:
        """Release the hold (nothing was delivered); idempotent."""
        if admission.finished:
            return
        self._stop_taking_late_receipts(admission, ())
        if self._pending.get(admission.request_id) is admission:
            del self._pending[admission.request_id]
        self._release_hold(admission)

    def _release_hold(self, admission: Admission) -> None:
        admission.finished = True
        if admission.hold_micro_usd:
            self.ledger.release_hold(admission.request_id)

    # ------------------------------------------------------------ settlement

    def relayed_segments(
        self, admission: Admission, parts: Sequence[ServedPart]
    ) -> tuple[list[market_pb2.SignedReceipt], list[RelayedSegment], int]:
        """Receipts and the coordinator's own counts of every segment that has a receipt
        (its node's final's, or a late one for a cut-off segment); and how many segments
        had none."""
        receipts: list[market_pb2.SignedReceipt] = []
        relayed: list[RelayedSegment] = []
        missing = 0
        for part in parts:
            late = None if part.completed else admission.late_receipts.get(_late_key(part))
            if late is not None:
                signed, claimed_input = late.signed, late.usage.input_tokens
                ceiling: int | None = _output_ceiling(admission, part)
            elif _has_receipt(part):
                assert part.receipt is not None
                signed, claimed_input, ceiling = part.receipt, part.input_tokens, None
            else:
                missing += 1
                continue
            bound = admission.input_tokens_max + part.resumed_tokens
            receipts.append(signed)
            relayed.append(
                RelayedSegment(
                    worker_request_id=part.worker_request_id,
                    node_id=part.node_id,
                    model=admission.model,
                    input_tokens=min(claimed_input, bound),
                    output_tokens=part.output_tokens,
                    price_input_micro_usd_per_mtok=part.price_input_micro_usd_per_mtok,
                    price_output_micro_usd_per_mtok=part.price_output_micro_usd_per_mtok,
                    segment_index=part.segment_index,
                    lease_id=admission.lease_id,
                    output_tokens_max=ceiling,
                )
            )
        return receipts, relayed, missing

    async def settle(
        self,
        admission: Admission,
        parts: Sequence[ServedPart],
        *,
        late_wait_s: float = 0.0,
    ) -> Charge:
        """Settle what was delivered (see the module doc), after waiting at most
        ``late_wait_s`` for the late receipts of cut-off segments whose nodes are live;
        release the hold if nothing is billable. Never waits for the disk. Raises
        BillingRefused only when the ledger itself is unavailable (the hold then
        expires)."""
        if admission.finished:
            raise AssertionError(f"request {admission.request_id} was settled already")
        try:
            if late_wait_s > 0:
                await self._await_late_receipts(admission, parts, late_wait_s)
            self._stop_taking_late_receipts(admission, parts)
            return await self._settle(admission, parts)
        finally:
            if self._pending.get(admission.request_id) is admission:
                del self._pending[admission.request_id]

    async def _settle(self, admission: Admission, parts: Sequence[ServedPart]) -> Charge:
        receipts, relayed, missing = self.relayed_segments(admission, parts)
        refused = 0
        while relayed:
            try:
                outcome = await self.ledger.settle(
                    admission.request_id,
                    receipts,
                    relayed,
                    account_id=admission.principal.account_id,
                    lease_id=admission.lease_id or None,
                )
            except BadReceipt:
                bad = _first_bad(receipts, relayed)
                if bad is None:  # refused for the set, not one receipt (count mismatch)
                    break
                refused += 1
                del receipts[bad], relayed[bad]
                continue
            except LedgerError as exc:
                log.error("request %s could not be settled: %s", admission.request_id, exc)
                raise BillingRefused(exc) from None
            admission.finished = True
            return Charge(
                cost_micro_usd=outcome.record.cost_micro_usd,
                receipts=outcome.receipts,
                refused_segments=refused,
                unreceipted_segments=missing,
                late_segments=sum(1 for segment in relayed if segment.cut_off),
            )
        self._release_hold(admission)
        return Charge(0, [], refused_segments=refused, unreceipted_segments=missing)

    def settle_to_the_end(
        self, admission: Admission, parts: Sequence[ServedPart]
    ) -> asyncio.Task[Charge]:
        """``settle`` in a task of its own that runs to its end even if its caller is
        cancelled (await it through ``asyncio.shield``): a client hanging up, or the
        shutdown's cut, while the settlement of a finished stream is under way must not
        leave the request unsettled, free to the client and unpaid to its nodes."""
        task = self._keep(self.settle(admission, parts))
        task.add_done_callback(_log_unawaited_failure)
        return task

    def settle_in_background(self, admission: Admission, parts: Sequence[ServedPart]) -> None:
        """Settle (or release) a failed or cancelled request without blocking its handler,
        once the late receipts of its cut-off segments are in (``late_receipt_wait_s``)."""
        if admission.finished:
            return
        parts = list(parts)

        async def run() -> None:
            try:
                await self.settle(admission, parts, late_wait_s=self._settings.late_receipt_wait_s)
            except CoordinatorError as exc:
                log.error("request %s: settlement failed: %s", admission.request_id, exc)

        self._keep(run())

    def _keep(self, settling: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """A task of ``settling`` that ``close`` waits for."""
        task = asyncio.get_running_loop().create_task(settling, name="billing-settle")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ------------------------------------------------------------ late receipts

    def accept_late_receipt(self, node_id: str, signed: market_pb2.SignedReceipt) -> None:
        """Take a late receipt from the heartbeat stream of ``node_id`` for the request
        awaiting it (checked against the relayed counts at settlement). One that is
        forged, sent by another node than it names, or awaited by no pending settlement
        is refused and recorded; a copy of a receipt already in hand is ignored. Never
        raises and never waits: it runs in the heartbeat handler."""
        request_id = ""
        try:
            usage = parse_receipt(signed)
            # The client's request id, to record a refusal under it.
            request_id = client_request_id(usage.request_id, usage.segment_index)
            check_node_signature(signed)
            if usage.node_id != node_id:
                raise ForgedReceipt(
                    f"late receipt names node {usage.node_id} but came on the heartbeat "
                    f"stream of node {node_id}"
                )
            self._take_late_receipt(request_id, LateReceipt(signed, usage))
        except BadReceipt as exc:
            self._reject_late(request_id, node_id, signed, exc)
        except Exception:  # a bug here must not end the node's heartbeat stream
            log.exception("late receipt from node %s could not be handled", node_id)

    def _take_late_receipt(self, request_id: str, late: LateReceipt) -> None:
        worker_request_id = late.usage.request_id
        admission = self._pending.get(request_id)
        if admission is not None and late.signed.node_signature in admission.known_receipts:
            return  # a late copy of the final's receipt
        if admission is None or admission.settling:
            if self.ledger.settled_with(request_id, late.signed):
                return  # a late copy of a receipt billed already
            raise UnmatchedReceipt(
                f"late receipt for node request {worker_request_id!r} arrived after its "
                f"request {request_id!r} was settled or released (or the request is unknown)"
            )
        key = (worker_request_id, late.usage.node_id)
        known = admission.late_receipts.get(key)
        if known is not None:
            if same_receipt(known.signed, late.signed):
                return  # sent again (the node had no answer to the heartbeat carrying it)
            raise UnmatchedReceipt(
                f"a second, different late receipt for node request {worker_request_id!r}"
            )
        admission.late_receipts[key] = late
        admission.late_arrival.set()

    async def _await_late_receipts(
        self, admission: Admission, parts: Sequence[ServedPart], wait_s: float
    ) -> None:
        """Wait until every cut-off segment whose node is still live has its late receipt,
        at most ``wait_s``, and not once billing is closing."""
        loop = asyncio.get_running_loop()
        deadline_s = loop.time() + wait_s
        while not self._closing:
            awaited = [p.node_id for p in parts if self._awaits_late_receipt(admission, p)]
            if not awaited:
                return
            remaining_s = deadline_s - loop.time()
            if remaining_s <= 0:
                log.info(
                    "request %s: no late receipt from node(s) %s within %.1f s; settling "
                    "without (those segments are not billed)",
                    admission.request_id,
                    ", ".join(awaited),
                    wait_s,
                )
                return
            admission.late_arrival.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining_s):
                    await admission.late_arrival.wait()

    def _awaits_late_receipt(self, admission: Admission, part: ServedPart) -> bool:
        """A segment cut off before its final, that relayed output, from a node still in
        the market (a dead node sends nothing), whose late receipt has not come."""
        return (
            not part.completed
            and not _has_receipt(part)
            and part.output_tokens > 0
            and _late_key(part) not in admission.late_receipts
            and part.node_id in self._registry
        )

    def _stop_taking_late_receipts(self, admission: Admission, parts: Sequence[ServedPart]) -> None:
        """From now on late receipts for ``admission`` are refused (unless they copy one
        in hand); those it got for no cut-off segment of ``parts`` are refused now."""
        admission.settling = True
        admission.known_receipts.update(
            part.receipt.node_signature for part in parts if part.receipt is not None
        )
        cut_off = {_late_key(part) for part in parts if not part.completed}
        for key, late in list(admission.late_receipts.items()):
            if key in cut_off:
                continue
            del admission.late_receipts[key]
            worker_request_id = key[0]
            if late.signed.node_signature in admission.known_receipts:
                continue
            self._reject_late(
                admission.request_id,
                late.usage.node_id,
                late.signed,
                UnmatchedReceipt(
                    f"late receipt for node request {worker_request_id!r} matches no "
                    f"segment of request {admission.request_id!r} cut off before its final"
                ),
            )

    def _reject_late(
        self, request_id: str, node_id: str, signed: market_pb2.SignedReceipt, error: BadReceipt
    ) -> None:
        try:
            self.ledger.reject_receipt(request_id, node_id, error, bytes(signed.receipt))
        except LedgerError as exc:
            log.warning("late receipt refused (%s) but not recorded: %s", error, exc)


def _first_bad(
    receipts: Sequence[market_pb2.SignedReceipt], relayed: Sequence[RelayedSegment]
) -> int | None:
    for index, (signed, segment) in enumerate(zip(receipts, relayed, strict=True)):
        try:
            check_receipt(signed, segment)
        except BadReceipt:
            return index
    return None


def _has_receipt(part: ServedPart) -> bool:
    return part.receipt is not None and bool(part.receipt.receipt)


def _late_key(part: ServedPart) -> tuple[str, str]:
    return part.worker_request_id, part.node_id


def _output_ceiling(admission: Admission, part: ServedPart) -> int:
    """Most output tokens a cut-off segment's node may claim: what it was asked for (the
    request's max_tokens less the resumed tokens), never below what was relayed."""
    if not admission.max_tokens:
        return 2**32 - 1  # unknown: a uint32 count is the only bound
    return max(admission.max_tokens - part.resumed_tokens, part.output_tokens)


def _log_unawaited_failure(task: asyncio.Task[Charge]) -> None:
    """Take the failure of a settlement whose caller may have been cancelled (so that
    nobody awaits it); a refusal was logged by ``_settle`` already, anything else is a
    bug and logged here."""
    if task.cancelled():
        return
    error = task.exception()
    if error is not None and not isinstance(error, CoordinatorError):
        log.error("request settlement failed", exc_info=error)
