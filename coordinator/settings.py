"""The coordinator's settings: one typed class, read from ``MERCATO_COORDINATOR_*``.

Every field carries its unit last in its name, its bounds and a description. Nothing else
in the coordinator reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from marketplace.paths import default_home


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
        description="Most nodes tried for one request before it fails (failover before the first token).",
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
    shutdown_grace_s: float = Field(
        default=5.0,
        ge=0,
        le=600,
        description="On SIGINT/SIGTERM, how long running requests may finish before they are cancelled, seconds.",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_identity_path(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("identity_path") in (None, ""):
            home = data.get("home")
            home_path = Path(home).expanduser() if home else default_home()
            data = {**data, "identity_path": home_path / "coordinator" / "identity.key"}
        return data

    @model_validator(mode="after")
    def _check_cross_fields(self) -> CoordinatorSettings:
        if self.liveness_timeout_ms <= self.heartbeat_interval_ms:
            raise ValueError(
                f"liveness_timeout_ms ({self.liveness_timeout_ms}) must exceed "
                f"heartbeat_interval_ms ({self.heartbeat_interval_ms}); raise "
                "MERCATO_COORDINATOR_LIVENESS_TIMEOUT_MS or lower MERCATO_COORDINATOR_HEARTBEAT_INTERVAL_MS"
            )
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit "
                f"({self.max_tokens_limit}); lower MERCATO_COORDINATOR_DEFAULT_MAX_TOKENS"
            )
        return self
