"""The node's agent: registers its signed offer with a coordinator and keeps it live.

Life of the agent, forever until stopped::

    register (signed offer) ──ok──▶ heartbeat stream: one NodeLoad every interval,
        ▲                                 each answered by the coordinator
        └──── backoff (doubling, capped) ◀── any failure: refused, stream ended,
                                              no answer within the liveness timeout

Every registration signs a new offer with a strictly higher sequence (Unix
milliseconds, or one more than the last), so a coordinator that restarted, or one that
dropped the node, takes it back. The coordinator pings on the heartbeat stream
(``ping_id``); the agent answers each at once with a ``pong_id`` so the coordinator can
time the round trip itself. The session token is a secret:
it goes only into the heartbeat metadata, never into a log line.

Late usage receipts (from the worker, for calls cut off before their final; see
``node.receipts.ReceiptOutbox``) go out at once on an extra heartbeat with the load,
at most ``LATE_RECEIPTS_PER_HEARTBEAT`` per heartbeat (:mod:`marketplace.control`; the
coordinator refuses a heartbeat with more). The coordinator's answer to that
heartbeat acknowledges them; those not acknowledged when a stream ends go back into the
outbox for the next stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc
import grpc.aio
from mercato.v1 import market_pb2, node_pb2, node_pb2_grpc

from marketplace.aio import cancel_and_wait
from marketplace.control import LATE_RECEIPTS_PER_HEARTBEAT, NODE_ID_METADATA, SESSION_METADATA
from marketplace.dispatch import dispatch_tag
from node.receipts import ReceiptOutbox

logger = logging.getLogger(__name__)

REGISTER_TIMEOUT_S = 10.0
# A heartbeat session that lasted this long resets the backoff before registering again.
HEALTHY_SESSION_S = 10.0

OfferSigner = Callable[[int], market_pb2.SignedOffer]
LoadReader = Callable[[], node_pb2.NodeLoad]
# Open worker calls that carry a dispatch tag (marketplace.dispatch).
DispatchedCounter = Callable[[str], int]


class NodeAgent:
    """Registers with one coordinator and heartbeats; re-registers after any failure."""

    def __init__(
        self,
        coordinator_address: str,
        sign_offer: OfferSigner,
        read_load: LoadReader,
        *,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 5.0,
        late_receipts: ReceiptOutbox | None = None,
        count_dispatched: DispatchedCounter | None = None,
    ) -> None:
        self._address = coordinator_address
        self._sign_offer = sign_offer
        self._read_load = read_load
        self._count_dispatched = count_dispatched
        self._outbox = late_receipts if late_receipts is not None else ReceiptOutbox()
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        # Offers from one node must increase across restarts too: start at the clock.
        self._sequence = time.time_ns() // 1_000_000
        self._task: asyncio.Task[None] | None = None
        self.registered = asyncio.Event()
        self.registrations = 0
        self.node_id: str | None = None
        self.coordinator_public_key: bytes = b""
        self.heartbeat_round_trip_s: float | None = None
        # Set by drain(): every later heartbeat says so, the first one at once.
        self.draining = False
        self._nudge = asyncio.Event()
        # Late receipts sent on the current stream and not yet acknowledged, by heartbeat
        # sequence; and an event set on every acknowledgement (for wait_delivered).
        self._unacknowledged: dict[int, list[market_pb2.SignedReceipt]] = {}
        self._acknowledged = asyncio.Event()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="mercato-node-agent")

    def drain(self) -> None:
        """The node is stopping: tell the coordinator (``draining`` on the next heartbeat,
        sent at once) so that it routes nothing new here."""
        self.draining = True
        self._nudge.set()

    def delivered(self) -> bool:
        """No late receipt is waiting to be sent or acknowledged."""
        return not self._outbox and not self._unacknowledged

    async def wait_delivered(self, timeout_s: float) -> bool:
        """Wait at most ``timeout_s`` until every late receipt queued so far has been
        acknowledged by the coordinator; whether it has."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while not self.delivered():
                    self._acknowledged.clear()
                    await self._acknowledged.wait()
        return self.delivered()

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def run(self) -> None:
        """Register and heartbeat until cancelled."""
        backoff_s = self._backoff_initial_s
        loop = asyncio.get_running_loop()
        async with grpc.aio.insecure_channel(self._address) as channel:
            stub = node_pb2_grpc.NodeControlServiceStub(channel)
            while True:
                session_started_s: float | None = None
                try:
                    response = await self._register(stub)
                    session_started_s = loop.time()
                    await self._heartbeat(stub, response)
                    logger.warning("coordinator %s ended the heartbeat stream", self._address)
                except asyncio.CancelledError:
                    raise
                except grpc.aio.AioRpcError as exc:
                    logger.warning(
                        "coordinator %s: %s (%s); registering again in %.1f s",
                        self._address,
                        exc.code().name,
                        exc.details(),
                        backoff_s,
                    )
                except Exception:
                    logger.exception("agent failure; registering again in %.1f s", backoff_s)
                self.registered.clear()
                if (
                    session_started_s is not None
                    and loop.time() - session_started_s >= HEALTHY_SESSION_S
                ):
                    # The session lived: this is a fresh failure, so retry soon. One that
                    # dies as soon as it is registered (a coordinator refusing its
                    # heartbeats) keeps backing off instead of registering 5 times a second.
                    backoff_s = self._backoff_initial_s
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, self._backoff_max_s)

    async def _register(
        self, stub: node_pb2_grpc.NodeControlServiceStub
    ) -> node_pb2.RegisterResponse:
        # Strictly higher than any offer before, also across restarts: Unix milliseconds,
        # or one more than the last when registrations come faster than the clock ticks.
        self._sequence = max(self._sequence + 1, time.time_ns() // 1_000_000)
        offer = self._sign_offer(self._sequence)
        response: node_pb2.RegisterResponse = await stub.Register(
            node_pb2.RegisterRequest(offer=offer), timeout=REGISTER_TIMEOUT_S
        )
        self.node_id = response.node_id
        self.coordinator_public_key = response.coordinator_public_key
        self.registrations += 1
        self.registered.set()
        logger.info(
            "registered with coordinator %s as %s (heartbeat every %d ms)",
            self._address,
            response.node_id,
            response.heartbeat_interval_ms,
        )
        return response

    async def _heartbeat(
        self,
        stub: node_pb2_grpc.NodeControlServiceStub,
        registration: node_pb2.RegisterResponse,
    ) -> None:
        interval_s = max(registration.heartbeat_interval_ms, 10) / 1000
        liveness_s = max(registration.liveness_timeout_ms / 1000, 2 * interval_s)
        sent_at: dict[int, float] = {}
        # Pings from the coordinator, answered by the request stream at once.
        pongs: asyncio.Queue[int] = asyncio.Queue()
        outbox = self._outbox
        # Late receipts sent on this stream and not yet acknowledged, by heartbeat sequence.
        unacknowledged: dict[int, list[market_pb2.SignedReceipt]] = {}
        self._unacknowledged = unacknowledged
        # Set when this stream is over. grpc keeps consuming requests() after a stream
        # the coordinator ended (cancel() is then a no-op), so it must stop by itself
        # rather than take receipts that the next stream is to send.
        ended = False
        tag = dispatch_tag(registration.session_token)
        count_dispatched = self._count_dispatched

        async def requests() -> AsyncIterator[node_pb2.HeartbeatRequest]:
            loop = asyncio.get_running_loop()
            sequence = 0
            next_beat_s = loop.time()
            while True:
                pong_id = 0
                wait_s = next_beat_s - loop.time()
                if not pongs.empty():
                    pong_id = pongs.get_nowait()
                elif wait_s > 0 and not outbox and not self._nudge.is_set():
                    pong_id = await _pong_or_receipt(pongs, outbox, self._nudge, wait_s)
                if ended:
                    return
                sequence += 1
                if pong_id:
                    # A pong: the coordinator times its ping's round trip from it.
                    yield node_pb2.HeartbeatRequest(sequence=sequence, pong_id=pong_id)
                    continue
                sent_at[sequence] = time.monotonic()
                if len(sent_at) > 64:
                    sent_at.pop(min(sent_at))
                self._nudge.clear()
                beat = node_pb2.HeartbeatRequest(
                    sequence=sequence, load=self._read_load(), draining=self.draining
                )
                if count_dispatched is not None:
                    # Sampled with the load: the calls of that load this coordinator sent.
                    beat.load.coordinator_requests = count_dispatched(tag)
                late = outbox.take(LATE_RECEIPTS_PER_HEARTBEAT)
                if late:
                    beat.late_receipts.extend(late)
                    unacknowledged[sequence] = late
                yield beat
                next_beat_s = loop.time() + interval_s

        call = stub.Heartbeat(
            requests(),
            metadata=(
                (NODE_ID_METADATA, registration.node_id),
                (SESSION_METADATA, registration.session_token),
            ),
        )
        try:
            while True:
                try:
                    async with asyncio.timeout(liveness_s):
                        answer = await call.read()
                except TimeoutError:
                    logger.warning(
                        "coordinator %s answered no heartbeat for %.1f s", self._address, liveness_s
                    )
                    return
                if answer is grpc.aio.EOF:
                    return
                if answer.ping_id:
                    pongs.put_nowait(answer.ping_id)
                    continue
                if unacknowledged.pop(answer.sequence, None) is not None:
                    self._acknowledged.set()
                sent = sent_at.pop(answer.sequence, None)
                if sent is not None:
                    self.heartbeat_round_trip_s = time.monotonic() - sent
        finally:
            ended = True
            call.cancel()
            # Not acknowledged: maybe never delivered; the next stream sends them again.
            outbox.put_back(
                r for sequence in sorted(unacknowledged) for r in unacknowledged[sequence]
            )
            unacknowledged.clear()


async def _pong_or_receipt(
    pongs: asyncio.Queue[int], outbox: ReceiptOutbox, nudge: asyncio.Event, wait_s: float
) -> int:
    """Wait at most ``wait_s`` for a ping to answer (its id), or a late receipt to send or
    a nudge to beat at once (0)."""
    pong = asyncio.ensure_future(pongs.get())
    receipt = asyncio.ensure_future(outbox.wait())
    nudged = asyncio.ensure_future(nudge.wait())
    try:
        await asyncio.wait(
            (pong, receipt, nudged), timeout=wait_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for waiter in (pong, receipt, nudged):
            if not waiter.done():
                waiter.cancel()
    return pong.result() if pong.done() and not pong.cancelled() else 0
