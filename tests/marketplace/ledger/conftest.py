"""Fixtures: every ledger test runs on SQLite and on PostgreSQL (a fresh schema per test
in the ``test`` database at 127.0.0.1:5432: see ``tests/postgres.py``)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from mercato.v1 import market_pb2
from sqlalchemy import text

from marketplace.identity import Identity
from marketplace.ledger import Ledger, LedgerSettings, LedgerStore
from marketplace.ledger.models import AccountKind
from marketplace.ledger.receipts import RelayedSegment, sign_receipt
from marketplace.ledger.writer import GroupCommitWriter
from tests.postgres import fresh_schema


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    with fresh_schema("t") as url:
        yield url


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> LedgerSettings:
    return LedgerSettings(
        database_url=database_url,
        intent_log_dir=tmp_path / "intents",
        hold_sweep_interval_s=3600,
        platform_fee_bps=1000,
    )


@pytest.fixture
def store(settings: LedgerSettings) -> Iterator[LedgerStore]:
    opened = LedgerStore.open(settings)
    yield opened
    opened.close()


@pytest.fixture
async def writer(store: LedgerStore) -> AsyncIterator[GroupCommitWriter]:
    """A group-commit writer of its own on ``store`` (no Ledger around it)."""
    instance = GroupCommitWriter(store.engine)
    instance.start()
    yield instance
    await instance.close()


@pytest.fixture
async def ledger(settings: LedgerSettings, store: LedgerStore) -> AsyncIterator[Ledger]:
    instance = Ledger(settings, coordinator=Identity.from_seed(b"c" * 32))
    await instance.start()
    yield instance
    await instance.close()


@pytest.fixture
def node() -> Identity:
    return Identity.from_seed(b"n" * 32)


def make_client(store: LedgerStore, name: str = "alice", deposit: int = 1_000_000) -> str:
    account = store.create_account(AccountKind.CLIENT, name)
    if deposit:
        store.deposit(account.id, deposit)
    return account.id


def receipt_for(
    node: Identity,
    worker_request_id: str,
    input_tokens: int,
    output_tokens: int,
    *,
    price_in: int = 100_000,
    price_out: int = 300_000,
    model: str = "smol",
    segment_index: int = 0,
    lease_id: str = "",
) -> tuple[market_pb2.SignedReceipt, RelayedSegment]:
    """A node's signed receipt and the matching relayed segment."""
    usage = market_pb2.UsageReceipt(
        request_id=worker_request_id,
        node_id=node.node_id,
        model=model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        price_input_micro_usd_per_mtok=price_in,
        price_output_micro_usd_per_mtok=price_out,
        started_at_unix_ms=1,
        finished_at_unix_ms=2,
        segment_index=segment_index,
        lease_id=lease_id,
    )
    relayed = RelayedSegment(
        worker_request_id=worker_request_id,
        node_id=node.node_id,
        model=model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        price_input_micro_usd_per_mtok=price_in,
        price_output_micro_usd_per_mtok=price_out,
        segment_index=segment_index,
        lease_id=lease_id,
    )
    return sign_receipt(usage, node), relayed


def row_counts(store: LedgerStore) -> dict[str, int]:
    """Rows per table, and the sum of the recorded key spend (a refused operation must
    change neither)."""
    tables = ["transfers", "settlements", "receipts", "open_holds", "balances", "accounts"]
    with store.engine.connect() as conn:
        counts = {t: conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one() for t in tables}
        counts["key_spend_micro_usd"] = conn.execute(
            text("SELECT COALESCE(SUM(spent_micro_usd), 0) FROM key_spend")
        ).scalar_one()
    return counts


async def kill_ledger(ledger: Ledger) -> None:
    """What a killed coordinator leaves: its intent log as it is (no close, no clean-up),
    its writer lock gone with the process; then its writer and database handles shut."""
    intents = ledger._intents
    assert intents is not None and intents._lock is not None
    os.close(intents._lock)  # the kernel drops a dead process's flock
    intents._lock = None
    ledger._intents = None
    assert ledger._writer is not None
    await ledger._writer.close()
    ledger._writer = None
    ledger._store.close()  # type: ignore[union-attr]
