"""The stream relay: carry one request to a node and its token stream back to the client.

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
:meth:`DeliveredOutput.token_ids`, ``segment_index`` + 1) plugs in at the one marked
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


class DeliveredOutput:
    """Every delta relayed to the client, as GenerateResponse wire bytes, in order."""

    __slots__ = ("messages",)

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def __len__(self) -> int:
        return len(self.messages)

    def merged(self, start: int = 0) -> common_pb2.TextDelta:
        """One TextDelta holding the token ids of messages[start:] (text: the last one's)."""
        joined = b"".join(self.messages[start:])
        return inference_pb2.GenerateResponse.FromString(joined).delta

    def token_ids(self, start: int = 0) -> list[int]:
        """Output token ids delivered so far (what a resumed attempt continues from)."""
        return list(self.merged(start).token_ids)


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
        delivered: DeliveredOutput,
    ) -> AsyncIterator[bytes]:
        """Yield GenerateResponse wire bytes: deltas, then one final. Raises a
        CoordinatorError when no node can finish the request."""
        failures: list[AttemptFailure] = []
        segments: list[inference_pb2.ServedSegment] = []
        for node in candidates:
            segment_start = len(delivered)
            worker_request = request.worker_request
            # Resume after a mid-stream failure plugs in here: copy worker_request with
            # resume_token_ids=delivered.token_ids() and segment_index=len(segments).
            try:
                async for chunk in self._attempt(request, node, worker_request, context, delivered):
                    yield chunk
            except _AttemptFailed as exc:
                failures.append(exc.failure)
                self._registry.record_outcome(node.node_id, ok=False)
                log.info("request %s: %s", request.request_id, exc.failure)
                if len(delivered) > segment_start:
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
            # _attempt ends by yielding the final; nothing more to do.
            return
        raise self._all_failed(request, failures, segments)

    async def _attempt(
        self,
        request: ValidRequest,
        node: NodeView,
        worker_request: node_pb2.WorkerGenerateRequest,
        context: grpc.aio.ServicerContext,
        delivered: DeliveredOutput,
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
        segment_start = len(delivered)
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
                    append(message)
                    yield message
                else:
                    final = self._slow_message(request, node, message, delivered, segment_start)
                    if final is not None:
                        self._measure(node_id, delivered, segment_start, started_s, first_s)
                        yield final
                        return
                    yield delivered.messages[-1]
                message = await read()
        except grpc.aio.AioRpcError as exc:
            raise _AttemptFailed(
                AttemptFailure(node_id, exc.code(), _clip(exc.details() or ""))
            ) from exc
        finally:
            if call is not None and not call.done():
                call.cancel()
            registry.end_request(node_id)

    def _measure(
        self,
        node_id: str,
        delivered: DeliveredOutput,
        segment_start: int,
        started_s: float,
        first_s: float,
    ) -> None:
        """Record a finished attempt: time to first token, time per later output token."""
        if len(delivered) == segment_start:
            self._registry.record_outcome(node_id, ok=True)
            return
        tokens = len(delivered.merged(segment_start).token_ids)
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
        delivered: DeliveredOutput,
        segment_start: int,
    ) -> bytes | None:
        """Handle a message off the hot path: a long delta is re-encoded and appended
        (returns None); a final returns the client's final bytes; an error raises."""
        try:
            response = node_pb2.WorkerGenerateResponse.FromString(message)
        except DecodeError as exc:
            raise _AttemptFailed(
                AttemptFailure(node.node_id, grpc.StatusCode.INTERNAL, "sent an unreadable message")
            ) from exc
        kind = response.WhichOneof("chunk")
        if kind == "delta":
            delivered.messages.append(
                inference_pb2.GenerateResponse(delta=response.delta).SerializeToString()
            )
            return None
        if kind == "final":
            return self._final(request, node, response.final, delivered, segment_start)
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
        delivered: DeliveredOutput,
        segment_start: int,
    ) -> bytes:
        request_id = request.request_id
        model = request.model
        max_tokens = request.worker_request.sampling.max_tokens
        try:
            output_tokens = len(delivered.merged(segment_start).token_ids)
        except DecodeError as exc:  # forwarded unparsed, so checked only now
            raise _AttemptFailed(
                AttemptFailure(node.node_id, grpc.StatusCode.INTERNAL, "sent malformed deltas")
            ) from exc
        if final.output_tokens != output_tokens:
            log.warning(
                "request %s: node %s claims %d output tokens, relayed %d; using %d",
                request_id,
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
            finish_reason = (
                common_pb2.FINISH_REASON_LENGTH
                if output_tokens >= max_tokens
                else common_pb2.FINISH_REASON_STOP
            )
        terms = node.terms_for(model)
        segment = inference_pb2.ServedSegment(
            node_id=node.node_id,
            region=node.region,
            price_input_micro_usd_per_mtok=terms.price_input_micro_usd_per_mtok if terms else 0,
            price_output_micro_usd_per_mtok=terms.price_output_micro_usd_per_mtok if terms else 0,
            input_tokens=final.input_tokens,
            output_tokens=output_tokens,
        )
        return inference_pb2.GenerateResponse(
            final=inference_pb2.GenerateFinal(
                request_id=request_id,
                finish_reason=finish_reason,
                input_tokens=final.input_tokens,
                output_tokens=output_tokens,
                node_id=node.node_id,
                region=node.region,
                segments=[segment],
            )
        ).SerializeToString()

    def _check_deadline(
        self, context: grpc.aio.ServicerContext, failures: list[AttemptFailure]
    ) -> None:
        remaining_s = context.time_remaining()
        if remaining_s is not None and remaining_s <= 0:
            raise DeadlineExceeded(
                f"the deadline passed after {len(failures)} attempt(s); last: {failures[-1]}"
            )

    def _all_failed(
        self,
        request: ValidRequest,
        failures: list[AttemptFailure],
        segments: list[inference_pb2.ServedSegment],
    ) -> CoordinatorError:
        del segments
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
