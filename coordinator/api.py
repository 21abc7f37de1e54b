"""InferenceService: the client-facing API (Generate, ListModels).

Generate checks the whole request first (:mod:`coordinator.validation`), then asks the
node choice for candidates (:data:`coordinator.choice.ChooseNodes`) and hands them to the
:class:`~coordinator.relay.Relay`. Responses travel as GenerateResponse wire bytes (see
:func:`generic_handler`), so node deltas pass through without a parse.
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
from coordinator.registry import NodeRegistry
from coordinator.relay import DeliveredOutput, Relay
from coordinator.settings import CoordinatorSettings
from coordinator.validation import ValidRequest, validate_request

log = logging.getLogger(__name__)

SERVICE_NAME = "mercato.v1.InferenceService"
_LISTED_MODELS_MAX = 20


class InferenceServicer:
    """Generate and ListModels over the live market."""

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
        delivered = DeliveredOutput()
        try:
            async for chunk in self._relay.stream(valid, candidates, context, delivered):
                yield chunk
        except CoordinatorError as exc:
            if len(delivered):
                # Clients that read only messages see why the stream stops early.
                yield inference_pb2.GenerateResponse(
                    error=common_pb2.StreamError(code=exc.status_code.value[0], message=str(exc))
                ).SerializeToString()
            await abort_with(context, exc)

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
            "ListModels": grpc.unary_unary_rpc_method_handler(
                servicer.ListModels,
                request_deserializer=inference_pb2.ListModelsRequest.FromString,
                response_serializer=inference_pb2.ListModelsResponse.SerializeToString,
            ),
        },
    )
