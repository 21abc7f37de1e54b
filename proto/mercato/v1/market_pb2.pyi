from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AcceleratorKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCELERATOR_KIND_UNSPECIFIED: _ClassVar[AcceleratorKind]
    ACCELERATOR_KIND_CPU: _ClassVar[AcceleratorKind]
    ACCELERATOR_KIND_NVIDIA_GPU: _ClassVar[AcceleratorKind]
ACCELERATOR_KIND_UNSPECIFIED: AcceleratorKind
ACCELERATOR_KIND_CPU: AcceleratorKind
ACCELERATOR_KIND_NVIDIA_GPU: AcceleratorKind

class Gpu(_message.Message):
    __slots__ = ("name", "memory_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    memory_bytes: int
    def __init__(self, name: _Optional[str] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class Hardware(_message.Message):
    __slots__ = ("accelerator", "gpus", "cpu_cores", "memory_bytes", "cpu_model")
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_MODEL_FIELD_NUMBER: _ClassVar[int]
    accelerator: AcceleratorKind
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    cpu_cores: int
    memory_bytes: int
    cpu_model: str
    def __init__(self, accelerator: _Optional[_Union[AcceleratorKind, str]] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ..., cpu_cores: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., cpu_model: _Optional[str] = ...) -> None: ...

class ModelOffer(_message.Message):
    __slots__ = ("model", "price_input_micro_usd_per_mtok", "price_output_micro_usd_per_mtok", "context_length")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRICE_INPUT_MICRO_USD_PER_MTOK_FIELD_NUMBER: _ClassVar[int]
    PRICE_OUTPUT_MICRO_USD_PER_MTOK_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    model: str
    price_input_micro_usd_per_mtok: int
    price_output_micro_usd_per_mtok: int
    context_length: int
    def __init__(self, model: _Optional[str] = ..., price_input_micro_usd_per_mtok: _Optional[int] = ..., price_output_micro_usd_per_mtok: _Optional[int] = ..., context_length: _Optional[int] = ...) -> None: ...

class NodeOffer(_message.Message):
    __slots__ = ("node_public_key", "worker_address", "models", "region", "hardware", "max_concurrency", "price_micro_usd_per_gpu_hour", "issued_at_unix_ms", "sequence")
    NODE_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    WORKER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    PRICE_MICRO_USD_PER_GPU_HOUR_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    node_public_key: bytes
    worker_address: str
    models: _containers.RepeatedCompositeFieldContainer[ModelOffer]
    region: str
    hardware: Hardware
    max_concurrency: int
    price_micro_usd_per_gpu_hour: int
    issued_at_unix_ms: int
    sequence: int
    def __init__(self, node_public_key: _Optional[bytes] = ..., worker_address: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelOffer, _Mapping]]] = ..., region: _Optional[str] = ..., hardware: _Optional[_Union[Hardware, _Mapping]] = ..., max_concurrency: _Optional[int] = ..., price_micro_usd_per_gpu_hour: _Optional[int] = ..., issued_at_unix_ms: _Optional[int] = ..., sequence: _Optional[int] = ...) -> None: ...

class SignedOffer(_message.Message):
    __slots__ = ("offer", "signature")
    OFFER_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    offer: bytes
    signature: bytes
    def __init__(self, offer: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class UsageReceipt(_message.Message):
    __slots__ = ("request_id", "node_id", "model", "input_tokens", "output_tokens", "price_input_micro_usd_per_mtok", "price_output_micro_usd_per_mtok", "started_at_unix_ms", "finished_at_unix_ms", "segment_index", "lease_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRICE_INPUT_MICRO_USD_PER_MTOK_FIELD_NUMBER: _ClassVar[int]
    PRICE_OUTPUT_MICRO_USD_PER_MTOK_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    node_id: str
    model: str
    input_tokens: int
    output_tokens: int
    price_input_micro_usd_per_mtok: int
    price_output_micro_usd_per_mtok: int
    started_at_unix_ms: int
    finished_at_unix_ms: int
    segment_index: int
    lease_id: str
    def __init__(self, request_id: _Optional[str] = ..., node_id: _Optional[str] = ..., model: _Optional[str] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., price_input_micro_usd_per_mtok: _Optional[int] = ..., price_output_micro_usd_per_mtok: _Optional[int] = ..., started_at_unix_ms: _Optional[int] = ..., finished_at_unix_ms: _Optional[int] = ..., segment_index: _Optional[int] = ..., lease_id: _Optional[str] = ...) -> None: ...

class SignedReceipt(_message.Message):
    __slots__ = ("receipt", "node_public_key", "node_signature", "coordinator_public_key", "coordinator_signature")
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    NODE_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    NODE_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    receipt: bytes
    node_public_key: bytes
    node_signature: bytes
    coordinator_public_key: bytes
    coordinator_signature: bytes
    def __init__(self, receipt: _Optional[bytes] = ..., node_public_key: _Optional[bytes] = ..., node_signature: _Optional[bytes] = ..., coordinator_public_key: _Optional[bytes] = ..., coordinator_signature: _Optional[bytes] = ...) -> None: ...
