"""The node's settings: one typed class, read from ``MERCATO_NODE_*``.

Every field carries its unit last in its name, its bounds and a description. Nothing else
in the node reads its own settings from the environment (the engine backends set the
engine library's variables from these fields).
"""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from marketplace.paths import default_home

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
REGION_PATTERN = r"^[a-z0-9][a-z0-9-]{0,31}$"
_UNSET_PATH = Path()


class EngineBackend(StrEnum):
    """Which engine generates tokens."""

    # vLLM embedded in the daemon: the CUDA build on a GPU machine, vLLM's CPU build elsewhere.
    VLLM = "vllm"
    # Deterministic made-up tokens at a fixed rate. Only for unit tests and for benchmarks of
    # the routing overhead; it serves no model and must never face real clients.
    FAKE = "fake"


class EngineDtype(StrEnum):
    """Number format of the model's weights and activations in the engine."""

    # bfloat16 on a GPU or on a CPU with native bf16 (AVX512_BF16 / AMX); float32 otherwise.
    AUTO = "auto"
    # bfloat16: half the memory; fast only where the hardware computes in bf16.
    BFLOAT16 = "bfloat16"
    # float32: twice the memory; on AVX2-only CPUs it batched 2.5x faster than bf16 here.
    FLOAT32 = "float32"


class NodeSettings(BaseSettings):
    """How one provider node identifies itself, what it serves, and at which price."""

    model_config = SettingsConfigDict(env_prefix="MERCATO_NODE_", extra="forbid", frozen=True)

    home: Path = Field(
        default_factory=default_home,
        description="Mercato data directory; the node keeps its files under home/node.",
    )
    identity_path: Path = Field(
        default=_UNSET_PATH,
        description="Ed25519 key file of the node (mode 0600). Unset: home/node/identity.key.",
    )
    models_dir: Path = Field(
        default=_UNSET_PATH,
        description="Where converted models are kept (one folder per model). Unset: home/models.",
    )
    model: str = Field(
        default=DEFAULT_MODEL,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127}$",
        description="Model to serve: the packaged one, or a Hugging Face folder models_dir/<model>.",
    )
    coordinator_address: str = Field(
        default="127.0.0.1:7700",
        min_length=3,
        max_length=300,
        description="host:port of the coordinator's NodeControlService.",
    )
    listen_host: str = Field(
        default="127.0.0.1",
        min_length=1,
        max_length=253,
        description="Address the worker gRPC server listens on; 0.0.0.0 for every interface.",
    )
    port: int = Field(
        default=7701,
        ge=0,
        le=65535,
        description="TCP port of the worker gRPC server; 0 picks a free port (printed when ready).",
    )
    advertise_address: str | None = Field(
        default=None,
        min_length=3,
        max_length=300,
        description="host:port the coordinator should dial. Unset: listen_host:<actual port>.",
    )
    region: str = Field(
        default="local",
        pattern=REGION_PATTERN,
        description="Region code offered to clients: lowercase letters, digits and '-'.",
    )
    price_input_micro_usd_per_mtok: int = Field(
        default=50_000,
        ge=0,
        le=10**12,
        description="Price of prompt tokens, micro-USD per million tokens.",
    )
    price_output_micro_usd_per_mtok: int = Field(
        default=150_000,
        ge=0,
        le=10**12,
        description="Price of generated tokens, micro-USD per million tokens.",
    )
    price_micro_usd_per_gpu_hour: int = Field(
        default=400_000,
        ge=0,
        le=10**12,
        description="Price of leasing the whole node, micro-USD per GPU-hour (CPU node: one GPU).",
    )
    max_concurrency: int = Field(
        default=64,
        ge=1,
        le=4096,
        description="Most generation requests in flight; more are refused with RESOURCE_EXHAUSTED.",
    )
    engine: EngineBackend = Field(
        default=EngineBackend.VLLM,
        description="Engine backend: vllm (real), or fake (unit tests and overhead benchmarks only).",
    )
    engine_dtype: EngineDtype = Field(
        default=EngineDtype.AUTO,
        description="Engine number format: auto (bf16 where the hardware has it), bfloat16, float32.",
    )
    cuda_graphs: bool = Field(
        default=True,
        description=(
            "GPU node: let vLLM compile the model and capture CUDA graphs at start (its "
            "default: slower start, faster decoding). False runs eagerly. CPU nodes always "
            "run eagerly."
        ),
    )
    cpu_omp_threads_bind: str = Field(
        default="nobind",
        pattern=r"^(auto|nobind|[0-9][0-9,|-]*)$",
        description=(
            "CPU node: cores vLLM pins its OpenMP threads to (VLLM_CPU_OMP_THREADS_BIND): "
            "nobind, auto, or a list like 0-3. Pinning was 10x slower on a shared host."
        ),
    )
    stream_interval_max: int = Field(
        default=4,
        ge=1,
        le=64,
        description=(
            "Most output tokens the engine gathers into one streamed delta when it is busy "
            "(vLLM's stream interval); 1 sends every token at once. The first token and "
            "the last are always sent at once."
        ),
    )
    stream_interval_step_requests: int = Field(
        default=4,
        ge=1,
        le=4096,
        description=(
            "Each this many requests already running when a request starts add one token "
            "to its stream interval (up to stream_interval_max): a lightly loaded node "
            "streams every token, a busy one sends fewer, larger deltas."
        ),
    )
    kv_cache_space_gib: int = Field(
        default=2,
        ge=1,
        le=1024,
        description="KV cache size in GiB on a CPU node (VLLM_CPU_KVCACHE_SPACE).",
    )
    gpu_memory_utilization_permille: int = Field(
        default=900,
        ge=50,
        le=1000,
        description="Share of GPU memory vLLM may use on a GPU node, in permille.",
    )
    max_model_len: int = Field(
        default=2048,
        ge=64,
        le=1_048_576,
        description="Most tokens (prompt plus output) per request: the context length offered.",
    )
    engine_start_timeout_s: int = Field(
        default=600,
        ge=5,
        le=7200,
        description="A start-up of the engine taking longer than this fails the node's start.",
    )
    fake_engine_tokens_per_s: float = Field(
        default=1000.0,
        ge=0.0,
        le=1_000_000.0,
        description="Fake engine only: output tokens per second per stream; 0 = as fast as possible.",
    )
    fake_engine_context_length: int = Field(
        default=2048,
        ge=16,
        le=1_048_576,
        description="Fake engine only: the context length it claims.",
    )
    register_backoff_initial_ms: int = Field(
        default=200,
        ge=10,
        le=60_000,
        description="First wait before registering again after a failure, milliseconds (doubles).",
    )
    register_backoff_max_ms: int = Field(
        default=5_000,
        ge=10,
        le=600_000,
        description="Longest wait between registration attempts, milliseconds.",
    )
    ready_wait_for_registration_ms: int = Field(
        default=5_000,
        ge=0,
        le=600_000,
        description="How long start-up waits for the first registration before printing ready.",
    )
    shutdown_grace_s: float = Field(
        default=5.0,
        ge=0.0,
        le=600.0,
        description="On SIGTERM, how long requests in flight may finish before they are cut.",
    )

    @model_validator(mode="after")
    def _check(self) -> NodeSettings:
        if self.identity_path == _UNSET_PATH:
            object.__setattr__(self, "identity_path", self.home / "node" / "identity.key")
        if self.models_dir == _UNSET_PATH:
            object.__setattr__(self, "models_dir", self.home / "models")
        if self.register_backoff_max_ms < self.register_backoff_initial_ms:
            raise ValueError(
                "register_backoff_max_ms must be >= register_backoff_initial_ms "
                "(set MERCATO_NODE_REGISTER_BACKOFF_MAX_MS higher)"
            )
        if self.advertise_address is None and _is_wildcard(self.listen_host):
            raise ValueError(
                f"listen_host {self.listen_host} is not an address a coordinator can dial; "
                "set advertise_address (--advertise-address host:port) too"
            )
        return self

    def worker_address(self, actual_port: int) -> str:
        """The host:port offered to coordinators, once the real port is known."""
        if self.advertise_address is not None:
            return self.advertise_address
        host = self.listen_host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{actual_port}"


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False
