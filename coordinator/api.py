"""InferenceService: the client-facing API (Generate, ListModels, ListNodes).

Generate checks the whole request first (:mod:`coordinator.validation`), then routes it
(:class:`~coordinator.router.Router`: the first decision over a snapshot of the market)
and hands the decision to the :class:`~coordinator.relay.Relay`, which yields the deltas,
fails over and resumes as needed, and fills a :class:`~coordinator.outcome.RelayOutcome`;
the final is built from that outcome here. ListModels and ListNodes read the market
(:mod:`coordinator.listings`).
Responses travel as GenerateResponse wire bytes (see :func:`generic_handler`), so node
deltas pass through without a parse.

With billing (:mod:`coordinator.billing`) every call first authenticates its API key;
Generate also holds the request's maximum cost before routing (a lease request goes only
to its lease's node, a serverless one never to a leased node) and settles what was
delivered before the final, which then carries the cost and the countersigned receipts.
A call that ends without its final (cancelled, deadline, failed) settles in the
background, after the late receipts of the segments it cut off (see coordinator.billing).

Shutdown (:meth:`InferenceServicer.drain`): new Generate calls are refused UNAVAILABLE,
open ones get the grace to finish, and those still streaming then are cut off with
UNAVAILABLE while the nodes' heartbeat streams are still open, so each cut-off segment's
late receipt still reaches billing and the node is paid for what the client received.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import grpc.aio
from mercato.v1 import common_pb2, inference_pb2

from coordinator.billing import Admission, Billing, BillingRefused, crash_if
from coordinator.errors import CoordinatorError, LeaseNotFound, ShuttingDown, abort_with
from coordinator.listings import list_models, list_nodes
from coordinator.outcome import RelayOutcome
from coordinator.registry import NodeRegistry
from coordinator.relay import Relay
from coordinator.router import Router
from coordinator.settings import CoordinatorSettings, FaultPoint
from coordinator.validation import validate_request

log = logging.getLogger(__name__)

SERVICE_NAME = "mercato.v1.InferenceService"


class InferenceServicer:
    """Generate, ListModels and ListNodes over the live market."""

    def __init__(
        self,
        registry: NodeRegistry,
        settings: CoordinatorSettings,
        *,
        router: Router | None = None,
        billing: Billing | None = None,
    ) -> None:
        self._registry = registry
        self._settings = settings
        self._router = router if router is not None else Router(registry, settings)
        self._billing = billing
        self._relay = Relay(registry, self._router, settings)
        # The tasks of the Generate calls open now (for drain), and whether it has begun.
        self._open: set[asyncio.Task[object]] = set()
        self._draining = False

    async def drain(self, grace_s: float, cut_wait_s: float = 10.0) -> None:
        """Refuse new Generate calls; give the open ones ``grace_s`` seconds to finish,
        then cut them off (UNAVAILABLE). Returns once every call has ended, or after
        ``cut_wait_s`` more seconds."""
        self._draining = True
        if self._open and grace_s > 0:
            await asyncio.wait(set(self._open), timeout=grace_s)
        if not self._open:
            return
        log.warning(
            "shutdown grace of %.1f s is over: cutting off %d stream(s)", grace_s, len(self._open)
        )
        for task in self._open:
            task.cancel()
        await asyncio.wait(set(self._open), timeout=cut_wait_s)

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        if self._draining:
            await abort_with(
                context,
                ShuttingDown(
                    "the coordinator is shutting down and takes no new request; retry in a "
                    "moment (through another coordinator, or this one once it is back)"
                ),
            )
        task = asyncio.current_task()
        assert task is not None
        # grpc runs each call in a task of its own: tracked until it ends (drain waits on it).
        self._open.add(task)
        task.add_done_callback(self._open.discard)
        billing = self._billing
        admission: Admission | None = None
        try:
            principal = await billing.authenticate(context) if billing is not None else None
            valid = validate_request(request, self._settings)
            if billing is not None and principal is not None:
                valid = await billing.constrain(principal, valid)
            elif valid.worker_request.lease_id:
                raise LeaseNotFound(
                    f"lease_id: lease {valid.worker_request.lease_id!r} does not exist (this "
                    "coordinator runs without billing, so it has no leases); leave lease_id "
                    "empty for serverless"
                )
            routed = self._router.first(valid)
            if billing is not None and principal is not None:
                # Failover and resume never go above these candidates' prices (relay).
                admission = await billing.admit(principal, valid, routed.listings)
        except CoordinatorError as exc:
            await abort_with(context, exc)
        outcome = RelayOutcome(valid.request_id)
        if billing is not None and admission is not None:
            admission.relaying = True
            billing.stop_if_refused(admission, task)
        try:
            async for chunk in self._relay.stream(valid, routed, context, outcome):
                yield chunk
            if admission is not None:
                admission.relaying = False
        except BaseException as exc:
            if admission is not None:
                admission.relaying = False
            # Failed or cancelled: bill what has a receipt, a late one included (a live
            # node whose stream was cut sends it on its heartbeat); release the rest.
            if billing is not None and admission is not None:
                outcome.count_unfinished()
                billing.settle_in_background(admission, outcome.segments)
            if (
                isinstance(exc, asyncio.CancelledError)
                and admission is not None
                and admission.hold_refused is not None
                and not context.cancelled()
            ):
                # Cut off by the ledger refusing the hold: tell the client why.
                task.uncancel()
                exc = BillingRefused(admission.hold_refused)
            elif (
                isinstance(exc, asyncio.CancelledError)
                and self._draining
                and not context.cancelled()
            ):
                # Cut off by drain(), not by the client: tell the client why.
                task.uncancel()
                exc = ShuttingDown(
                    "the coordinator is shutting down and its grace for open streams is "
                    "over: the answer stops here (what was delivered is billed from the "
                    "node's receipt); send the rest again as a new request"
                )
            if not isinstance(exc, CoordinatorError):
                raise
            if len(outcome.delivered):
                # Clients that read only messages see why the stream stops early.
                yield inference_pb2.GenerateResponse(
                    error=common_pb2.StreamError(code=exc.status_code.value[0], message=str(exc))
                ).SerializeToString()
            await abort_with(context, exc)
        final = outcome.final()
        if billing is not None and admission is not None:
            crash_if(self._settings, FaultPoint.EXIT_BEFORE_SETTLE)
            try:
                charge = await asyncio.shield(
                    billing.settle_to_the_end(admission, outcome.segments)
                )
            except CoordinatorError as exc:
                await abort_with(context, exc)
            final.cost_micro_usd = charge.cost_micro_usd
            final.receipts.extend(charge.receipts)
            crash_if(self._settings, FaultPoint.EXIT_AFTER_RELAY)
        yield inference_pb2.GenerateResponse(final=final).SerializeToString()

    async def ListNodes(
        self, request: inference_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListNodesResponse:
        await self._authenticate(context)
        billing = self._billing
        return list_nodes(
            self._registry,
            request.model,
            is_leased=billing.is_leased if billing is not None else None,
        )

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        await self._authenticate(context)
        return list_models(self._registry.snapshot())

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        if self._billing is not None:
            try:
                await self._billing.authenticate(context)
            except CoordinatorError as exc:
                await abort_with(context, exc)


def generic_handler(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """InferenceService's handlers; Generate sends pre-serialized bytes (no serializer)."""
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Generate": grpc.unary_stream_rpc_method_handler(
                servicer.Generate,
                request_deserializer=inference_pb2.GenerateRequest.FromString,
                response_serializer=None,
            ),
            "ListNodes": grpc.unary_unary_rpc_method_handler(
                servicer.ListNodes,
                request_deserializer=inference_pb2.ListNodesRequest.FromString,
                response_serializer=inference_pb2.ListNodesResponse.SerializeToString,
            ),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                servicer.ListModels,
                request_deserializer=inference_pb2.ListModelsRequest.FromString,
                response_serializer=inference_pb2.ListModelsResponse.SerializeToString,
            ),
        },
    )
