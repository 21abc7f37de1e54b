"""The stream relay: carry one request to a node and its token stream back to the client.

Contract with the API (and billing)::

    outcome = RelayOutcome(request_id)
    async for delta_bytes in relay.stream(valid_request, candidates, context, outcome):
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

Per message the relay does almost nothing. ``WorkerGenerateResponse`` and
``GenerateResponse`` both carry ``TextDelta`` as field 1, so a delta's bytes from the
node are already a valid client message: the worker call is opened with no
deserializer (raw bytes), a delta whose framing checks out (one field 1, one-byte
length, nothing else) is kept and forwarded as is, and only the rare other message
(final, error, a long delta) is parsed. The delivered deltas are kept as bytes; their
token ids come from one parse of their concatenation when needed (protobuf merges a
repeated embedded field: repeated ``token_ids`` concatenate).

Attempts: candidates are tried in order. A node that fails or refuses before anything
reached the client is skipped for the next. After the first delta a failure ends the
request for now; resuming on the next node (``resume_token_ids`` =
:meth:`RelayOutcome.token_ids`, ``segment_index`` + 1) plugs in at the one marked
place in :meth:`Relay.stream`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio
from google.protobuf.message import DecodeError
from mercato.v1 import common_pb2, inference_pb2, node_pb2

from coordinator.errors import (
    CoordinatorError,
    DeadlineExceeded,
    NodeFailed,
    NodeRejected,
)
from coordinator.market import NodeView
from coordinator.outcome import RelayOutcome, SegmentOutcome
from coordinator.registry import NodeRegistry
from coordinator.settings import CoordinatorSettings
from coordinator.validation import ValidRequest

log = logging.getLogger(__name__)

WORKER_GENERATE_PATH = "/mercato.v1.NodeWorkerService/Generate"
_NODE_MESSAGE_CHARS_MAX = 300
_DELTA_TAG = 0x0A  # field 1, wire type 2: TextDelta in both response messages
_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
# A node refusing with one of these blames the request itself (e.g. a prompt longer than
# the model's context): the client gets the node's answer at once, no other node is tried.
_REQUEST_FAULT_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE})
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


def _clip(text: str) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= _NODE_MESSAGE_CHARS_MAX else text[:_NODE_MESSAGE_CHARS_MAX] + "..."


class Relay:
    """Runs requests on nodes and streams their output back; one per coordinator."""

    def __init__(self, registry: NodeRegistry, settings: CoordinatorSettings) -> None:
        self._registry = registry
        self._settings = settings

    async def stream(
        self,
        request: ValidRequest,
        candidates: Sequence[NodeView],
        context: grpc.aio.ServicerContext,
        outcome: RelayOutcome,
    ) -> AsyncIterator[bytes]:
        """Yield GenerateResponse wire bytes of deltas, filling ``outcome``. Raises a
        CoordinatorError when no node can finish the request."""
        failures: list[AttemptFailure] = []
        for node in candidates:
            segment = self._segment(request, node, outcome)
            worker_request = request.worker_request
            # Resume after a mid-stream failure plugs in here: copy worker_request with
            # resume_token_ids=outcome.token_ids() and segment_index=len(outcome.segments).
            try:
                async for chunk in self._attempt(
                    request, node, worker_request, segment, context, outcome
                ):
                    yield chunk
            except _AttemptFailed as exc:
                failures.append(exc.failure)
                self._registry.record_outcome(node.node_id, ok=False)
                log.info("request %s: %s", request.request_id, exc.failure)
                if segment in outcome.segments:
                    raise NodeFailed(
                        f"node {node.node_id} failed after streaming part of the output "
                        f"({exc.failure.code.name}: {exc.failure.message}); the output so far "
                        "is incomplete, retry the request"
                    ) from exc
                if exc.failure.code in _REQUEST_FAULT_CODES:
                    raise NodeRejected(
                        f"node {node.node_id} refused the request: {exc.failure.message}",
                        status_code=exc.failure.code,
                    ) from exc
                self._check_deadline(context, failures)
                continue
            return
        raise self._all_failed(request, failures)

    def _segment(
        self, request: ValidRequest, node: NodeView, outcome: RelayOutcome
    ) -> SegmentOutcome:
        """The segment an attempt on ``node`` would serve (added to the outcome once the
        node delivers something)."""
        terms = node.terms_for(request.model)
        index = len(outcome.segments)
        return SegmentOutcome(
            node_id=node.node_id,
            region=node.region,
            worker_request_id=request.request_id if index == 0 else f"{request.request_id}:{index}",
            segment_index=index,
            price_input_micro_usd_per_mtok=terms.price_input_micro_usd_per_mtok if terms else 0,
            price_output_micro_usd_per_mtok=terms.price_output_micro_usd_per_mtok if terms else 0,
            resumed_tokens=0,
            first_message=len(outcome.delivered),
        )

    async def _attempt(
        self,
        request: ValidRequest,
        node: NodeView,
        worker_request: node_pb2.WorkerGenerateRequest,
        segment: SegmentOutcome,
        context: grpc.aio.ServicerContext,
        outcome: RelayOutcome,
    ) -> AsyncIterator[bytes]:
        node_id = node.node_id
        registry = self._registry
        channel = registry.channel(node_id)
        if channel is None:
            raise _AttemptFailed(
                AttemptFailure(node_id, grpc.StatusCode.UNAVAILABLE, "left the market")
            )
        remaining_s = context.time_remaining()
        registry.begin_request(node_id)
        call: grpc.aio.UnaryStreamCall | None = None
        delivered = outcome.delivered
        try:
            await self._connect(node_id, channel)
            started_s = time.perf_counter()
            call = channel.unary_stream(
                WORKER_GENERATE_PATH,
                request_serializer=node_pb2.WorkerGenerateRequest.SerializeToString,
                response_deserializer=None,  # raw bytes: deltas are forwarded unparsed
            )(worker_request, timeout=remaining_s)
            read = call.read
            try:
                message = await asyncio.wait_for(read(), self._settings.first_token_timeout_s)
            except TimeoutError:
                raise _AttemptFailed(
                    AttemptFailure(
                        node_id,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"no answer within {self._settings.first_token_timeout_s} s",
                    )
                ) from None
            first_s = time.perf_counter()
            append = delivered.messages.append
            eof = grpc.aio.EOF
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
                    if self._slow_message(request, node, message, segment, outcome):
                        self._measure(node_id, segment, started_s, first_s)
                        return
                    yield delivered.messages[-1]
                message = await read()
        except grpc.aio.AioRpcError as exc:
            raise _AttemptFailed(
                AttemptFailure(node_id, exc.code(), _clip(exc.details() or ""))
            ) from exc
        except _AttemptFailed:
            if segment in outcome.segments:
                self._count_failed(outcome, segment)
            raise
        finally:
            if call is not None and not call.done():
                call.cancel()
            registry.end_request(node_id)

    def _count_failed(self, outcome: RelayOutcome, segment: SegmentOutcome) -> None:
        try:
            outcome.count_segment(segment)
        except DecodeError:
            segment.output_tokens = 0

    def _measure(
        self, node_id: str, segment: SegmentOutcome, started_s: float, first_s: float
    ) -> None:
        """Record a finished attempt: time to first token, time per later output token."""
        tokens = segment.output_tokens
        if tokens == 0:
            self._registry.record_outcome(node_id, ok=True)
            return
        tpot_s = (time.perf_counter() - first_s) / (tokens - 1) if tokens > 1 else None
        self._registry.record_outcome(node_id, ok=True, ttft_s=first_s - started_s, tpot_s=tpot_s)

    async def _connect(self, node_id: str, channel: grpc.aio.Channel) -> None:
        """Wait until the channel is connected, failing fast on a refused connection."""
        state = channel.get_state(try_to_connect=True)
        if state is grpc.ChannelConnectivity.READY:
            return

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
            await asyncio.wait_for(ready(), self._settings.connect_timeout_s)
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
        node: NodeView,
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
            code = _STATUS_BY_NUMBER.get(response.error.code, grpc.StatusCode.UNKNOWN)
            raise _AttemptFailed(AttemptFailure(node.node_id, code, _clip(response.error.message)))
        raise _AttemptFailed(
            AttemptFailure(node.node_id, grpc.StatusCode.INTERNAL, "sent an empty message")
        )

    def _final(
        self,
        request: ValidRequest,
        node: NodeView,
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
        self, request: ValidRequest, failures: list[AttemptFailure]
    ) -> CoordinatorError:
        summary = "; ".join(str(f) for f in failures)
        codes = {f.code for f in failures}
        if len(codes) == 1 and (code := next(iter(codes))) in _SHARED_REFUSAL_CODES:
            return NodeRejected(
                f"every node tried refused the request ({summary})", status_code=code
            )
        return NodeFailed(
            f'no live node could serve model "{request.model}" ({len(failures)} tried: '
            f"{summary}); retry later"
        )
