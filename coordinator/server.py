"""The coordinator process: one grpc.aio server on one port.

Serves InferenceService (clients), NodeControlService (nodes), AccountService (clients'
balances, receipts, usage and leases; with billing), grpc.health.v1 and server
reflection. With billing on (the default) the ledger is opened, and what a crash left
unsettled is settled, before the server takes its first call. :func:`run_coordinator`
runs until SIGINT/SIGTERM; :class:`Coordinator` is the same thing as an object for tests
and embedding (start, address, stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
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
from coordinator.billing import Billing
from coordinator.control import NodeControlServicer
from coordinator.registry import NodeRegistry
from coordinator.settings import CoordinatorSettings
from marketplace.identity import Identity
from marketplace.placement import format_cpus, parse_cpus, pin

log = logging.getLogger(__name__)

READY_PREFIX = "MERCATO_COORDINATOR_READY"
# What the server gives its calls other than Generate (drained before) when it stops.
_SERVER_STOP_GRACE_S = 1.0
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
        self.billing = (
            Billing(settings, self.identity, self.registry) if settings.billing_enabled else None
        )
        self._server: grpc.aio.Server | None = None
        self._inference: InferenceServicer | None = None
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
        inference = InferenceServicer(self.registry, self.settings, billing=self.billing)
        self._inference = inference
        server.add_generic_rpc_handlers((generic_handler(inference),))
        service_names = list(SERVICE_NAMES)
        if self.billing is not None and _account_service_available():
            service_names.append(self._add_account_service(server))
        control = NodeControlServicer(
            self.registry,
            self.settings,
            self.identity.public_key,
            late_receipts=self.billing.accept_late_receipt if self.billing is not None else None,
        )
        node_pb2_grpc.add_NodeControlServiceServicer_to_server(control, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                *service_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        try:
            self.port = server.add_insecure_port(f"{self._bind_host()}:{self.settings.port}")
        except RuntimeError:  # grpc's "Failed to bind"
            self.port = 0
        if self.port == 0:
            raise OSError(
                f"cannot listen on {self.settings.listen_host}:{self.settings.port}; is the "
                "port in use? Choose another --port (0 picks a free one)"
            )
        if self.billing is not None:
            # Bound but not serving yet: recovers what a crash left before any new call.
            await self.billing.start()
        await server.start()
        self._server = server
        self.registry.start()
        for name in ("", *service_names):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("coordinator listening on %s", self.address)

    def _add_account_service(self, server: grpc.aio.Server) -> str:
        """Serve AccountService from the billing ledger; leases are priced from the live
        offers. Returns the service's full name."""
        from mercato.v1 import account_pb2

        from coordinator.account_service import LeaseTerms, add_account_service
        from marketplace.ledger.errors import FailedPrecondition

        registry = self.registry

        def lease_terms(node_id: str) -> LeaseTerms | None:
            offer = registry.offer(node_id)
            if offer is None or offer.price_micro_usd_per_gpu_hour <= 0:
                return None
            if node_id not in registry.market:
                # Registered but out of the market: draining (its heartbeat said it is
                # stopping). Leasing it would bill hours it will not serve.
                raise FailedPrecondition(
                    f"node {node_id} is draining or offline and takes no new lease; pick "
                    "another node from ListNodes"
                )
            return LeaseTerms(
                price_micro_usd_per_gpu_hour=offer.price_micro_usd_per_gpu_hour,
                gpus=max(1, offer.gpu_count),  # a CPU node counts as one
            )

        assert self.billing is not None
        add_account_service(
            server,
            self.billing.ledger,
            lease_terms=lease_terms,
            on_leases_changed=self.billing.refresh_leases,
        )
        return str(account_pb2.DESCRIPTOR.services_by_name["AccountService"].full_name)

    def _bind_host(self) -> str:
        host = self.settings.listen_host
        return f"[{host}]" if ":" in host and not host.startswith("[") else host

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop taking requests, let running ones finish within the grace, close all.

        Generate calls still open when the grace is over are cut off while the nodes'
        heartbeat streams are still open, and their settlements get up to
        ``late_receipt_wait_s`` for the nodes' late receipts; only then does the server
        stop (giving its other calls at most one more second)."""
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        await self._health.enter_graceful_shutdown()
        if self._inference is not None:
            await self._inference.drain(grace)
        if self.billing is not None:
            await self.billing.wait_settled(self.settings.late_receipt_wait_s)
        if self._server is not None:
            await self._server.stop(min(grace, _SERVER_STOP_GRACE_S))
            self._server = None
        await self.registry.close()
        if self.billing is not None:
            await self.billing.close()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def run_coordinator(settings: CoordinatorSettings) -> None:
    """Run a coordinator until SIGINT or SIGTERM; print the ready line when listening."""
    coordinator = Coordinator(settings)
    await coordinator.start()
    # Everything loaded so far (modules, descriptors, the recovered ledger state) lives
    # as long as the process: keep it out of the collector's full scans, which otherwise
    # walk it again and again and pause the loop and the ledger writer for tens of ms.
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    ready = {
        "address": coordinator.address,
        "port": coordinator.port,
        "coordinator_public_key": coordinator.identity.public_key.hex(),
        "billing": coordinator.billing is not None,
    }
    recovery = coordinator.billing.recovery if coordinator.billing is not None else None
    if recovery is not None:
        ready["recovery"] = {
            "replayed": recovery.replayed,
            "settled": recovery.settled,
            "released": recovery.released,
            "expired": recovery.expired,
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


def _account_service_available() -> bool:
    """Whether coordinator/account_service.py (AccountService) is part of this build."""
    return importlib.util.find_spec("coordinator.account_service") is not None


def main(settings: CoordinatorSettings) -> None:
    """Blocking entry point: run the coordinator on uvloop (on ``settings.cpus`` when
    set; pinned before gRPC starts its threads, which then inherit the CPUs).
    Raises PlacementError when those CPUs cannot be used here."""
    import uvloop

    if settings.cpus:
        cpus = pin(parse_cpus(settings.cpus))
        log.info("coordinator pinned to CPUs %s", format_cpus(cpus))
    uvloop.run(run_coordinator(settings))
