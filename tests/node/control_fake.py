"""A tiny in-test NodeControlService: records registrations and heartbeats."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import grpc.aio
from mercato.v1 import market_pb2, node_pb2, node_pb2_grpc

from marketplace.identity import node_id_from_public_key, verify
from node.offer import OFFER_DOMAIN

SESSION_TOKEN = "secret-session-token-123"


class RecordingControl(node_pb2_grpc.NodeControlServiceServicer):
    def __init__(self, heartbeat_interval_ms: int = 30) -> None:
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.offers: list[market_pb2.NodeOffer] = []
        self.heartbeats: list[tuple[dict[str, str], node_pb2.HeartbeatRequest]] = []
        self.heartbeat_seen = asyncio.Event()
        self.end_streams_after: int | None = None  # end each stream after N heartbeats
        # End this many streams at a heartbeat carrying late receipts, without answering
        # it (the receipts are not acknowledged).
        self.drop_late_receipts = 0

    async def Register(
        self, request: node_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> node_pb2.RegisterResponse:
        offer = market_pb2.NodeOffer.FromString(request.offer.offer)
        if not verify(
            offer.node_public_key, OFFER_DOMAIN, request.offer.offer, request.offer.signature
        ):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad signature")
        self.offers.append(offer)
        return node_pb2.RegisterResponse(
            node_id=node_id_from_public_key(offer.node_public_key),
            session_token=SESSION_TOKEN,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
            liveness_timeout_ms=2000,
        )

    async def Heartbeat(
        self,
        request_iterator: AsyncIterator[node_pb2.HeartbeatRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[node_pb2.HeartbeatResponse]:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        count = 0
        async for heartbeat in request_iterator:
            self.heartbeats.append((metadata, heartbeat))
            self.heartbeat_seen.set()
            if heartbeat.late_receipts and self.drop_late_receipts > 0:
                self.drop_late_receipts -= 1
                return
            yield node_pb2.HeartbeatResponse(sequence=heartbeat.sequence)
            count += 1
            if self.end_streams_after is not None and count >= self.end_streams_after:
                return


async def start_control(control: RecordingControl, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    node_pb2_grpc.add_NodeControlServiceServicer_to_server(control, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound
