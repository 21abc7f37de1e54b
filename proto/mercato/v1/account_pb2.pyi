from mercato.v1 import market_pb2 as _market_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AccountKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCOUNT_KIND_UNSPECIFIED: _ClassVar[AccountKind]
    ACCOUNT_KIND_CLIENT: _ClassVar[AccountKind]
    ACCOUNT_KIND_PROVIDER: _ClassVar[AccountKind]

class LeaseStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEASE_STATUS_UNSPECIFIED: _ClassVar[LeaseStatus]
    LEASE_STATUS_ACTIVE: _ClassVar[LeaseStatus]
    LEASE_STATUS_ENDED: _ClassVar[LeaseStatus]
    LEASE_STATUS_FAILED: _ClassVar[LeaseStatus]
ACCOUNT_KIND_UNSPECIFIED: AccountKind
ACCOUNT_KIND_CLIENT: AccountKind
ACCOUNT_KIND_PROVIDER: AccountKind
LEASE_STATUS_UNSPECIFIED: LeaseStatus
LEASE_STATUS_ACTIVE: LeaseStatus
LEASE_STATUS_ENDED: LeaseStatus
LEASE_STATUS_FAILED: LeaseStatus

class GetBalanceRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetBalanceResponse(_message.Message):
    __slots__ = ("account_id", "account_name", "kind", "posted_micro_usd", "held_micro_usd", "available_micro_usd", "api_key_id", "key_spend_limit_micro_usd", "key_spent_micro_usd", "key_held_micro_usd", "key_spend_left_micro_usd")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    POSTED_MICRO_USD_FIELD_NUMBER: _ClassVar[int]
    HELD_MICRO_USD_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_MICRO_USD_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_SPEND_LIMIT_MICRO_USD_FIELD_NUMBER: _ClassVar[int]
    KEY_SPENT_MICRO_USD_FIELD_NUMBER: _ClassVar[int]
    KEY_HELD_MICRO_USD_FIELD_NUMBER: _ClassVar[int]
    KEY_SPEND_LEFT_MICRO_USD_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    account_name: str
    kind: AccountKind
    posted_micro_usd: int
    held_micro_usd: int
    available_micro_usd: int
    api_key_id: str
    key_spend_limit_micro_usd: int
    key_spent_micro_usd: int
    key_held_micro_usd: int
    key_spend_left_micro_usd: int
    def __init__(self, account_id: _Optional[str] = ..., account_name: _Optional[str] = ..., kind: _Optional[_Union[AccountKind, str]] = ..., posted_micro_usd: _Optional[int] = ..., held_micro_usd: _Optional[int] = ..., available_micro_usd: _Optional[int] = ..., api_key_id: _Optional[str] = ..., key_spend_limit_micro_usd: _Optional[int] = ..., key_spent_micro_usd: _Optional[int] = ..., key_held_micro_usd: _Optional[int] = ..., key_spend_left_micro_usd: _Optional[int] = ...) -> None: ...

class ListReceiptsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "request_id", "since_unix_ms")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    request_id: str
    since_unix_ms: int
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., request_id: _Optional[str] = ..., since_unix_ms: _Optional[int] = ...) -> None: ...

class AccountReceipt(_message.Message):
    __slots__ = ("request_id", "segment_index", "node_id", "model", "input_tokens", "output_tokens", "cost_micro_usd", "settled_at_unix_ms", "receipt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_MICRO_USD_FIELD_NUMBER: _ClassVar[int]
    SETTLED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    segment_index: int
    node_id: str
    model: str
    input_tokens: int
    output_tokens: int
    cost_micro_usd: int
    settled_at_unix_ms: int
    receipt: _market_pb2.SignedReceipt
    def __init__(self, request_id: _Optional[str] = ..., segment_index: _Optional[int] = ..., node_id: _Optional[str] = ..., model: _Optional[str] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cost_micro_usd: _Optional[int] = ..., settled_at_unix_ms: _Optional[int] = ..., receipt: _Optional[_Union[_market_pb2.SignedReceipt, _Mapping]] = ...) -> None: ...

class ListReceiptsResponse(_message.Message):
    __slots__ = ("receipts", "next_page_token")
    RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    receipts: _containers.RepeatedCompositeFieldContainer[AccountReceipt]
    next_page_token: str
    def __init__(self, receipts: _Optional[_Iterable[_Union[AccountReceipt, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("since_unix_ms", "api_key_id", "model")
    SINCE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    since_unix_ms: int
    api_key_id: str
    model: str
    def __init__(self, since_unix_ms: _Optional[int] = ..., api_key_id: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class UsageRow(_message.Message):
    __slots__ = ("day", "api_key_id", "model", "requests", "input_tokens", "output_tokens", "cost_micro_usd")
    DAY_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_MICRO_USD_FIELD_NUMBER: _ClassVar[int]
    day: str
    api_key_id: str
    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    cost_micro_usd: int
    def __init__(self, day: _Optional[str] = ..., api_key_id: _Optional[str] = ..., model: _Optional[str] = ..., requests: _Optional[int] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cost_micro_usd: _Optional[int] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[UsageRow]
    def __init__(self, rows: _Optional[_Iterable[_Union[UsageRow, _Mapping]]] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("lease_id", "node_id", "status", "held_micro_usd", "charged_micro_usd", "refunded_micro_usd", "periods_total", "periods_charged", "started_at_unix_ms", "ends_at_unix_ms")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HELD_MICRO_USD_FIELD_NUMBER: _ClassVar[int]
    CHARGED_MICRO_USD_FIELD_NUMBER: _ClassVar[int]
    REFUNDED_MICRO_USD_FIELD_NUMBER: _ClassVar[int]
    PERIODS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PERIODS_CHARGED_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ENDS_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    node_id: str
    status: LeaseStatus
    held_micro_usd: int
    charged_micro_usd: int
    refunded_micro_usd: int
    periods_total: int
    periods_charged: int
    started_at_unix_ms: int
    ends_at_unix_ms: int
    def __init__(self, lease_id: _Optional[str] = ..., node_id: _Optional[str] = ..., status: _Optional[_Union[LeaseStatus, str]] = ..., held_micro_usd: _Optional[int] = ..., charged_micro_usd: _Optional[int] = ..., refunded_micro_usd: _Optional[int] = ..., periods_total: _Optional[int] = ..., periods_charged: _Optional[int] = ..., started_at_unix_ms: _Optional[int] = ..., ends_at_unix_ms: _Optional[int] = ...) -> None: ...

class CreateLeaseRequest(_message.Message):
    __slots__ = ("node_id", "hours", "gpus", "lease_id", "max_price_micro_usd_per_gpu_hour")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOURS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_PRICE_MICRO_USD_PER_GPU_HOUR_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    hours: int
    gpus: int
    lease_id: str
    max_price_micro_usd_per_gpu_hour: int
    def __init__(self, node_id: _Optional[str] = ..., hours: _Optional[int] = ..., gpus: _Optional[int] = ..., lease_id: _Optional[str] = ..., max_price_micro_usd_per_gpu_hour: _Optional[int] = ...) -> None: ...

class CreateLeaseResponse(_message.Message):
    __slots__ = ("lease",)
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class EndLeaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class EndLeaseResponse(_message.Message):
    __slots__ = ("lease",)
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class GetLeaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class GetLeaseResponse(_message.Message):
    __slots__ = ("lease",)
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class ListLeasesRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "active_only")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_ONLY_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    active_only: bool
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., active_only: _Optional[bool] = ...) -> None: ...

class ListLeasesResponse(_message.Message):
    __slots__ = ("leases", "next_page_token")
    LEASES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[Lease]
    next_page_token: str
    def __init__(self, leases: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
