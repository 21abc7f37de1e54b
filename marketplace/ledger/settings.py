"""LedgerSettings: the one typed source of the ledger's configuration.

Environment: ``MERCATO_DATABASE_URL`` for the database (shared by every service that
opens the ledger), ``MERCATO_LEDGER_<FIELD>`` for the rest.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from marketplace.paths import default_home

BASIS_POINTS_PER_UNIT = 10_000


def default_database_url() -> str:
    """SQLite in the data directory: ``sqlite:///<home>/mercato.db``."""
    return f"sqlite:///{Path(default_home()) / 'mercato.db'}"


class LedgerSettings(BaseSettings):
    """Configuration of the ledger (storage, fees, holds, group commit)."""

    model_config = SettingsConfigDict(
        env_prefix="MERCATO_LEDGER_", extra="ignore", populate_by_name=True
    )

    database_url: str = Field(
        default_factory=default_database_url,
        validation_alias=AliasChoices("MERCATO_DATABASE_URL", "MERCATO_LEDGER_DATABASE_URL"),
        description="SQLAlchemy URL: sqlite:///path (WAL) or postgresql+psycopg://user@host/db.",
    )
    platform_fee_bps: int = Field(
        default=1_000,
        ge=0,
        le=BASIS_POINTS_PER_UNIT,
        description="Platform fee in basis points of each charge (1000 = 10%).",
    )
    hold_expiry_s: float = Field(
        default=600.0,
        gt=0,
        le=86_400,
        description="A hold not settled within this many seconds expires and is released.",
    )
    hold_sweep_interval_s: float = Field(
        default=5.0, gt=0, le=3_600, description="How often expired holds are swept, seconds."
    )
    commit_window_ms: float = Field(
        default=0.0,
        ge=0,
        le=100,
        description="Extra wait before a batch commits, to gather more operations (0: commit "
        "whatever is queued as soon as the previous commit is done).",
    )
    commit_batch_max: int = Field(
        default=4_096, ge=1, le=65_536, description="Most operations in one commit."
    )
    sqlite_synchronous: str = Field(
        default="FULL",
        pattern="^(OFF|NORMAL|FULL|EXTRA)$",
        description="SQLite PRAGMA synchronous: FULL fsyncs every (group) commit.",
    )
    sqlite_busy_timeout_ms: int = Field(
        default=10_000, ge=0, le=600_000, description="How long SQLite waits for a lock."
    )
    intent_log_dir: Path | None = Field(
        default=None,
        description="Folder of the settlement intent log (crash recovery). Unset: "
        "<data dir>/ledger-intents.",
    )
    intent_log_fsync: bool = Field(
        default=False,
        description="fsync each intent record (survives power loss, not only a killed "
        "process; costs one fsync per settlement).",
    )
    owner: str = Field(
        default="local",
        pattern=r"^[A-Za-z0-9._:-]{1,64}$",
        description="Name of this ledger writer (a coordinator); holds it places carry it, "
        "and recovery voids this owner's holds left open by a crash.",
    )
    key_cache_ttl_s: float = Field(
        default=0.0,
        ge=0,
        le=60,
        description="How long an authenticated key is trusted without reading the database "
        "again. 0: every call reads it, so a revocation works at once.",
    )
    payout_min_micro_usd: int = Field(
        default=1, ge=1, description="Smallest provider balance paid out by a payout run."
    )

    def resolved_intent_log_dir(self) -> Path:
        return self.intent_log_dir or Path(default_home()) / "ledger-intents"
