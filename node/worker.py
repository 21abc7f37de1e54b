"""The node's NodeWorkerService: generation requests from coordinators, streamed back.

One request: check it (status INVALID_ARGUMENT / NOT_FOUND before any token), render the
prompt and append ``resume_token_ids``, check the context length, stream the engine's
deltas as ``TextDelta`` messages, end with ``WorkerFinal`` carrying the token counts and a
receipt signed by the node. A client that cancels, or whose deadline passes, cancels
the handler task; the engine stream is closed at once and the engine request aborted.
Such a call ends without a final, so when output had gone out the node signs the
receipt anyway, for the prompt and the output tokens it wrote to the stream, and hands
it to ``on_late_receipt`` (the agent sends it on the heartbeat stream): the coordinator
bills what it relayed against it (see docs/design/ledger.md).

The handler only awaits the engine's stream; nothing in it blocks the loop. A task per
request reads the engine's stream while the handler writes (:func:`coalesced`): when the
writes keep up, every engine step becomes one message, so time to first token and
inter-token latency are the engine's; when they fall behind (the node's loop is busy,
or the peer's flow-control window is full), the deltas that arrived during a write go
out as one ``TextDelta`` (texts and token ids concatenated). Fewer, larger messages
under pressure is what keeps the per-message cost of gRPC, here and in the
coordinator's relay, from capping throughput.

``Session`` carries many such generations over one long-lived stream, each named by a
``stream_id`` (what a coordinator uses: a request then costs a message on an open
stream, not a new call). :func:`marketplace.worker_session.serve_session` runs each
generation as a task with the same generator as ``Generate``: an abort becomes a
``WorkerSessionEnd`` for that generation, a cancel message cancels its task as a
cancelled call would, and the stream ending cancels every generation still open (each
signs its late receipt as above). Generations count against ``max_concurrency`` and
under the stream's dispatch tag like calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

import grpc
import grpc.aio
from mercato.v1 import common_pb2, market_pb2, node_pb2, node_pb2_grpc

from marketplace.control import NODE_ID_METADATA
from marketplace.dispatch import DISPATCH_METADATA
from marketplace.identity import Identity
from marketplace.worker_session import serve_session
from node import resume
from node.engine.base import Delta, Engine, FinishReason, GenerationRequest
from node.errors import CapacityExhausted, NodeError, RequestInvalid, ShuttingDown
from node.receipts import sign_receipt
from node.validation import check_context, check_request

logger = logging.getLogger(__name__)

_FINISH_REASONS = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
}
_ERROR_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: common_pb2.ERROR_CODE_INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE: common_pb2.ERROR_CODE_OUT_OF_RANGE,
    grpc.StatusCode.NOT_FOUND: common_pb2.ERROR_CODE_NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED: common_pb2.ERROR_CODE_RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE: common_pb2.ERROR_CODE_UNAVAILABLE,
    grpc.StatusCode.INTERNAL: common_pb2.ERROR_CODE_INTERNAL,
}

# Takes the signed receipt of a call cut off after output went out; must not block.
LateReceiptSink = Callable[[market_pb2.SignedReceipt], None]


def _metadata_value(context: grpc.aio.ServicerContext, name: str) -> str | bytes | None:
    """The call's first metadata value named ``name``, if it has one."""
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value
    return None


def _dispatch_tag_of(context: grpc.aio.ServicerContext) -> str | None:
    """The call's dispatch tag (``x-mercato-dispatch``), if a coordinator set one."""
    value = _metadata_value(context, DISPATCH_METADATA)
    return value[:64] if isinstance(value, str) else None


def _expected_node_of(context: grpc.aio.ServicerContext) -> str | None:
    """The node id the caller means to reach (``x-mercato-node-id``, set by a
    coordinator: the node whose offer named this worker's address), if it said."""
    value = _metadata_value(context, NODE_ID_METADATA)
    return value if isinstance(value, str) or value is None else repr(value)


class NodeWorker(node_pb2_grpc.NodeWorkerServiceServicer):
    """Serves Generate for one engine, signing a receipt for every finished request."""

    def __init__(
        self,
        engine: Engine,
        identity: Identity,
        *,
        price_input_micro_usd_per_mtok: int,
        price_output_micro_usd_per_mtok: int,
        max_concurrency: int,
        on_late_receipt: LateReceiptSink | None = None,
    ) -> None:
        self._engine = engine
        self._identity = identity
        self._node_id = identity.node_id
        self._price_input = price_input_micro_usd_per_mtok
        self._price_output = price_output_micro_usd_per_mtok
        self._max_concurrency = max_concurrency
        self._on_late_receipt = on_late_receipt
        self._in_flight = 0
        self._in_flight_by_tag: dict[str, int] = {}
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        """Generate calls being served now."""
        return self._in_flight

    @property
    def at_capacity(self) -> bool:
        """As many generations run as ``max_concurrency`` allows."""
        return self._in_flight >= self._max_concurrency

    def drain(self) -> None:
        """Refuse every new request from now on (UNAVAILABLE): the node is stopping."""
        self._draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait at most ``timeout_s`` until no generation is open; whether none is. A
        generation counts until its cleanup is done: a cut-off one has handed its late
        receipt over by then."""
        if self._in_flight:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._idle.wait()
        return not self._in_flight

    def in_flight_tagged(self, tag: str) -> int:
        """Generate calls being served now that carry dispatch tag ``tag``
        (:mod:`marketplace.dispatch`): the ones a coordinator session sent."""
        return self._in_flight_by_tag.get(tag, 0)

    async def Generate(
        self,
        request: node_pb2.WorkerGenerateRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[node_pb2.WorkerGenerateResponse]:
        await self._check_node(context)
        error = self._refusal()
        if error is not None:
            await context.abort(error.status_code, str(error))
        tag = _dispatch_tag_of(context)
        self._enter(tag)
        try:
            async for response in self._generate(request, context):
                yield response
        finally:
            self._leave(tag)

    async def Session(
        self,
        request_iterator: AsyncIterator[node_pb2.WorkerSessionRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[node_pb2.WorkerSessionResponse]:
        """Many generations over one stream (see the proto): each as one Generate call."""
        await self._check_node(context)  # before the stream is accepted
        tag = _dispatch_tag_of(context)

        def admit() -> tuple[grpc.StatusCode, str] | None:
            error = self._refusal()
            if error is not None:
                return error.status_code, str(error)
            self._enter(tag)
            return None

        async for frame in serve_session(
            request_iterator, context, self._generate, admit=admit, release=lambda: self._leave(tag)
        ):
            yield frame

    async def _check_node(self, context: grpc.aio.ServicerContext) -> None:
        """Refuse (PERMISSION_DENIED) a call meant for another node. A coordinator names
        the node whose offer it dials (``x-mercato-node-id``); when that is not this
        node, another node's offer names this worker's address, and serving the call
        would do that node's requests under this node's receipts, which the coordinator
        refuses (they name another node than the one it relayed to): unpaid work. A
        call without the metadata (a direct caller, an older coordinator) is served."""
        expected = _expected_node_of(context)
        if expected is not None and expected != self._node_id:
            logger.warning(
                "refused a call from %s for node %s: that node's offer names this worker's "
                "address (this is node %s)",
                context.peer(),
                expected[:80],
                self._node_id,
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this worker serves node {self._node_id}, not node {expected[:80]} that "
                f"the call is for: node {expected[:80]}'s offer names this worker's "
                "address; each node must advertise its own worker's address "
                "(--advertise-address)",
            )

    def _refusal(self) -> NodeError | None:
        """Why a new request is refused now, if it is."""
        if self._draining:
            return ShuttingDown("this node is shutting down; retry on another node")
        if self.at_capacity:
            return CapacityExhausted(
                f"this node already runs {self._max_concurrency} requests (its "
                "max_concurrency); retry on another node or later"
            )
        return None

    def _enter(self, tag: str | None) -> None:
        self._in_flight += 1
        self._idle.clear()
        if tag is not None:
            by_tag = self._in_flight_by_tag
            by_tag[tag] = by_tag.get(tag, 0) + 1

    def _leave(self, tag: str | None) -> None:
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()
        if tag is not None:
            by_tag = self._in_flight_by_tag
            left = by_tag[tag] - 1
            if left:
                by_tag[tag] = left
            else:
                del by_tag[tag]

    def _engine_stream(
        self, request: node_pb2.WorkerGenerateRequest, job: GenerationRequest
    ) -> AsyncIterator[Delta]:
        """The engine's deltas for ``job``; for a resumed request, with the text of the
        resumed tokens the client lacks first (:mod:`node.resume`)."""
        engine = self._engine
        resumed = request.resume_token_ids
        if not resumed:
            return coalesced(engine.generate(job))
        prompt = job.prompt_token_ids or ()  # the rendered prompt, resumed ids last
        pending = (
            resume.pending_text(
                engine, prompt[: len(prompt) - len(resumed)], resumed, request.resume_text_chars
            )
            if request.HasField("resume_text_chars")
            else ""
        )
        if resume.ends_generation(engine, resumed):
            return resume.finished(pending)
        stream = coalesced(engine.generate(job))
        if not pending:  # the client has all the resumed text: no seam to watch
            return stream
        return resume.after_resume(stream, pending, job.stop)

    async def _generate(
        self,
        request: node_pb2.WorkerGenerateRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[node_pb2.WorkerGenerateResponse]:
        engine = self._engine
        started_at_unix_ms = int(time.time() * 1000)
        try:
            sampling = check_request(request, engine.model_name, engine.vocab_size)
            if request.WhichOneof("input") == "chat":
                prompt_ids = engine.render_chat(
                    [(m.role, m.content) for m in request.chat.messages]
                )
            else:
                prompt_ids = engine.render_prompt(request.prompt)
            prompt_ids.extend(request.resume_token_ids)
            if not prompt_ids:
                raise RequestInvalid("prompt: renders to zero tokens")
            check_context(len(prompt_ids), sampling.max_tokens, engine.context_length)
        except NodeError as exc:
            await context.abort(exc.status_code, str(exc))
        job = GenerationRequest(
            request_id=request.request_id,
            prompt_token_ids=prompt_ids,
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop=sampling.stop,
        )
        engine_stream = self._engine_stream(request, job)
        output_tokens = 0
        finish_reason = FinishReason.STOP
        response_cls = node_pb2.WorkerGenerateResponse
        delta_cls = common_pb2.TextDelta
        try:
            async with aclosing(engine_stream) as stream:
                async for delta in stream:
                    token_ids = delta.token_ids
                    if token_ids or delta.text:
                        # Counted before the write: a delta cut off mid-write counts too,
                        # so the node's count is never below what the coordinator got.
                        output_tokens += len(token_ids)
                        yield response_cls(delta=delta_cls(text=delta.text, token_ids=token_ids))
                    if delta.finish_reason is not None:
                        finish_reason = delta.finish_reason
        except (asyncio.CancelledError, GeneratorExit):
            # Cut off (client cancel, deadline): no final will carry the receipt.
            if output_tokens:
                self._late_receipt(
                    self._receipt(request, len(prompt_ids), output_tokens, started_at_unix_ms)
                )
            raise
        except NodeError as exc:
            code = exc.status_code
            logger.warning("request %s failed: %s", request.request_id, exc)
            failed = response_cls(
                error=common_pb2.StreamError(
                    code=_ERROR_CODES.get(code, common_pb2.ERROR_CODE_INTERNAL), message=str(exc)
                )
            )
            if output_tokens:
                # The output streamed before the failure is paid for: the coordinator
                # resumes the rest elsewhere and bills this part on this receipt.
                failed.error_receipt.CopyFrom(
                    self._receipt(request, len(prompt_ids), output_tokens, started_at_unix_ms)
                )
            yield failed
            await context.abort(code, str(exc))
        receipt = self._receipt(request, len(prompt_ids), output_tokens, started_at_unix_ms)
        try:
            yield response_cls(
                final=node_pb2.WorkerFinal(
                    finish_reason=_FINISH_REASONS[finish_reason],
                    input_tokens=len(prompt_ids),
                    output_tokens=output_tokens,
                    receipt=receipt,
                )
            )
        except (asyncio.CancelledError, GeneratorExit):
            # Cut off while the final was being written: the coordinator may not have it
            # (a copy of a receipt it has is ignored there).
            if output_tokens:
                self._late_receipt(receipt)
            raise

    def _receipt(
        self,
        request: node_pb2.WorkerGenerateRequest,
        input_tokens: int,
        output_tokens: int,
        started_at_unix_ms: int,
    ) -> market_pb2.SignedReceipt:
        """The node's signed receipt for ``request``, finished now."""
        usage = market_pb2.UsageReceipt(
            request_id=request.request_id,
            node_id=self._node_id,
            model=self._engine.model_name,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            price_input_micro_usd_per_mtok=self._price_input,
            price_output_micro_usd_per_mtok=self._price_output,
            started_at_unix_ms=started_at_unix_ms,
            finished_at_unix_ms=int(time.time() * 1000),
            segment_index=request.segment_index,
            lease_id=request.lease_id,
        )
        return sign_receipt(self._identity, usage)

    def _late_receipt(self, signed: market_pb2.SignedReceipt) -> None:
        """Hand the receipt of a cut-off call to the agent; never raises (the handler is
        being cancelled, and its cleanup must go on)."""
        if self._on_late_receipt is None:
            logger.debug("no late receipt sink: a cut-off call's receipt is not sent")
            return
        try:
            self._on_late_receipt(signed)
        except Exception:
            logger.exception("late receipt could not be queued")


async def coalesced(deltas: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    """The engine's ``deltas``, merged while the consumer is busy with the previous one.

    A task reads ``deltas`` into a buffer; each time the consumer asks, it gets all that
    arrived since it last asked: the delta itself when there is one (nothing changes at
    low load), else one Delta with the texts and token ids concatenated in order and the
    last finish reason. An exception from ``deltas`` reaches the consumer after the
    deltas before it. Closing this iterator (or cancelling its consumer) cancels the
    reader, which closes ``deltas`` (the engine aborts the request) before returning.
    """
    pending: list[Delta] = []
    arrived = asyncio.Event()
    ended = False
    failure: Exception | None = None

    async def read() -> None:
        nonlocal ended, failure
        try:
            async with aclosing(deltas) as stream:
                async for delta in stream:
                    pending.append(delta)
                    arrived.set()
        except Exception as exc:  # handed to the consumer, in order
            failure = exc
        finally:
            ended = True
            arrived.set()

    reader = asyncio.create_task(read())
    try:
        while True:
            while not pending and not ended:
                await arrived.wait()
                arrived.clear()
            if pending:
                batch, pending = pending, []
                yield batch[0] if len(batch) == 1 else _merge(batch)
            elif failure is not None:
                raise failure
            else:
                return
    finally:
        if not reader.done():
            reader.cancel()
            await asyncio.wait((reader,))


def _merge(batch: list[Delta]) -> Delta:
    token_ids: list[int] = []
    finish_reason = None
    for delta in batch:
        token_ids.extend(delta.token_ids)
        if delta.finish_reason is not None:
            finish_reason = delta.finish_reason
    return Delta("".join(d.text for d in batch), token_ids, finish_reason)
