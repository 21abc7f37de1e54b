"""The writer's memory between batches: a batch that starts from memory skips the look-ups
of earlier rows, so retries and replays must still be answered exactly as before (the
unique keys refuse the duplicate, the batch is re-read and re-applied), and a journal head
moved by someone else must make the writer read everything again. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from marketplace.ledger import (
    IdConflict,
    InsufficientBalance,
    LedgerStore,
    ReplayedReceipt,
    verify_ledger,
)
from marketplace.ledger.operations import (
    HoldResult,
    PlaceHold,
    ReleaseHold,
    ReleaseResult,
    Settle,
    SettlementRecord,
    SettleSegment,
)
from marketplace.ledger.writer import GroupCommitWriter
from marketplace.ledger.writer_cache import available

from .conftest import make_client, row_counts

NODE_ID = "12D3KooWcachetestnode"
EXPIRES_MS = 10**15


def _settle(request_id: str, account_id: str, cost: int, worker_id: str | None = None) -> Settle:
    segment = SettleSegment(
        worker_id or f"{request_id}#0", 0, NODE_ID, "m", 10, 20, cost, b"r", b"k", b"s", b"c", b"t"
    )
    return Settle(request_id, account_id, "m", 1000, (segment,), cost)


async def _batch(writer: GroupCommitWriter, *ops: Any) -> list[Any]:
    """Submit ``ops`` together (one batch) and collect answers or errors."""
    return await asyncio.gather(*(writer.submit(op) for op in ops), return_exceptions=True)


async def test_retried_settlement_in_a_remembered_batch_answers_the_first(
    store: LedgerStore, writer: GroupCommitWriter
) -> None:
    client = make_client(store, deposit=10_000)
    first = await _batch(
        writer, PlaceHold("r1", client, 500, EXPIRES_MS, "t"), _settle("r1", client, 321)
    )
    assert isinstance(first[1], SettlementRecord) and first[1].created
    counts = row_counts(store)
    hits = writer.cache.hits
    # Same settlement and same hold again, plus a new request in the same batch.
    again = await _batch(
        writer,
        PlaceHold("r1", client, 500, EXPIRES_MS, "t"),
        _settle("r1", client, 321),
        PlaceHold("r2", client, 100, EXPIRES_MS, "t"),
        _settle("r2", client, 50),
    )
    assert writer.cache.hits > hits  # the batch did start from memory
    # A settled request's id holds no more (a new request under it would go unpaid).
    assert isinstance(again[0], IdConflict) and "used by an earlier request" in str(again[0])
    assert isinstance(again[1], SettlementRecord)
    assert not again[1].created and again[1].cost_micro_usd == 321
    assert isinstance(again[3], SettlementRecord) and again[3].created
    after = row_counts(store)
    assert after["settlements"] == counts["settlements"] + 1
    assert after["receipts"] == counts["receipts"] + 1
    assert store.account(client).available_micro_usd == 10_000 - 321 - 50
    report = verify_ledger(store.engine)
    assert report.ok, report.problems


async def test_replayed_receipt_is_refused_from_memory_and_the_batch_goes_on(
    store: LedgerStore, writer: GroupCommitWriter
) -> None:
    client = make_client(store, deposit=10_000)
    await _batch(writer, PlaceHold("a", client, 500, EXPIRES_MS, "t"), _settle("a", client, 200))
    answers = await _batch(
        writer,
        PlaceHold("b", client, 500, EXPIRES_MS, "t"),
        _settle("b", client, 200, worker_id="a#0"),  # a's receipt, again
        PlaceHold("c", client, 500, EXPIRES_MS, "t"),
        _settle("c", client, 100),
    )
    assert isinstance(answers[1], ReplayedReceipt)
    assert isinstance(answers[3], SettlementRecord) and answers[3].created
    # b's hold stays until it is released; then only a and c were charged.
    released = await _batch(writer, ReleaseHold("b"))
    assert released[0] == ReleaseResult("b", 500, "released")
    assert store.account(client).available_micro_usd == 10_000 - 200 - 100
    assert verify_ledger(store.engine).ok


async def test_head_moved_by_another_writer_is_read_again(
    store: LedgerStore, writer: GroupCommitWriter
) -> None:
    client = make_client(store, deposit=1_000)
    await _batch(writer, PlaceHold("h1", client, 900, EXPIRES_MS, "t"), _settle("h1", client, 900))
    assert (await _batch(writer, PlaceHold("h2", client, 500, EXPIRES_MS, "t")))[0].__class__ is (
        InsufficientBalance
    )
    misses = writer.cache.misses
    store.deposit(client, 5_000)  # the operator's deposit moves the journal head
    answers = await _batch(writer, PlaceHold("h3", client, 5_000, EXPIRES_MS, "t"))
    assert answers[0] == HoldResult("h3", client, 5_000, created=True)
    assert writer.cache.misses == misses + 1
    assert store.account(client).available_micro_usd == 100
    assert verify_ledger(store.engine).ok


async def test_remembered_accounts_leave_the_collectors_sight(
    store: LedgerStore, writer: GroupCommitWriter
) -> None:
    """The cache keeps accounts for the life of the process: once a collection has seen
    them, full collections must no longer walk them (nor their balances)."""
    clients = [make_client(store, f"gc-{i}", deposit=10_000) for i in range(5)]
    for i, client in enumerate(clients):
        answers = await _batch(
            writer,
            PlaceHold(f"gc{i}", client, 500, EXPIRES_MS, "t"),
            _settle(f"gc{i}", client, 100 + i),
        )
        assert isinstance(answers[1], SettlementRecord)
    states = list(writer.cache.accounts.values())
    assert len(states) >= len(clients) + 1  # the clients, the platform and the provider
    gc.collect()
    assert [state for state in states if gc.is_tracked(state)] == []
    # and the remembered balances are still the database's
    for client in clients:
        assert available(writer.cache.accounts[client]) == store.account(client).available_micro_usd
