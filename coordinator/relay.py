"""The stream relay: carry one request to a node and its token stream back to the client.

Contract with the API (and billing)::

    routed = router.first(valid_request)  # raises ModelNotFound / NoNodeAvailable
    outcome = RelayOutcome(request_id)
    async for delta_bytes in relay.stream(valid_request, routed, context, outcome):
        yield delta_bytes                  # GenerateResponse wire bytes, deltas only
    final = outcome.final()                # GenerateFinal: request_id, finish_reason,
                                           # input_tokens (first segment's), output_tokens
                                           # (total relayed), node_id/region (last segment),
                                           # segments; cost_micro_usd and receipts: billing

``stream`` yields only deltas and raises a :class:`~coordinator.errors.CoordinatorError`
when no node can finish the request; in every case (success, failure, cancellation) the
``outcome`` it was given holds what happened: ``outcome.segments`` has one
:class:`~coordinator.outcome.SegmentOutcome` per node that served part of the output
(node id, region, worker request id, segment_index, input/output prices in micro-USD
per Mtok, the node's input_tokens, the output tokens the coordinator relayed and counted
itself, the node's finish reason and its ``SignedReceipt`` from WorkerFinal, or None if
it died), and ``outcome.complete`` says whether the last one finished.

Each attempt goes out as a message on the node session's ``Session`` stream
(:mod:`coordinator.worker_session`; a call of its own for a node without it), which saves
grpc-python's per-call setup on every request's time to first token.

Per message the relay does almost nothing. ``WorkerGenerateResponse`` and
``GenerateResponse`` both carry ``TextDelta`` as field 1, so a delta's bytes from the
node are already a valid client message: the stream is read with no deserializer (raw
bytes; the session frame's header is read from the bytes), a delta whose framing checks
out (one field 1, one-byte length, nothing else) is kept and forwarded as is, and only
the rare other message (final, error, a long delta) is parsed. The delivered deltas are kept as bytes; their
token ids come from one parse of their concatenation when needed (protobuf merges a
repeated embedded field: repeated ``token_ids`` concatenate).

Attempts (see docs/design/routing.md): the candidates of the router's first decision
are tried in order; when they run out, the router decides again on a fresh snapshot
with every tried node excluded (:meth:`coordinator.router.Router.again`: same hard
constraints, price caps at most the first decision's prices). Before the first token
of a segment a failing, refusing or silent node (``first_token_timeout_s``) is skipped
for the next, at most ``max_attempts`` per segment. After it, the stream resumes: the
next node gets ``resume_token_ids`` = every output token id relayed so far,
``segment_index`` + 1, a fresh worker request id (``<request id>:<segment index>``) and
``max_tokens`` = what is left, and its deltas follow the earlier ones, so the client
sees neither a gap nor a repeat (at most ``max_resumes`` times; never when the request
set ``allow_fallbacks = false``). Every attempt reports to the routing market: dispatch
started, first token (TTFT), decode (TPOT), and finished as SUCCESS, FAILURE, or
ABANDONED (client cancel or deadline, or the request's own fault).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import grpc.aio
from google.protobuf.message import DecodeError
from mercato.v1 import common_pb2, inference_pb2, market_pb2, node_pb2

from coordinator.errors import (
    CoordinatorError,
    DeadlineExceeded,
    NodeFailed,
    NodeRejected,
)
from coordinator.outcome import RelayOutcome, SegmentOutcome, worker_request_id
from coordinator.registry import NodeRegistry
from coordinator.router import Routed, Router
from coordinator.routing import (
    Constraint,
    DispatchOutcome,
    RoutedCandidate,
    RouteRequest,
    RoutingDecision,
)
from coordinator.settings import CoordinatorSettings
from coordinator.validation import ValidRequest
from coordinator.worker_session import SessionStream, WorkerStreamError, status_code

log = logging.getLogger(__name__)

_NODE_MESSAGE_CHARS_MAX = 300
_DELTA_TAG = 0x0A  # field 1, wire type 2: TextDelta in both response messages
# A node refusing with INVALID_ARGUMENT blames the request itself (a field every node of
# the model would refuse): the client gets the node's answer at once, no other node is
# tried. OUT_OF_RANGE blames the fit: the prompt plus max_tokens is too long for this
# node's context, and a node with a longer one may take it. Neither counts against the
# node's health.
_REQUEST_FAULT = grpc.StatusCode.INVALID_ARGUMENT
_TOO_LONG = grpc.StatusCode.OUT_OF_RANGE
_NO_VERDICT_CODES = frozenset({_REQUEST_FAULT, _TOO_LONG})
# When every node tried refused with one of these, the client gets that code (capacity,
# state); any other mix of failures becomes UNAVAILABLE.
_SHARED_REFUSAL_CODES = frozenset(
    {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION}
)


@dataclass(frozen=True, slots=True)
class AttemptFailure:
    """Why one node did not serve the request."""

    node_id: str
    code: grpc.StatusCode
    message: str

    def __str__(self) -> str:
        return f"node {self.node_id}: {self.code.name}: {self.message}"


class _AttemptFailed(Exception):
    def __init__(self, failure: AttemptFailure) -> None:
        super().__init__(str(failure))
        self.failure = failure


def _keep_error_receipt(segment: SegmentOutcome, signed: market_pb2.SignedReceipt) -> None:
    """Keep the receipt a node sent with its error for the output it streamed before
    failing: billing checks it against the coordinator's own count of that output like a
    final's receipt (a forged or miscounted one is refused there, not here)."""
    segment.receipt = signed
    try:
        segment.input_tokens = market_pb2.UsageReceipt.FromString(signed.receipt).input_tokens
    except DecodeError:
        segment.input_tokens = 0  # unreadable: billing refuses and records it


def _clip(text: str) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= _NODE_MESSAGE_CHARS_MAX else text[:_NODE_MESSAGE_CHARS_MAX] + "..."


class _StallWatch:
    """Ends an attempt whose node goes silent mid-stream.

    Every ``limit_s`` a timer looks at the attempt: if the relay is waiting on the node
    and has started no read since the last look, the node has sent nothing for at least
    ``limit_s``, and the timer cancels the attempt's task, which :meth:`caught` turns
    into a failure of the node. Time spent writing to a slow client is not counted: the
    relay is not reading then. Per message the relay only bumps ``reads`` and sets
    ``waiting`` (no timer per message, unlike ``asyncio.timeout``).
    """

    __slots__ = (
        "_cancelling",
        "_handle",
        "_limit_s",
        "_looked",
        "_loop",
        "_task",
        "fired",
        "reads",
        "waiting",
    )

    def __init__(self, limit_s: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self._loop = asyncio.get_running_loop()
        self._limit_s = limit_s
        self._looked = -1
        self.reads = 0
        self.waiting = False
        self.fired = False
        self._handle = self._loop.call_later(limit_s, self._look)

    def _look(self) -> None:
        if self.waiting and self.reads == self._looked:
            self.fired = True
            self._task.cancel()
            return
        self._looked = self.reads
        self._handle = self._loop.call_later(self._limit_s, self._look)

    def stop(self) -> None:
        self._handle.cancel()

    def caught(self) -> bool:
        """Whether the CancelledError being handled is this watch's (it is then taken
        back from the task); False for anyone else's, such as the client's."""
        return self.fired and self._task.uncancel() <= self._cancelling


class Relay:
    """Runs requests on nodes and streams their output back; one per coordinator."""

    def __init__(
        self, registry: NodeRegistry, router: Router, settings: CoordinatorSettings
    ) -> None:
        self._registry = registry
        self._market = registry.market
        self._router = router
        self._settings = settings

    async def stream(
        self,
        request: ValidRequest,
        routed: Routed,
        context: grpc.aio.ServicerContext,
        outcome: RelayOutcome,
    ) -> AsyncIterator[bytes]:
        """Yield GenerateResponse wire bytes of deltas, filling ``outcome``. Raises a
        CoordinatorError when no node can finish the request."""
        allow_fallbacks = routed.request.preferences.allow_fallbacks
        queue = list(routed.decision.candidates)
        tried: set[str] = set()
        failures: list[AttemptFailure] = []
        attempts_in_segment = 0
        resumes = 0
        while True:
            if not queue:
                decision = self._router.decide(self._next_route_request(routed, outcome, tried))
                if decision.pick is None:
                    raise self._exhausted(request, routed, decision, failures)
                queue = list(decision.candidates)
            candidate = queue.pop(0)
            if candidate.node_id in tried or self._relisted(candidate):
                continue  # a relisted node is routed again on its new terms, if they fit
            tried.add(candidate.node_id)
            attempts_in_segment += 1
            segment = self._segment(request, candidate, outcome)
            try:
                async for chunk in self._attempt(request, candidate, segment, context, outcome):
                    yield chunk
                return
            except _AttemptFailed as exc:
                failure = exc.failure
                failures.append(failure)
                log.info("request %s: %s", request.request_id, failure)
                cause = exc
            if segment in outcome.segments:
                # Mid-stream: resume on another node from the tokens delivered so far.
                if outcome.output_tokens >= request.worker_request.sampling.max_tokens:
                    outcome.finish_reason = common_pb2.FINISH_REASON_LENGTH
                    outcome.derive_input_tokens()
                    return  # every token asked for was delivered; only the final was lost
                resumes += 1
                if not allow_fallbacks or resumes > self._settings.max_resumes:
                    raise NodeFailed(
                        f"node {failure.node_id} failed after streaming part of the output "
                        f"({failure.code.name}: {failure.message}) and "
                        + (
                            "routing.allow_fallbacks is false"
                            if not allow_fallbacks
                            else f"the stream was already resumed {resumes - 1} time(s)"
                        )
                        + "; the output so far is incomplete, retry the request"
                    ) from cause
                queue = []  # route again on a fresh snapshot
                attempts_in_segment = 0
                continue
            if failure.code is _REQUEST_FAULT:
                if outcome.segments:  # a resume refused: the request itself was fine
                    raise NodeFailed(
                        f"node {failure.node_id} refused to resume the stream "
                        f"({failure.message}); the output so far is incomplete, retry the "
                        "request"
                    ) from cause
                raise NodeRejected(
                    f"node {failure.node_id} refused the request: {failure.message}",
                    status_code=failure.code,
                ) from cause
            self._check_deadline(context, failures)
            if not allow_fallbacks or attempts_in_segment >= self._settings.max_attempts:
                raise self._all_failed(request, failures)

    def _relisted(self, candidate: RoutedCandidate) -> bool:
        """Whether the node re-registered with other terms (region, prices, models) since
        the decision that named it: the decision's checks no longer hold, so it is not
        tried as that candidate. (A node gone from the market fails as "left the market".)
        """
        listing = self._market.listing(candidate.node_id)
        decided = candidate.view.listing
        return listing is not None and listing is not decided and listing != decided

    def _next_route_request(
        self, routed: Routed, outcome: RelayOutcome, tried: set[str]
    ) -> RouteRequest:
        return self._router.again(routed, outcome.output_tokens, tried)

    def _segment(
        self, request: ValidRequest, candidate: RoutedCandidate, outcome: RelayOutcome
    ) -> SegmentOutcome:
        """The segment an attempt on ``candidate`` would serve (added to the outcome once
        the node delivers something)."""
        index = len(outcome.segments)
        return SegmentOutcome(
            node_id=candidate.node_id,
            region=candidate.region,
            worker_request_id=worker_request_id(request.request_id, index),
            segment_index=index,
            price_input_micro_usd_per_mtok=candidate.price_input_micro_usd_per_mtok,
            price_output_micro_usd_per_mtok=candidate.price_output_micro_usd_per_mtok,
            resumed_tokens=outcome.output_tokens,
            first_message=len(outcome.delivered),
        )

    def _worker_request(
        self, request: ValidRequest, segment: SegmentOutcome, outcome: RelayOutcome
    ) -> node_pb2.WorkerGenerateRequest:
        """The work for ``segment``: the first node's request, or a resume that continues
        from every output token delivered so far."""
        if segment.segment_index == 0:
            return request.worker_request
        resumed = node_pb2.WorkerGenerateRequest()
        resumed.CopyFrom(request.worker_request)
        resumed.request_id = segment.worker_request_id
        resumed.segment_index = segment.segment_index
        try:
            token_ids = outcome.token_ids()
            resumed.resume_text_chars = outcome.delivered.text_chars()
        except DecodeError as exc:
            raise NodeFailed(
                "an earlier node sent malformed output, so the stream cannot be resumed; "
                "retry the request"
            ) from exc
        resumed.resume_token_ids.extend(token_ids)
        resumed.sampling.max_tokens = request.worker_request.sampling.max_tokens - len(token_ids)
        return resumed

    async def _attempt(
        self,
        request: ValidRequest,
        candidate: RoutedCandidate,
        segment: SegmentOutcome,
        context: grpc.aio.ServicerContext,
        outcome: RelayOutcome,
    ) -> AsyncIterator[bytes]:
        node_id = candidate.node_id
        market = self._market
        link = self._registry.worker(node_id)
        if link is None or node_id not in market:  # gone, silent, or draining
            raise _AttemptFailed(
                AttemptFailure(node_id, grpc.StatusCode.UNAVAILABLE, "left the market")
            )
        worker_request = self._worker_request(request, segment, outcome)
        remaining_s = context.time_remaining()
        market.dispatch_started(node_id)
        verdict = DispatchOutcome.ABANDONED  # unless it ends well or the node fails it
        call: SessionStream | grpc.aio.UnaryStreamCall | None = None
        delivered = outcome.delivered
        ttft_s: float | None = None
        watch: _StallWatch | None = None
        try:
            channel = link.channel
            state = channel.get_state(try_to_connect=True)
            if state is not grpc.ChannelConnectivity.READY:
                await self._connect(node_id, channel, state)
            started_s = time.perf_counter()
            call = await link.open(worker_request, remaining_s)
            read = call.read
            try:
                async with asyncio.timeout(self._settings.first_token_timeout_s):
                    message = await read()  # no task per request, unlike wait_for
            except TimeoutError:
                raise _AttemptFailed(
                    AttemptFailure(
                        node_id,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"no answer within {self._settings.first_token_timeout_s} s",
                    )
                ) from None
            first_s = time.perf_counter()
            eof = grpc.aio.EOF
            # Recorded once the first message is on its way to the client, not before
            # (or, if the attempt ends with its first message, when it ends).
            ttft_s = None if message is eof else first_s - started_s
            append = delivered.messages.append
            while True:
                if message is eof:
                    raise _AttemptFailed(
                        AttemptFailure(
                            node_id,
                            grpc.StatusCode.INTERNAL,
                            "ended its stream without a final message",
                        )
                    )
                size = len(message)
                # Hot path: exactly one field 1 (TextDelta) with a one-byte length.
                if size > 1 and message[0] == _DELTA_TAG and message[1] == size - 2 < 128:
                    if len(delivered) == segment.first_message:
                        outcome.segments.append(segment)
                    append(message)
                    yield message
                else:
                    if self._slow_message(request, candidate, message, segment, outcome):
                        market.record_decode(
                            node_id, segment.output_tokens, time.perf_counter() - first_s
                        )
                        verdict = DispatchOutcome.SUCCESS
                        return
                    yield delivered.messages[-1]
                if watch is None:  # the first message is sent: now the bookkeeping
                    if ttft_s is not None:
                        market.record_first_token(node_id, ttft_s)
                        ttft_s = None
                    # Watched from the first read after it (no read, no stall to catch).
                    watch = _StallWatch(self._settings.stall_timeout_s)
                watch.reads += 1
                watch.waiting = True
                message = await read()
                watch.waiting = False
        except asyncio.CancelledError as exc:
            if watch is None or not watch.caught():
                raise
            failure = AttemptFailure(
                node_id,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"sent nothing for {self._settings.stall_timeout_s} s mid-stream",
            )
            verdict = self._failed(failure, context, outcome, segment)
            raise _AttemptFailed(failure) from exc
        except (grpc.aio.AioRpcError, WorkerStreamError) as exc:
            failure = AttemptFailure(node_id, exc.code(), _clip(exc.details() or ""))
            verdict = self._failed(failure, context, outcome, segment)
            raise _AttemptFailed(failure) from exc
        except grpc.aio.UsageError as exc:
            # The node's channel was closed under the attempt: the node left or moved to
            # a new worker address (re-registered). No verdict on the node.
            self._count_failed(outcome, segment)
            raise _AttemptFailed(
                AttemptFailure(
                    node_id, grpc.StatusCode.UNAVAILABLE, f"its connection was closed ({exc})"
                )
            ) from exc
        except _AttemptFailed as exc:
            verdict = self._failed(exc.failure, context, outcome, segment)
            raise
        finally:
            if watch is not None:
                watch.stop()
            if call is not None and not call.done():
                call.cancel()
            if ttft_s is not None:
                market.record_first_token(node_id, ttft_s)
            market.dispatch_finished(node_id, verdict)

    @staticmethod
    def _verdict(failure: AttemptFailure, context: grpc.aio.ServicerContext) -> DispatchOutcome:
        """Whether a failed attempt counts against the node: not when the request was at
        fault, nor when the client's own deadline ran out."""
        if failure.code in _NO_VERDICT_CODES:
            return DispatchOutcome.ABANDONED
        remaining_s = context.time_remaining()
        if failure.code is grpc.StatusCode.DEADLINE_EXCEEDED and (
            remaining_s is not None and remaining_s <= 0
        ):
            return DispatchOutcome.ABANDONED
        return DispatchOutcome.FAILURE

    def _failed(
        self,
        failure: AttemptFailure,
        context: grpc.aio.ServicerContext,
        outcome: RelayOutcome,
        segment: SegmentOutcome,
    ) -> DispatchOutcome:
        """Count what the failed attempt's segment relayed; the verdict on its node."""
        self._count_failed(outcome, segment)
        return self._verdict(failure, context)

    @staticmethod
    def _count_failed(outcome: RelayOutcome, segment: SegmentOutcome) -> None:
        if segment in outcome.segments:
            outcome.count_unreadable_as_zero(segment)

    async def _connect(
        self, node_id: str, channel: grpc.aio.Channel, state: grpc.ChannelConnectivity
    ) -> None:
        """Wait until the channel, last seen in ``state`` (not READY), is connected,
        failing fast on a refused connection."""

        async def ready() -> None:
            nonlocal state
            while state is not grpc.ChannelConnectivity.READY:
                if state in (
                    grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                    grpc.ChannelConnectivity.SHUTDOWN,
                ):
                    raise _AttemptFailed(
                        AttemptFailure(
                            node_id, grpc.StatusCode.UNAVAILABLE, f"cannot connect ({state.name})"
                        )
                    )
                await channel.wait_for_state_change(state)
                state = channel.get_state(try_to_connect=True)

        try:
            async with asyncio.timeout(self._settings.connect_timeout_s):
                await ready()
        except TimeoutError:
            raise _AttemptFailed(
                AttemptFailure(
                    node_id,
                    grpc.StatusCode.UNAVAILABLE,
                    f"no connection within {self._settings.connect_timeout_s} s",
                )
            ) from None

    def _slow_message(
        self,
        request: ValidRequest,
        node: RoutedCandidate,
        message: bytes,
        segment: SegmentOutcome,
        outcome: RelayOutcome,
    ) -> bool:
        """Handle a message off the hot path: a long delta is re-encoded and appended
        (returns False); a final completes the segment (returns True); an error raises."""
        try:
            response = node_pb2.WorkerGenerateResponse.FromString(message)
        except DecodeError as exc:
            raise _AttemptFailed(
                AttemptFailure(node.node_id, grpc.StatusCode.INTERNAL, "sent an unreadable message")
            ) from exc
        kind = response.WhichOneof("chunk")
        if kind == "delta":
            if len(outcome.delivered) == segment.first_message:
                outcome.segments.append(segment)
            outcome.delivered.messages.append(
                inference_pb2.GenerateResponse(delta=response.delta).SerializeToString()
            )
            return False
        if kind == "final":
            self._final(request, node, response.final, segment, outcome)
            return True
        if kind == "error":
            if response.HasField("error_receipt") and segment in outcome.segments:
                _keep_error_receipt(segment, response.error_receipt)
            code = status_code(response.error.code)
            raise _AttemptFailed(AttemptFailure(node.node_id, code, _clip(response.error.message)))
        raise _AttemptFailed(
            AttemptFailure(node.node_id, grpc.StatusCode.INTERNAL, "sent an empty message")
        )

    def _final(
        self,
        request: ValidRequest,
        node: RoutedCandidate,
        final: node_pb2.WorkerFinal,
        segment: SegmentOutcome,
        outcome: RelayOutcome,
    ) -> None:
        """Complete ``segment`` with the node's final; the outcome's finish reason."""
        if segment not in outcome.segments:
            outcome.segments.append(segment)  # a final with no output at all
        try:
            outcome.count_segment(segment)  # forwarded unparsed, so checked only now
        except DecodeError as exc:
            raise _AttemptFailed(
                AttemptFailure(node.node_id, grpc.StatusCode.INTERNAL, "sent malformed deltas")
            ) from exc
        output_tokens = segment.output_tokens
        allowed = request.worker_request.sampling.max_tokens - segment.resumed_tokens
        if output_tokens > allowed:
            # Past the budget it was sent: the node broke the request. Its final and
            # receipt are refused (the segment is not billed) and it is blamed; the
            # client already has every token it asked for, so nothing is resumed.
            raise _AttemptFailed(
                AttemptFailure(
                    node.node_id,
                    grpc.StatusCode.INTERNAL,
                    f"sent {output_tokens} output tokens where max_tokens was {allowed}",
                )
            )
        if final.output_tokens != output_tokens:
            log.warning(
                "request %s: node %s claims %d output tokens, relayed %d; using %d",
                request.request_id,
                node.node_id,
                final.output_tokens,
                output_tokens,
                output_tokens,
            )
        finish_reason = final.finish_reason
        if finish_reason not in (
            common_pb2.FINISH_REASON_STOP,
            common_pb2.FINISH_REASON_LENGTH,
            common_pb2.FINISH_REASON_CANCELLED,
        ):
            max_tokens = request.worker_request.sampling.max_tokens
            finish_reason = (
                common_pb2.FINISH_REASON_LENGTH
                if outcome.delivered and len(outcome.token_ids()) >= max_tokens
                else common_pb2.FINISH_REASON_STOP
            )
        segment.input_tokens = final.input_tokens
        segment.finish_reason = finish_reason
        segment.receipt = final.receipt if final.HasField("receipt") else None
        segment.completed = True
        outcome.finish_reason = finish_reason
        outcome.derive_input_tokens()

    def _check_deadline(
        self, context: grpc.aio.ServicerContext, failures: list[AttemptFailure]
    ) -> None:
        remaining_s = context.time_remaining()
        if remaining_s is not None and remaining_s <= 0:
            raise DeadlineExceeded(
                f"the deadline passed after {len(failures)} attempt(s); last: {failures[-1]}"
            )

    def _all_failed(
        self, request: ValidRequest, failures: list[AttemptFailure], reason: str = ""
    ) -> CoordinatorError:
        """The client's error once no more nodes may be tried; ``reason`` says why."""
        summary = "; ".join(str(f) for f in failures)
        codes = {f.code for f in failures}
        if codes == {_TOO_LONG}:
            return NodeRejected(
                "the prompt plus max_tokens does not fit the context length of any node "
                f"tried ({summary}); shorten the prompt or lower max_tokens",
                status_code=grpc.StatusCode.INVALID_ARGUMENT,
            )
        if len(codes) == 1 and (code := next(iter(codes))) in _SHARED_REFUSAL_CODES:
            return NodeRejected(
                f"every node tried refused the request ({summary})", status_code=code
            )
        return NodeFailed(
            f'no live node could serve model "{request.model}"'
            + (f": {reason}" if reason else "")
            + f" ({len(failures)} tried: {summary}); retry later"
        )

    def _exhausted(
        self,
        request: ValidRequest,
        routed: Routed,
        decision: RoutingDecision,
        failures: list[AttemptFailure],
    ) -> CoordinatorError:
        """Routing again left no node: the decision's reason names the constraint."""
        reason = decision.empty_reason
        assert reason is not None
        explained = self._router.explain(reason)
        prefs = routed.request.preferences
        ceiling_input, ceiling_output = routed.price_ceiling
        if reason.constraint is Constraint.MAX_PRICE_INPUT:
            client_cap, ceiling = prefs.max_price_input_micro_usd_per_mtok, ceiling_input
        elif reason.constraint is Constraint.MAX_PRICE_OUTPUT:
            client_cap, ceiling = prefs.max_price_output_micro_usd_per_mtok, ceiling_output
        else:
            return self._all_failed(request, failures, explained)
        if client_cap is None or client_cap > ceiling:
            # The cap named is not the client's: later attempts may not cost more per
            # token than the first decision's nodes, whose price the hold was placed on.
            explained += (
                " (after a failure, the price cap is the highest price among the nodes "
                "first chosen for the request, which its hold covers)"
            )
        return self._all_failed(request, failures, explained)
