"""NodeControlService: nodes register their signed offers and keep a heartbeat stream.

The heartbeat stream is the node's presence: while it is open and beating, the node is
live; when it ends, the node is dropped. Every heartbeat is answered with its sequence
so the node can measure the round trip itself.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
import grpc.aio
from mercato.v1 import node_pb2, node_pb2_grpc

from coordinator.errors import (
    CoordinatorError,
    HeartbeatInvalid,
    OfferInvalid,
    SessionInvalid,
    abort_with,
)
from coordinator.registry import NodeRegistry
from coordinator.settings import CoordinatorSettings

log = logging.getLogger(__name__)

NODE_ID_METADATA = "x-mercato-node-id"
SESSION_METADATA = "x-mercato-session"


class NodeControlServicer(node_pb2_grpc.NodeControlServiceServicer):
    """Registration and heartbeats of nodes."""

    def __init__(
        self,
        registry: NodeRegistry,
        settings: CoordinatorSettings,
        coordinator_public_key: bytes,
    ) -> None:
        self._registry = registry
        self._settings = settings
        self._coordinator_public_key = coordinator_public_key

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
    ) -> AsyncIterator[node_pb2.HeartbeatResponse]:
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
                self._registry.record_heartbeat(node_id, session_token, heartbeat.load)
                yield node_pb2.HeartbeatResponse(sequence=heartbeat.sequence)
        except CoordinatorError as exc:
            reason = f"heartbeat refused: {exc}"
            self._registry.end_session(node_id, session_token, reason)
            await abort_with(context, exc)
        except BaseException as exc:
            reason = f"heartbeat stream broke ({type(exc).__name__})"
            raise
        finally:
            self._registry.end_session(node_id, session_token, reason)
