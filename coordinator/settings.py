"""The coordinator's settings: one typed class, read from ``MERCATO_COORDINATOR_*``.

Every field carries its unit last in its name, its bounds and a description. Nothing else
in the coordinator reads the environment.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from coordinator.routing import BreakerPolicy, MarketConfig, RoutingConfig
from marketplace.paths import default_home
from marketplace.placement import CPU_LIST_CHARS_MAX, parse_cpus


class FaultPoint(enum.Enum):
    """A test hook: where a coordinator kills itself (``os._exit``) to test crash recovery.

    Set with ``MERCATO_COORDINATOR_FAULT``; never set it in production.
    """

    # No fault: the normal coordinator.
    NONE = "none"
    # After the last token is relayed and the node's receipt is in hand, before anything
    # of the settlement is recorded: the restarted coordinator must release the hold
    # (the request is charged zero times).
    EXIT_BEFORE_SETTLE = "exit-before-settle"
    # After the last token is relayed and the settlement is in the ledger's intent log,
    # before it is committed and before the client gets its final: the restarted
    # coordinator must settle it from the intent log, exactly once.
    EXIT_AFTER_RELAY = "exit-after-relay"


class CoordinatorSettings(BaseSettings):
    """How one coordinator listens, judges nodes and bounds requests."""

    model_config = SettingsConfigDict(
        env_prefix="MERCATO_COORDINATOR_", extra="forbid", frozen=True
    )

    home: Path = Field(
        default_factory=default_home,
        description="Mercato data directory; the coordinator keeps its files under home/coordinator.",
    )
    identity_path: Path = Field(
        default=Path("identity.key"),
        description="Ed25519 key file of the coordinator (mode 0600). Unset: home/coordinator/identity.key.",
    )
    listen_host: str = Field(
        default="127.0.0.1",
        min_length=1,
        max_length=253,
        description="Address to listen on; 0.0.0.0 for every interface.",
    )
    port: int = Field(
        default=7700,
        ge=0,
        le=65535,
        description="TCP port of the gRPC server; 0 picks a free port (printed when ready).",
    )
    heartbeat_interval_ms: int = Field(
        default=1000,
        ge=50,
        le=60_000,
        description="How often nodes are told to send a heartbeat, milliseconds.",
    )
    liveness_timeout_ms: int = Field(
        default=3000,
        ge=100,
        le=600_000,
        description="A node silent for longer than this is dropped, milliseconds.",
    )
    cpus: str = Field(
        default="",
        max_length=CPU_LIST_CHARS_MAX,
        description="CPUs the coordinator process runs on, as a CPU list (1, 0,2, 2-3; "
        "Linux); empty: wherever the scheduler puts it. On a host shared with busy "
        "processes, CPUs of its own keep its latency low (docs/operators.md).",
    )
    offer_max_age_s: int = Field(
        default=300,
        ge=1,
        le=86_400,
        description="A signed offer is accepted only if issued within this many seconds of now (either way).",
    )
    max_nodes: int = Field(
        default=100_000,
        ge=1,
        le=10_000_000,
        description="Most nodes registered at once; further registrations are refused.",
    )
    max_prompt_chars: int = Field(
        default=65_536,
        ge=1,
        le=16_777_216,
        description="Most characters of a prompt (all chat message contents together).",
    )
    max_messages: int = Field(
        default=256, ge=1, le=65_536, description="Most chat messages in one request."
    )
    max_tokens_limit: int = Field(
        default=32_768,
        ge=1,
        le=1_048_576,
        description="Highest sampling.max_tokens a request may ask for.",
    )
    default_max_tokens: int = Field(
        default=256,
        ge=1,
        le=1_048_576,
        description="Output tokens generated when a request leaves sampling.max_tokens unset.",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=64,
        description="Most nodes tried before the first token of a segment (the first node's "
        "output, or a resumed part) before the request fails; also the most candidates "
        "in one routing decision.",
    )
    connect_timeout_s: float = Field(
        default=3.0,
        gt=0,
        le=600,
        description="Per attempt: longest wait for a connection to the chosen node, seconds.",
    )
    first_token_timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Per attempt: longest wait for the node's first message after connecting, seconds.",
    )
    stall_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Per attempt, after the first message: a node that sends nothing for "
        "this long (while the coordinator waits on it, not on a slow client) is taken as "
        "failed and the stream resumes on another node, seconds. A stall is noticed after "
        "one to two times this.",
    )
    shutdown_grace_s: float = Field(
        default=5.0,
        ge=0,
        le=600,
        description="On SIGINT/SIGTERM, how long running requests may finish before they are cancelled, seconds.",
    )
    max_resumes: int = Field(
        default=2,
        ge=0,
        le=64,
        description="Most times one request's stream is resumed on another node after its "
        "node failed mid-stream (0: a mid-stream failure ends the request).",
    )
    ping_interval_ms: int = Field(
        default=2000,
        ge=50,
        le=600_000,
        description="How often the coordinator pings each node on its heartbeat stream to "
        "time the network round trip (RTT), milliseconds.",
    )

    # --- routing (coordinator.routing.RoutingConfig) ---------------------------------
    routing_seed: int | None = Field(
        default=None,
        ge=0,
        le=2**63 - 1,
        description="Seed of the routing RNG (tie breaks, sampling, two choices); unset: "
        "a random seed per process (logged at start).",
    )
    routing_sample_size: int = Field(
        default=24,
        ge=1,
        le=100_000,
        description="Nodes scored per request in the latency, throughput and balanced "
        "modes; when more are eligible, this many are sampled at random.",
    )
    routing_price_pool_size: int = Field(
        default=8,
        ge=1,
        le=100_000,
        description="Cheapest eligible nodes found exactly in price mode.",
    )
    routing_near_best_max: int = Field(
        default=16,
        ge=1,
        le=100_000,
        description="Most candidates in the near-best pool that power-of-two-choices picks from.",
    )
    routing_exploration_bonus: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="Never-measured nodes get the measured peers' median times x (1 - this), "
        "so new nodes get traffic and thereby measurements.",
    )
    routing_weight_cost: float = Field(
        default=1.0, ge=0.0, le=1000.0, description="Balanced mode: weight of expected cost."
    )
    routing_weight_time: float = Field(
        default=1.0, ge=0.0, le=1000.0, description="Balanced mode: weight of expected duration."
    )
    routing_weight_load: float = Field(
        default=6.0,
        ge=0.0,
        le=1000.0,
        description="Balanced mode: weight of utilization (occupancy / max concurrency).",
    )
    routing_weight_unreliability: float = Field(
        default=4.0,
        ge=0.0,
        le=1000.0,
        description="Balanced mode: weight of unreliability (1 - decayed success share).",
    )
    latency_half_life_s: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="Weight of an RTT, TTFT or TPOT measurement halves after this long, seconds.",
    )
    reliability_half_life_s: float = Field(
        default=600.0,
        gt=0,
        le=86_400,
        description="Weight of a success or failure of a node halves after this long, seconds.",
    )

    # --- circuit breaker (coordinator.routing.BreakerPolicy) -------------------------
    breaker_failure_threshold: int = Field(
        default=3,
        ge=1,
        le=1000,
        description="Consecutive failed attempts on a node that back it off (breaker opens).",
    )
    breaker_backoff_base_s: float = Field(
        default=2.0, gt=0, le=3600, description="First back-off of a failing node, seconds."
    )
    breaker_backoff_multiplier: float = Field(
        default=2.0,
        ge=1.0,
        le=100.0,
        description="Factor on the back-off each time the probe after one fails.",
    )
    breaker_backoff_max_s: float = Field(
        default=120.0, gt=0, le=86_400, description="Longest back-off of a failing node, seconds."
    )

    billing_enabled: bool = Field(
        default=True,
        description="Authenticate API keys, hold and settle every request on the ledger. "
        "The ledger's database is MERCATO_DATABASE_URL, else SQLite at home/mercato.db.",
    )
    template_overhead_tokens_max: int = Field(
        default=256,
        ge=0,
        le=1_000_000,
        description="Hold rule: most tokens a chat template or tokenizer adds to a request "
        "beyond the UTF-8 bytes of its text (default system prompt, BOS, generation prompt).",
    )
    message_overhead_tokens_max: int = Field(
        default=32,
        ge=0,
        le=1_000_000,
        description="Hold rule: most tokens a chat template adds around each chat message.",
    )
    late_receipt_wait_s: float = Field(
        default=3.0,
        ge=0,
        le=600,
        description="A request cut off before a node's final (client cancel, deadline, "
        "failure) settles after waiting at most this long for the late receipts of its live "
        "nodes (sent on their heartbeat streams), seconds; 0: settle at once.",
    )
    lease_refresh_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        description="How often the active leases are read (nodes under a lease take no "
        "serverless traffic) and nodes dropped from the market end their leases, seconds.",
    )
    lease_node_grace_s: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="A leased node that left the market ends its leases (with a refund) once "
        "it has stayed away this long, seconds (a node that flaps under load keeps them).",
    )
    fault: FaultPoint = Field(
        default=FaultPoint.NONE,
        description="Test hook: exit the process at this point of a request (crash tests).",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_identity_path(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("identity_path") in (None, ""):
            home = data.get("home")
            home_path = Path(home).expanduser() if home else default_home()
            data = {**data, "identity_path": home_path / "coordinator" / "identity.key"}
        return data

    @field_validator("cpus")
    @classmethod
    def _check_cpus(cls, value: str) -> str:
        if value.strip():
            parse_cpus(value)  # PlacementError is a ValueError: pydantic reports it
        return value.strip()

    @model_validator(mode="after")
    def _check_cross_fields(self) -> CoordinatorSettings:
        if self.liveness_timeout_ms <= self.heartbeat_interval_ms:
            raise ValueError(
                f"liveness_timeout_ms ({self.liveness_timeout_ms}) must exceed "
                f"heartbeat_interval_ms ({self.heartbeat_interval_ms}); raise "
                "MERCATO_COORDINATOR_LIVENESS_TIMEOUT_MS or lower MERCATO_COORDINATOR_HEARTBEAT_INTERVAL_MS"
            )
        if self.breaker_backoff_base_s > self.breaker_backoff_max_s:
            raise ValueError(
                f"breaker_backoff_base_s ({self.breaker_backoff_base_s}) exceeds "
                f"breaker_backoff_max_s ({self.breaker_backoff_max_s}); raise "
                "MERCATO_COORDINATOR_BREAKER_BACKOFF_MAX_S"
            )
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit "
                f"({self.max_tokens_limit}); lower MERCATO_COORDINATOR_DEFAULT_MAX_TOKENS"
            )
        return self

    def routing_config(self) -> RoutingConfig:
        """The routing tuning these settings describe."""
        return RoutingConfig(
            sample_size=self.routing_sample_size,
            price_pool_size=self.routing_price_pool_size,
            near_best_max=self.routing_near_best_max,
            max_candidates=self.max_attempts,
            exploration_bonus=self.routing_exploration_bonus,
            weight_cost=self.routing_weight_cost,
            weight_time=self.routing_weight_time,
            weight_load=self.routing_weight_load,
            weight_unreliability=self.routing_weight_unreliability,
        )

    def market_config(self) -> MarketConfig:
        """The market's statistics and circuit-breaker tuning these settings describe."""
        return MarketConfig(
            breaker=BreakerPolicy(
                failure_threshold=self.breaker_failure_threshold,
                backoff_base_s=self.breaker_backoff_base_s,
                backoff_multiplier=self.breaker_backoff_multiplier,
                backoff_max_s=self.breaker_backoff_max_s,
            ),
            latency_half_life_s=self.latency_half_life_s,
            reliability_half_life_s=self.reliability_half_life_s,
        )
