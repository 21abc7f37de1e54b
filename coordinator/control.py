"""NodeControlService: nodes register their signed offers and keep a heartbeat stream.

The heartbeat stream is the node's presence: while it is open and beating, the node is
live; when it ends, the node is dropped. Every heartbeat is answered with its sequence
so the node can measure the round trip itself.

The coordinator measures the round trip too, for routing (RTT): every
``ping_interval_ms`` (the first right away) it sends a HeartbeatResponse with a fresh
``ping_id`` on the stream, and the node answers at once with a HeartbeatRequest whose
``pong_id`` is that id; the time between the two, on the coordinator's clock, goes to
the market (:meth:`NodeRegistry.record_pong`). A pong is not answered. Ping ids are
random 64-bit numbers, so a node cannot answer a ping before it has it (a pong sent
ahead of its ping would fake a round trip near 0 ms). Only the latest few pings are
remembered; an unknown pong id counts only as a sign of life.

A heartbeat may carry late usage receipts (``late_receipts``): the node's signed
receipts for worker calls the coordinator cut off before their final (client cancel,
deadline). Each goes to billing (:meth:`coordinator.billing.Billing.accept_late_receipt`,
which never blocks) before the heartbeat is answered, so the answer acknowledges them.
Without billing they are ignored. A heartbeat with more than
``LATE_RECEIPTS_PER_HEARTBEAT`` of them (what a node's agent sends at most,
:mod:`marketplace.control`) is refused INVALID_ARGUMENT before any is looked at, and
ends the node's session: each receipt costs a signature check on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable

import grpc
import grpc.aio
from mercato.v1 import market_pb2, node_pb2, node_pb2_grpc

from coordinator.errors import (
    CoordinatorError,
    HeartbeatInvalid,
    OfferInvalid,
    SessionInvalid,
    abort_with,
)
from coordinator.registry import NodeRegistry
from coordinator.settings import CoordinatorSettings
from marketplace.aio import cancel_and_wait
from marketplace.control import LATE_RECEIPTS_PER_HEARTBEAT, NODE_ID_METADATA, SESSION_METADATA

log = logging.getLogger(__name__)

# Pings awaiting their pong, per stream; older ones are forgotten.
PINGS_REMEMBERED = 8
# How long a refused heartbeat stream waits for a ping being written before its status.
_ABORT_WAIT_S = 1.0

# Takes one late receipt from the heartbeat stream of a node: (node id, receipt).
LateReceiptSink = Callable[[str, market_pb2.SignedReceipt], None]


class NodeControlServicer(node_pb2_grpc.NodeControlServiceServicer):
    """Registration and heartbeats of nodes."""

    def __init__(
        self,
        registry: NodeRegistry,
        settings: CoordinatorSettings,
        coordinator_public_key: bytes,
        *,
        late_receipts: LateReceiptSink | None = None,
    ) -> None:
        self._registry = registry
        self._settings = settings
        self._coordinator_public_key = coordinator_public_key
        self._late_receipts = late_receipts

    async def Register(
        self, request: node_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.RegisterResponse:
        if not request.HasField("offer"):
            await abort_with(context, OfferInvalid("offer: missing; send the SignedOffer"))
        try:
            registration = self._registry.register(request.offer)
        except CoordinatorError as exc:
            log.info("registration refused from %s: %s", context.peer(), exc)
            await abort_with(context, exc)
        return node_pb2.RegisterResponse(
            node_id=registration.node_id,
            session_token=registration.session_token,
            heartbeat_interval_ms=self._settings.heartbeat_interval_ms,
            liveness_timeout_ms=self._settings.liveness_timeout_ms,
            coordinator_public_key=self._coordinator_public_key,
        )

    async def Heartbeat(
        self,
        request_iterator: AsyncIterator[node_pb2.HeartbeatRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        metadata = {key: value for key, value in context.invocation_metadata() or ()}
        node_id = metadata.get(NODE_ID_METADATA)
        session_token = metadata.get(SESSION_METADATA)
        if not isinstance(node_id, str) or not isinstance(session_token, str):
            await abort_with(
                context,
                SessionInvalid(
                    f"metadata {NODE_ID_METADATA} and {SESSION_METADATA} are required "
                    "(from RegisterResponse)"
                ),
            )
        try:
            self._registry.authenticate(node_id, session_token)
        except SessionInvalid as exc:
            await abort_with(context, exc)
        # Pings and answers are written by two tasks; grpc allows one write at a time.
        write_lock = asyncio.Lock()
        pings: dict[int, float] = {}  # ping id -> perf_counter when sent
        pinger = asyncio.create_task(
            self._ping_forever(context, write_lock, pings), name="mercato-ping"
        )
        reason = "heartbeat stream ended"
        last_sequence = -1
        try:
            async for heartbeat in request_iterator:
                if heartbeat.sequence <= last_sequence:
                    raise HeartbeatInvalid(
                        f"sequence: {heartbeat.sequence} does not increase (last "
                        f"{last_sequence}); number heartbeats 0, 1, 2, ... on each stream"
                    )
                last_sequence = heartbeat.sequence
                if len(heartbeat.late_receipts) > LATE_RECEIPTS_PER_HEARTBEAT:
                    raise HeartbeatInvalid(
                        f"late_receipts: {len(heartbeat.late_receipts)} in one heartbeat, "
                        f"more than {LATE_RECEIPTS_PER_HEARTBEAT}; send at most "
                        f"{LATE_RECEIPTS_PER_HEARTBEAT} per heartbeat (the rest on the next)"
                    )
                if heartbeat.late_receipts:
                    self._take_late_receipts(node_id, heartbeat)
                if heartbeat.pong_id:
                    sent_s = pings.pop(heartbeat.pong_id, None)
                    rtt_s = None if sent_s is None else time.perf_counter() - sent_s
                    self._registry.record_pong(node_id, session_token, rtt_s)
                    continue
                self._registry.record_heartbeat(node_id, session_token, heartbeat.load)
                if heartbeat.draining:
                    self._registry.withdraw(node_id, session_token)
                async with write_lock:
                    await context.write(node_pb2.HeartbeatResponse(sequence=heartbeat.sequence))
        except CoordinatorError as exc:
            reason = f"heartbeat refused: {exc}"
            self._registry.end_session(node_id, session_token, reason)
            # Not while a ping is being written: grpc refuses a status while a write
            # (the stream's first, with the initial metadata) is under way, and the
            # stream then hangs until the node's deadline, the refusal unsaid.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_ABORT_WAIT_S):
                    await write_lock.acquire()  # held to the end: nothing more is written
            await abort_with(context, exc)
        except asyncio.CancelledError:
            # grpc cancels the handler when the node's connection goes away.
            reason = "heartbeat stream closed: the node disconnected, or this coordinator stops"
            raise
        except BaseException as exc:
            reason = f"heartbeat stream broke ({type(exc).__name__}: {exc})"
            raise
        finally:
            await cancel_and_wait(pinger)
            self._registry.end_session(node_id, session_token, reason)

    def _take_late_receipts(self, node_id: str, heartbeat: node_pb2.HeartbeatRequest) -> None:
        if self._late_receipts is None:
            log.debug(
                "node %s sent %d late receipt(s); ignored (billing is off)",
                node_id,
                len(heartbeat.late_receipts),
            )
            return
        for signed in heartbeat.late_receipts:
            self._late_receipts(node_id, signed)

    async def _ping_forever(
        self,
        context: grpc.aio.ServicerContext,
        write_lock: asyncio.Lock,
        pings: dict[int, float],
    ) -> None:
        """Send a ping now and every ping_interval_ms; remember when each left."""
        interval_s = self._settings.ping_interval_ms / 1000
        while True:
            ping_id = _new_ping_id(pings)
            try:
                async with write_lock:
                    pings[ping_id] = time.perf_counter()
                    await context.write(node_pb2.HeartbeatResponse(ping_id=ping_id))
            except Exception as exc:  # the stream is closing; the reader side ends it
                log.debug("ping not sent: %s", type(exc).__name__)
                return
            while len(pings) > PINGS_REMEMBERED:
                del pings[next(iter(pings))]
            await asyncio.sleep(interval_s)


def _new_ping_id(pings: dict[int, float]) -> int:
    """A random ping id (uint64): none a node could guess, never 0 (no ping), and none of
    the pings awaiting their pong."""
    while True:
        ping_id = secrets.randbits(64)
        if ping_id and ping_id not in pings:
            return ping_id
