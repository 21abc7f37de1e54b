from mercato.v1 import common_pb2 as _common_pb2
from mercato.v1 import market_pb2 as _market_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("offer",)
    OFFER_FIELD_NUMBER: _ClassVar[int]
    offer: _market_pb2.SignedOffer
    def __init__(self, offer: _Optional[_Union[_market_pb2.SignedOffer, _Mapping]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("node_id", "session_token", "heartbeat_interval_ms", "liveness_timeout_ms", "coordinator_public_key")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    session_token: str
    heartbeat_interval_ms: int
    liveness_timeout_ms: int
    coordinator_public_key: bytes
    def __init__(self, node_id: _Optional[str] = ..., session_token: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ..., liveness_timeout_ms: _Optional[int] = ..., coordinator_public_key: _Optional[bytes] = ...) -> None: ...

class NodeLoad(_message.Message):
    __slots__ = ("running_requests", "waiting_requests", "kv_cache_usage_permille", "output_tokens_per_s", "coordinator_requests")
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_PERMILLE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    running_requests: int
    waiting_requests: int
    kv_cache_usage_permille: int
    output_tokens_per_s: int
    coordinator_requests: int
    def __init__(self, running_requests: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., kv_cache_usage_permille: _Optional[int] = ..., output_tokens_per_s: _Optional[int] = ..., coordinator_requests: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("sequence", "load", "pong_id", "late_receipts", "draining")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    PONG_ID_FIELD_NUMBER: _ClassVar[int]
    LATE_RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    load: NodeLoad
    pong_id: int
    late_receipts: _containers.RepeatedCompositeFieldContainer[_market_pb2.SignedReceipt]
    draining: bool
    def __init__(self, sequence: _Optional[int] = ..., load: _Optional[_Union[NodeLoad, _Mapping]] = ..., pong_id: _Optional[int] = ..., late_receipts: _Optional[_Iterable[_Union[_market_pb2.SignedReceipt, _Mapping]]] = ..., draining: _Optional[bool] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("sequence", "ping_id")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PING_ID_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    ping_id: int
    def __init__(self, sequence: _Optional[int] = ..., ping_id: _Optional[int] = ...) -> None: ...

class WorkerSessionRequest(_message.Message):
    __slots__ = ("stream_id", "start", "cancel", "timeout_ms")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    start: WorkerGenerateRequest
    cancel: bool
    timeout_ms: int
    def __init__(self, stream_id: _Optional[int] = ..., start: _Optional[_Union[WorkerGenerateRequest, _Mapping]] = ..., cancel: _Optional[bool] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class WorkerSessionEnd(_message.Message):
    __slots__ = ("status_code", "message")
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    status_code: int
    message: str
    def __init__(self, status_code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class WorkerSessionResponse(_message.Message):
    __slots__ = ("stream_id", "response", "end")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    response: WorkerGenerateResponse
    end: WorkerSessionEnd
    def __init__(self, stream_id: _Optional[int] = ..., response: _Optional[_Union[WorkerGenerateResponse, _Mapping]] = ..., end: _Optional[_Union[WorkerSessionEnd, _Mapping]] = ...) -> None: ...

class WorkerGenerateRequest(_message.Message):
    __slots__ = ("request_id", "model", "chat", "prompt", "sampling", "resume_token_ids", "segment_index", "lease_id", "resume_text_chars")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    chat: _common_pb2.ChatInput
    prompt: str
    sampling: _common_pb2.SamplingParams
    resume_token_ids: _containers.RepeatedScalarFieldContainer[int]
    segment_index: int
    lease_id: str
    resume_text_chars: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., chat: _Optional[_Union[_common_pb2.ChatInput, _Mapping]] = ..., prompt: _Optional[str] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., resume_token_ids: _Optional[_Iterable[int]] = ..., segment_index: _Optional[int] = ..., lease_id: _Optional[str] = ..., resume_text_chars: _Optional[int] = ...) -> None: ...

class WorkerFinal(_message.Message):
    __slots__ = ("finish_reason", "input_tokens", "output_tokens", "receipt")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    finish_reason: _common_pb2.FinishReason
    input_tokens: int
    output_tokens: int
    receipt: _market_pb2.SignedReceipt
    def __init__(self, finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., receipt: _Optional[_Union[_market_pb2.SignedReceipt, _Mapping]] = ...) -> None: ...

class WorkerGenerateResponse(_message.Message):
    __slots__ = ("delta", "final", "error", "error_receipt")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_RECEIPT_FIELD_NUMBER: _ClassVar[int]
    delta: _common_pb2.TextDelta
    final: WorkerFinal
    error: _common_pb2.StreamError
    error_receipt: _market_pb2.SignedReceipt
    def __init__(self, delta: _Optional[_Union[_common_pb2.TextDelta, _Mapping]] = ..., final: _Optional[_Union[WorkerFinal, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.StreamError, _Mapping]] = ..., error_receipt: _Optional[_Union[_market_pb2.SignedReceipt, _Mapping]] = ...) -> None: ...
