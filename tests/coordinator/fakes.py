"""Fakes for the coordinator's tests: a scripted NodeWorkerService and a node that
registers and heartbeats like a real one (the real node package is not imported)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import grpc.aio
from mercato.v1 import common_pb2, market_pb2, node_pb2, node_pb2_grpc

from marketplace.identity import Identity
from marketplace.ledger import sign_receipt
from marketplace.worker_session import serve_session

MODEL = "tiny-model"
OFFER_DOMAIN = "mercato.v1.NodeOffer"

# Told, when a Generate is cut off, the request and how many deltas (tokens) it yielded.
CutOffHook = Callable[[node_pb2.WorkerGenerateRequest, int], None]
ReceiptSigner = Callable[[node_pb2.WorkerGenerateRequest, int], market_pb2.SignedReceipt]


def now_unix_ms() -> int:
    return time.time_ns() // 1_000_000


def make_offer(
    identity: Identity,
    *,
    worker_address: str = "127.0.0.1:7800",
    models: tuple[str, ...] = (MODEL,),
    region: str = "eu-west",
    price_input: int = 100_000,
    price_output: int = 200_000,
    context_length: int = 2048,
    max_concurrency: int = 8,
    issued_at_unix_ms: int | None = None,
    sequence: int = 1,
) -> market_pb2.NodeOffer:
    return market_pb2.NodeOffer(
        node_public_key=identity.public_key,
        worker_address=worker_address,
        models=[
            market_pb2.ModelOffer(
                model=name,
                price_input_micro_usd_per_mtok=price_input,
                price_output_micro_usd_per_mtok=price_output,
                context_length=context_length,
            )
            for name in models
        ],
        region=region,
        hardware=market_pb2.Hardware(
            accelerator=market_pb2.ACCELERATOR_KIND_CPU,
            cpu_cores=2,
            memory_bytes=24 * 2**30,
            cpu_model="Test CPU",
        ),
        max_concurrency=max_concurrency,
        price_micro_usd_per_gpu_hour=1_000_000,
        issued_at_unix_ms=now_unix_ms() if issued_at_unix_ms is None else issued_at_unix_ms,
        sequence=sequence,
    )


def sign_offer(identity: Identity, offer: market_pb2.NodeOffer) -> market_pb2.SignedOffer:
    raw = offer.SerializeToString()
    return market_pb2.SignedOffer(offer=raw, signature=identity.sign(OFFER_DOMAIN, raw))


@dataclass
class Behaviour:
    """What the fake worker does with the next Generate calls."""

    # Text of each delta; each delta covers one token id (its index + 1000).
    deltas: list[str] = field(default_factory=lambda: ["Hello", ",", " world"])
    delay_s: float = 0.0
    # Abort before any output with this status (and message).
    refuse: tuple[grpc.StatusCode, str] | None = None
    # Send a StreamError chunk before any output instead of a delta.
    stream_error: tuple[int, str] | None = None
    # Never answer; wait to be cancelled.
    hang: bool = False
    # Abort with UNAVAILABLE after this many deltas.
    fail_after: int | None = None
    # With fail_after: first send a StreamError carrying the node's receipt for the
    # deltas sent (a real node whose engine fails mid-stream); needs final_receipt.
    fail_with_receipt: bool = False
    # Go silent after this many deltas (the call stays open; wait to be cancelled).
    hang_after: int | None = None
    # Send every delta even past sampling.max_tokens (a node that breaks the request).
    ignore_max_tokens: bool = False
    finish_reason: int = common_pb2.FINISH_REASON_STOP
    # Prompt tokens reported (resume_token_ids are added, as a real node counts them).
    input_tokens: int = 7
    # Token id of the first delta; the i-th delta carries first_token_id + i.
    first_token_id: int = 1000
    # Attach a SignedReceipt whose receipt bytes are b"receipt:" + the worker request id.
    receipt: bool = True
    # Awaited when a call arrives, before anything else (e.g. to change the market).
    on_call: Callable[[], Awaitable[None]] | None = None


class FakeWorker(node_pb2_grpc.NodeWorkerServiceServicer):
    """A scripted NodeWorkerService that records what it was asked."""

    def __init__(self, *, sessions: bool = True) -> None:
        self.behaviour = Behaviour()
        # False: an older node that serves only Generate (Session is UNIMPLEMENTED).
        self.sessions = sessions
        self.session_streams = 0
        self.requests: list[node_pb2.WorkerGenerateRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.time_remaining_s: list[float | None] = []
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()
        self.on_cut_off: CutOffHook | None = None
        # Signs the final's receipt as a real node does; None: a placeholder receipt.
        self.final_receipt: ReceiptSigner | None = None

    async def Generate(
        self, request: node_pb2.WorkerGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[node_pb2.WorkerGenerateResponse]:
        self.requests.append(request)
        self.metadata.append({k: v for k, v in context.invocation_metadata() or ()})
        self.time_remaining_s.append(context.time_remaining())
        self.started.set()
        b = self.behaviour
        sent = 0
        try:
            if b.on_call is not None:
                await b.on_call()
            if b.refuse is not None:
                await context.abort(b.refuse[0], b.refuse[1])
            if b.stream_error is not None:
                yield node_pb2.WorkerGenerateResponse(
                    error=common_pb2.StreamError(code=b.stream_error[0], message=b.stream_error[1])
                )
                return
            if b.hang:
                await asyncio.sleep(3600)
            deltas = b.deltas
            finish_reason = b.finish_reason
            max_tokens = request.sampling.max_tokens
            if max_tokens and len(deltas) > max_tokens and not b.ignore_max_tokens:
                deltas, finish_reason = deltas[:max_tokens], common_pb2.FINISH_REASON_LENGTH
            for index, text in enumerate(deltas):
                if b.fail_after is not None and index == b.fail_after:
                    if b.fail_with_receipt and self.final_receipt is not None:
                        failed = node_pb2.WorkerGenerateResponse(
                            error=common_pb2.StreamError(
                                code=common_pb2.ERROR_CODE_UNAVAILABLE, message="engine failed"
                            )
                        )
                        failed.error_receipt.CopyFrom(self.final_receipt(request, sent))
                        yield failed
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "engine died")
                if b.hang_after is not None and index == b.hang_after:
                    await asyncio.sleep(3600)
                if b.delay_s:
                    await asyncio.sleep(b.delay_s)
                sent += 1
                yield node_pb2.WorkerGenerateResponse(
                    delta=common_pb2.TextDelta(text=text, token_ids=[b.first_token_id + index])
                )
            if b.fail_after is not None and b.fail_after >= len(deltas):
                await context.abort(grpc.StatusCode.UNAVAILABLE, "engine died before its final")
            final = node_pb2.WorkerFinal(
                finish_reason=finish_reason,
                input_tokens=b.input_tokens + len(request.resume_token_ids),
                output_tokens=len(deltas),
            )
            if b.receipt and self.final_receipt is not None:
                final.receipt.CopyFrom(self.final_receipt(request, len(deltas)))
            elif b.receipt:
                final.receipt.receipt = b"receipt:" + request.request_id.encode()
            yield node_pb2.WorkerGenerateResponse(final=final)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.set()
            if sent and self.on_cut_off is not None:
                self.on_cut_off(request, sent)
            raise

    async def Session(
        self,
        request_iterator: AsyncIterator[node_pb2.WorkerSessionRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[node_pb2.WorkerSessionResponse]:
        """Each generation as the scripted Generate, served as the real node serves it."""
        if not self.sessions:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        self.session_streams += 1
        async for frame in serve_session(request_iterator, context, self.Generate):
            yield frame


class FakeNode:
    """A worker server plus the agent side: Register, then a heartbeat stream."""

    def __init__(
        self,
        coordinator_address: str,
        *,
        region: str = "eu-west",
        models: tuple[str, ...] = (MODEL,),
        seed: bytes | None = None,
        price_output: int = 200_000,
        price_input: int = 100_000,
        sessions: bool = True,
    ) -> None:
        self.identity = Identity.from_seed(seed) if seed else Identity.generate()
        self.coordinator_address = coordinator_address
        self.region = region
        self.models = models
        self.price_output = price_output
        self.price_input = price_input
        self.worker = FakeWorker(sessions=sessions)
        self.server: grpc.aio.Server | None = None
        self.channel: grpc.aio.Channel | None = None
        self.worker_address = ""
        self.node_id = ""
        self.session_token = ""
        self.sequence = 0
        self.heartbeats_answered = 0
        self.pings_received = 0
        # Whether pings on the heartbeat stream are answered with a pong.
        self.answer_pings = True
        # Receipts of cut-off calls, sent on the next heartbeat (a real node's late
        # receipts); only when send_late_receipts is set.
        self.late_receipts: list[market_pb2.SignedReceipt] = []
        self.send_late_receipts = False
        # Heartbeats say the node is stopping (HeartbeatRequest.draining).
        self.draining = False
        self.worker.on_cut_off = self._cut_off
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._silent = asyncio.Event()

    async def start(self, *, register: bool = True, heartbeat: bool = True) -> FakeNode:
        self.server = grpc.aio.server()
        if self.worker.sessions:
            node_pb2_grpc.add_NodeWorkerServiceServicer_to_server(self.worker, self.server)
        else:
            # An older node: the server does not know the method at all, so gRPC's core
            # refuses the stream before any handler runs (UNIMPLEMENTED).
            generate = grpc.unary_stream_rpc_method_handler(
                self.worker.Generate,
                request_deserializer=node_pb2.WorkerGenerateRequest.FromString,
                response_serializer=node_pb2.WorkerGenerateResponse.SerializeToString,
            )
            self.server.add_generic_rpc_handlers(
                (
                    grpc.method_handlers_generic_handler(
                        "mercato.v1.NodeWorkerService", {"Generate": generate}
                    ),
                )
            )
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.worker_address = f"127.0.0.1:{port}"
        self.channel = grpc.aio.insecure_channel(self.coordinator_address)
        if register:
            await self.register()
        if heartbeat:
            self.start_heartbeats()
        return self

    def signed_offer(self, **overrides: object) -> market_pb2.SignedOffer:
        self.sequence += 1
        offer = make_offer(
            self.identity,
            worker_address=self.worker_address,
            models=self.models,
            region=self.region,
            price_output=self.price_output,
            price_input=self.price_input,
            sequence=self.sequence,
        )
        for name, value in overrides.items():
            setattr(offer, name, value)
        return sign_offer(self.identity, offer)

    async def register(self) -> node_pb2.RegisterResponse:
        assert self.channel is not None
        stub = node_pb2_grpc.NodeControlServiceStub(self.channel)
        response = await stub.Register(
            node_pb2.RegisterRequest(offer=self.signed_offer()), timeout=5
        )
        self.node_id = response.node_id
        self.session_token = response.session_token
        return response

    def start_heartbeats(self, interval_s: float = 0.05) -> None:
        self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeat(interval_s))

    async def _heartbeat(self, interval_s: float) -> None:
        assert self.channel is not None
        stub = node_pb2_grpc.NodeControlServiceStub(self.channel)
        pongs: asyncio.Queue[int] = asyncio.Queue()

        async def beats() -> AsyncIterator[node_pb2.HeartbeatRequest]:
            sequence = 0
            loop = asyncio.get_running_loop()
            next_beat_s = loop.time()
            while True:
                if self._silent.is_set():
                    await asyncio.sleep(3600)  # keep the stream open, send nothing
                pong_id = 0
                wait_s = next_beat_s - loop.time()
                if wait_s > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait_s):
                            pong_id = await pongs.get()
                if pong_id and self.answer_pings:
                    yield node_pb2.HeartbeatRequest(sequence=sequence, pong_id=pong_id)
                elif not pong_id:
                    late, self.late_receipts = self.late_receipts, []
                    yield node_pb2.HeartbeatRequest(
                        sequence=sequence,
                        load=node_pb2.NodeLoad(running_requests=0),
                        late_receipts=late,
                        draining=self.draining,
                    )
                    next_beat_s = loop.time() + interval_s
                else:
                    continue
                sequence += 1

        call = stub.Heartbeat(
            beats(),
            metadata=(
                ("x-mercato-node-id", self.node_id),
                ("x-mercato-session", self.session_token),
            ),
        )
        try:
            with contextlib.suppress(grpc.aio.AioRpcError):
                async for answer in call:
                    if answer.ping_id:
                        self.pings_received += 1
                        pongs.put_nowait(answer.ping_id)
                    else:
                        self.heartbeats_answered += 1
        finally:
            # A task cancelled before the call is set up does not cancel the call itself.
            call.cancel()

    def _cut_off(self, request: node_pb2.WorkerGenerateRequest, sent: int) -> None:
        """Sign a receipt for the deltas a cut-off call yielded, as a real node does."""
        if self.send_late_receipts:
            self.late_receipts.append(self.signed_usage(request, sent))

    def signed_usage(
        self, request: node_pb2.WorkerGenerateRequest, output_tokens: int
    ) -> market_pb2.SignedReceipt:
        """This node's signed receipt for ``output_tokens`` of ``request``."""
        usage = market_pb2.UsageReceipt(
            request_id=request.request_id,
            node_id=self.identity.node_id,
            model=request.model,
            input_tokens=self.worker.behaviour.input_tokens + len(request.resume_token_ids),
            output_tokens=output_tokens,
            price_input_micro_usd_per_mtok=self.price_input,
            price_output_micro_usd_per_mtok=self.price_output,
            segment_index=request.segment_index,
            lease_id=request.lease_id,
        )
        return sign_receipt(usage, self.identity)

    def go_silent(self) -> None:
        """Stop beating but keep the heartbeat stream open."""
        self._silent.set()

    async def stop_heartbeats(self) -> None:
        """End the heartbeat stream (what a killed node's broken connection does)."""
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
            self._heartbeat_task = None

    async def stop(self) -> None:
        await self.stop_heartbeats()
        if self.channel is not None:
            await self.channel.close()
        if self.server is not None:
            await self.server.stop(None)
