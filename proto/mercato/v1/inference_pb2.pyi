from mercato.v1 import common_pb2 as _common_pb2
from mercato.v1 import market_pb2 as _market_pb2
from mercato.v1 import node_pb2 as _node_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SortMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SORT_MODE_UNSPECIFIED: _ClassVar[SortMode]
    SORT_MODE_BALANCED: _ClassVar[SortMode]
    SORT_MODE_PRICE: _ClassVar[SortMode]
    SORT_MODE_LATENCY: _ClassVar[SortMode]
    SORT_MODE_THROUGHPUT: _ClassVar[SortMode]
SORT_MODE_UNSPECIFIED: SortMode
SORT_MODE_BALANCED: SortMode
SORT_MODE_PRICE: SortMode
SORT_MODE_LATENCY: SortMode
SORT_MODE_THROUGHPUT: SortMode

class RoutingPreferences(_message.Message):
    __slots__ = ("regions", "max_price_input_micro_usd_per_mtok", "max_price_output_micro_usd_per_mtok", "sort", "allow_fallbacks", "only_nodes", "ignore_nodes")
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_PRICE_INPUT_MICRO_USD_PER_MTOK_FIELD_NUMBER: _ClassVar[int]
    MAX_PRICE_OUTPUT_MICRO_USD_PER_MTOK_FIELD_NUMBER: _ClassVar[int]
    SORT_FIELD_NUMBER: _ClassVar[int]
    ALLOW_FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    ONLY_NODES_FIELD_NUMBER: _ClassVar[int]
    IGNORE_NODES_FIELD_NUMBER: _ClassVar[int]
    regions: _containers.RepeatedScalarFieldContainer[str]
    max_price_input_micro_usd_per_mtok: int
    max_price_output_micro_usd_per_mtok: int
    sort: SortMode
    allow_fallbacks: bool
    only_nodes: _containers.RepeatedScalarFieldContainer[str]
    ignore_nodes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, regions: _Optional[_Iterable[str]] = ..., max_price_input_micro_usd_per_mtok: _Optional[int] = ..., max_price_output_micro_usd_per_mtok: _Optional[int] = ..., sort: _Optional[_Union[SortMode, str]] = ..., allow_fallbacks: _Optional[bool] = ..., only_nodes: _Optional[_Iterable[str]] = ..., ignore_nodes: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "model", "chat", "prompt", "sampling", "routing", "lease_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    chat: _common_pb2.ChatInput
    prompt: str
    sampling: _common_pb2.SamplingParams
    routing: RoutingPreferences
    lease_id: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., chat: _Optional[_Union[_common_pb2.ChatInput, _Mapping]] = ..., prompt: _Optional[str] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., routing: _Optional[_Union[RoutingPreferences, _Mapping]] = ..., lease_id: _Optional[str] = ...) -> None: ...

class ServedSegment(_message.Message):
    __slots__ = ("node_id", "region", "price_input_micro_usd_per_mtok", "price_output_micro_usd_per_mtok", "input_tokens", "output_tokens")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    PRICE_INPUT_MICRO_USD_PER_MTOK_FIELD_NUMBER: _ClassVar[int]
    PRICE_OUTPUT_MICRO_USD_PER_MTOK_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    region: str
    price_input_micro_usd_per_mtok: int
    price_output_micro_usd_per_mtok: int
    input_tokens: int
    output_tokens: int
    def __init__(self, node_id: _Optional[str] = ..., region: _Optional[str] = ..., price_input_micro_usd_per_mtok: _Optional[int] = ..., price_output_micro_usd_per_mtok: _Optional[int] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ...) -> None: ...

class GenerateFinal(_message.Message):
    __slots__ = ("request_id", "finish_reason", "input_tokens", "output_tokens", "node_id", "region", "segments", "cost_micro_usd", "receipts")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    COST_MICRO_USD_FIELD_NUMBER: _ClassVar[int]
    RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    finish_reason: _common_pb2.FinishReason
    input_tokens: int
    output_tokens: int
    node_id: str
    region: str
    segments: _containers.RepeatedCompositeFieldContainer[ServedSegment]
    cost_micro_usd: int
    receipts: _containers.RepeatedCompositeFieldContainer[_market_pb2.SignedReceipt]
    def __init__(self, request_id: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., node_id: _Optional[str] = ..., region: _Optional[str] = ..., segments: _Optional[_Iterable[_Union[ServedSegment, _Mapping]]] = ..., cost_micro_usd: _Optional[int] = ..., receipts: _Optional[_Iterable[_Union[_market_pb2.SignedReceipt, _Mapping]]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("delta", "final", "error")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    delta: _common_pb2.TextDelta
    final: GenerateFinal
    error: _common_pb2.StreamError
    def __init__(self, delta: _Optional[_Union[_common_pb2.TextDelta, _Mapping]] = ..., final: _Optional[_Union[GenerateFinal, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.StreamError, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "nodes", "regions", "min_price_input_micro_usd_per_mtok", "min_price_output_micro_usd_per_mtok", "context_length")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    MIN_PRICE_INPUT_MICRO_USD_PER_MTOK_FIELD_NUMBER: _ClassVar[int]
    MIN_PRICE_OUTPUT_MICRO_USD_PER_MTOK_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    model: str
    nodes: int
    regions: _containers.RepeatedScalarFieldContainer[str]
    min_price_input_micro_usd_per_mtok: int
    min_price_output_micro_usd_per_mtok: int
    context_length: int
    def __init__(self, model: _Optional[str] = ..., nodes: _Optional[int] = ..., regions: _Optional[_Iterable[str]] = ..., min_price_input_micro_usd_per_mtok: _Optional[int] = ..., min_price_output_micro_usd_per_mtok: _Optional[int] = ..., context_length: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class NodeMeasurements(_message.Message):
    __slots__ = ("rtt_us", "ttft_us", "tpot_us", "recent_failures", "backed_off")
    RTT_US_FIELD_NUMBER: _ClassVar[int]
    TTFT_US_FIELD_NUMBER: _ClassVar[int]
    TPOT_US_FIELD_NUMBER: _ClassVar[int]
    RECENT_FAILURES_FIELD_NUMBER: _ClassVar[int]
    BACKED_OFF_FIELD_NUMBER: _ClassVar[int]
    rtt_us: int
    ttft_us: int
    tpot_us: int
    recent_failures: int
    backed_off: bool
    def __init__(self, rtt_us: _Optional[int] = ..., ttft_us: _Optional[int] = ..., tpot_us: _Optional[int] = ..., recent_failures: _Optional[int] = ..., backed_off: _Optional[bool] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "offer", "load", "measurements", "in_flight_requests", "leased")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    OFFER_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    LEASED_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    offer: _market_pb2.NodeOffer
    load: _node_pb2.NodeLoad
    measurements: NodeMeasurements
    in_flight_requests: int
    leased: bool
    def __init__(self, node_id: _Optional[str] = ..., offer: _Optional[_Union[_market_pb2.NodeOffer, _Mapping]] = ..., load: _Optional[_Union[_node_pb2.NodeLoad, _Mapping]] = ..., measurements: _Optional[_Union[NodeMeasurements, _Mapping]] = ..., in_flight_requests: _Optional[int] = ..., leased: _Optional[bool] = ...) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...
