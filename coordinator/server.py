"""The coordinator process: one grpc.aio server on one port.

Serves InferenceService (clients), NodeControlService (nodes), grpc.health.v1 and server
reflection. :func:`run_coordinator` runs until SIGINT/SIGTERM; :class:`Coordinator` is
the same thing as an object for tests and embedding (start, address, stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from mercato.v1 import inference_pb2, node_pb2, node_pb2_grpc

from coordinator.api import InferenceServicer, generic_handler
from coordinator.control import NodeControlServicer
from coordinator.registry import NodeRegistry
from coordinator.settings import CoordinatorSettings
from marketplace.identity import Identity

log = logging.getLogger(__name__)

READY_PREFIX = "MERCATO_COORDINATOR_READY"
SERVICE_NAMES = (
    inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    node_pb2.DESCRIPTOR.services_by_name["NodeControlService"].full_name,
)


class Coordinator:
    """A running coordinator: registry, servicers and the gRPC server."""

    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        self.identity = Identity.load_or_create(settings.identity_path)
        self.registry = NodeRegistry(settings)
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self.port = 0

    @property
    def address(self) -> str:
        """host:port the server listens on (after start)."""
        return f"{self._bind_host()}:{self.port}"

    async def start(self) -> None:
        server = grpc.aio.server(
            options=(
                ("grpc.so_reuseport", 0),
                # A chat of max_prompt_chars characters is at most 4 bytes per character.
                (
                    "grpc.max_receive_message_length",
                    4 * self.settings.max_prompt_chars + 1024 * 1024,
                ),
            )
        )
        inference = InferenceServicer(self.registry, self.settings)
        server.add_generic_rpc_handlers((generic_handler(inference),))
        node_pb2_grpc.add_NodeControlServiceServicer_to_server(
            NodeControlServicer(self.registry, self.settings, self.identity.public_key), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        self.port = server.add_insecure_port(f"{self._bind_host()}:{self.settings.port}")
        if self.port == 0:
            raise OSError(
                f"cannot listen on {self.settings.listen_host}:{self.settings.port}; "
                "choose another --port (0 picks a free one)"
            )
        await server.start()
        self._server = server
        self.registry.start()
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("coordinator listening on %s", self.address)

    def _bind_host(self) -> str:
        host = self.settings.listen_host
        return f"[{host}]" if ":" in host and not host.startswith("[") else host

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop taking requests, let running ones finish within the grace, close all."""
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        await self.registry.close()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def run_coordinator(settings: CoordinatorSettings) -> None:
    """Run a coordinator until SIGINT or SIGTERM; print the ready line when listening."""
    coordinator = Coordinator(settings)
    await coordinator.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    ready = {
        "address": coordinator.address,
        "port": coordinator.port,
        "coordinator_public_key": coordinator.identity.public_key.hex(),
    }
    sys.stdout.write(f"{READY_PREFIX} {json.dumps(ready, sort_keys=True)}\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        log.info("coordinator shutting down")
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
        await coordinator.stop()


def main(settings: CoordinatorSettings) -> None:
    """Blocking entry point: run the coordinator on uvloop."""
    import uvloop

    uvloop.run(run_coordinator(settings))
