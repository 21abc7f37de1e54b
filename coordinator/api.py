"""InferenceService: the client-facing API (Generate, ListModels, ListNodes).

Generate checks the whole request first (:mod:`coordinator.validation`), then asks the
node choice for candidates (:data:`coordinator.choice.ChooseNodes`) and hands them to the
:class:`~coordinator.relay.Relay`, which yields the deltas and fills a
:class:`~coordinator.outcome.RelayOutcome`; the final is built from that outcome here.
Responses travel as GenerateResponse wire bytes (see :func:`generic_handler`), so node
deltas pass through without a parse.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

import grpc
import grpc.aio
from mercato.v1 import common_pb2, inference_pb2

from coordinator.choice import ChooseNodes, choose_nodes
from coordinator.errors import (
    CoordinatorError,
    ModelNotFound,
    NoNodeAvailable,
    abort_with,
)
from coordinator.market import MarketSnapshot, NodeView
from coordinator.outcome import RelayOutcome
from coordinator.registry import NodeRegistry
from coordinator.relay import Relay
from coordinator.settings import CoordinatorSettings
from coordinator.validation import ValidRequest, validate_request

log = logging.getLogger(__name__)

SERVICE_NAME = "mercato.v1.InferenceService"
_LISTED_MODELS_MAX = 20


class InferenceServicer:
    """Generate, ListModels and ListNodes over the live market."""

    def __init__(
        self,
        registry: NodeRegistry,
        settings: CoordinatorSettings,
        *,
        choose: ChooseNodes = choose_nodes,
    ) -> None:
        self._registry = registry
        self._settings = settings
        self._choose = choose
        self._relay = Relay(registry, settings)

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        try:
            valid = validate_request(request, self._settings)
            candidates = self.candidates(valid, self._registry.snapshot())
        except CoordinatorError as exc:
            await abort_with(context, exc)
        outcome = RelayOutcome(valid.request_id)
        try:
            async for chunk in self._relay.stream(valid, candidates, context, outcome):
                yield chunk
        except CoordinatorError as exc:
            if len(outcome.delivered):
                # Clients that read only messages see why the stream stops early.
                yield inference_pb2.GenerateResponse(
                    error=common_pb2.StreamError(code=exc.status_code.value[0], message=str(exc))
                ).SerializeToString()
            await abort_with(context, exc)
        final = outcome.final()
        yield inference_pb2.GenerateResponse(final=final).SerializeToString()

    def candidates(self, request: ValidRequest, snapshot: MarketSnapshot) -> Sequence[NodeView]:
        """Nodes to try, best first; raise ModelNotFound or NoNodeAvailable if none."""
        model = request.model
        candidates = self._choose(snapshot, model, request.routing, self._settings.max_attempts)
        if candidates:
            return candidates
        serving = snapshot.serving(model)
        if serving:
            raise NoNodeAvailable(
                f'no live node serves model "{model}" within the request\'s routing '
                f"constraints ({len(serving)} live node(s) serve it, none within routing "
                "regions, price caps and only_nodes/ignore_nodes); relax them or retry later"
            )
        if model in snapshot.known_models:
            raise NoNodeAvailable(
                f'no live node serves model "{model}" right now; retry later or pick another '
                "model (ListModels)"
            )
        available = snapshot.live_models
        listed = ", ".join(available[:_LISTED_MODELS_MAX]) or "none (no live node)"
        if len(available) > _LISTED_MODELS_MAX:
            listed += f", ... ({len(available)} in all; see ListModels)"
        raise ModelNotFound(f'model "{model}" is not served; available: {listed}')

    async def ListNodes(
        self, request: inference_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListNodesResponse:
        return list_nodes(self._registry, request.model)

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        return list_models(self._registry.snapshot())


def list_models(snapshot: MarketSnapshot) -> inference_pb2.ListModelsResponse:
    """Aggregate the live offers per model."""
    response = inference_pb2.ListModelsResponse()
    for model in snapshot.live_models:
        nodes = snapshot.serving(model)
        terms = [t for t in (node.terms_for(model) for node in nodes) if t is not None]
        response.models.append(
            inference_pb2.ModelInfo(
                model=model,
                nodes=len(nodes),
                regions=sorted({node.region for node in nodes}),
                min_price_input_micro_usd_per_mtok=min(
                    t.price_input_micro_usd_per_mtok for t in terms
                ),
                min_price_output_micro_usd_per_mtok=min(
                    t.price_output_micro_usd_per_mtok for t in terms
                ),
                context_length=min(t.context_length for t in terms),
            )
        )
    return response


def list_nodes(registry: NodeRegistry, model: str = "") -> inference_pb2.ListNodesResponse:
    """Every live node (serving ``model``, if given) with its offer, load and what the
    coordinator measured of it; sorted by node id."""
    snapshot = registry.snapshot()
    nodes = snapshot.serving(model) if model else snapshot.nodes
    response = inference_pb2.ListNodesResponse()
    for node in sorted(nodes, key=lambda n: n.node_id):
        info = response.nodes.add(node_id=node.node_id, in_flight_requests=node.in_flight)
        info.offer.ParseFromString(node.offer.offer_bytes)
        load = node.load
        info.load.running_requests = load.running_requests
        info.load.waiting_requests = load.waiting_requests
        info.load.kv_cache_usage_permille = load.kv_cache_usage_permille
        info.load.output_tokens_per_s = load.output_tokens_per_s
        measured = registry.measurements(node.node_id)
        if measured is not None:
            summary = measured.summary()
            info.measurements.ttft_us = _micros(summary.ttft_s)
            info.measurements.tpot_us = _micros(summary.tpot_s)
            info.measurements.recent_failures = round(
                max(0.0, measured.outcomes.weight - measured.outcomes.sum)
            )
    return response


def _micros(seconds: float | None) -> int:
    return 0 if seconds is None else min(2**32 - 1, max(0, round(seconds * 1_000_000)))


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
