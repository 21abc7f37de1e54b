"""The writer's memory between batches: a batch that starts from memory skips the look-ups
of earlier rows, so retries and replays must still be answered exactly as before (the
unique keys refuse the duplicate, the batch is re-read and re-applied), and a journal head
moved by someone else must make the writer read everything again. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import gc
from dataclasses import replace
from typing import Any

from sqlalchemy import event, text

from marketplace.ledger import (
    IdConflict,
    InsufficientBalance,
    LedgerStore,
    ReplayedReceipt,
    SpendLimitExceeded,
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
    caught_up, misses = writer.cache.caught_up, writer.cache.misses
    store.deposit(client, 5_000)  # the operator's deposit moves the journal head
    answers = await _batch(writer, PlaceHold("h3", client, 5_000, EXPIRES_MS, "t"))
    assert answers[0] == HoldResult("h3", client, 5_000, created=True)
    assert (writer.cache.caught_up, writer.cache.misses) == (caught_up + 1, misses)
    assert store.account(client).available_micro_usd == 100
    assert verify_ledger(store.engine).ok


async def test_what_another_writer_changed_is_forgotten_and_the_rest_kept(
    store: LedgerStore, writer: GroupCommitWriter
) -> None:
    """Two writers (two coordinators) on one database. The second releases a hold the
    first remembers as open and spends from an account the first remembers: the first
    forgets exactly those (it reads them again) and keeps the other account it knows."""
    client, other = make_client(store, deposit=1_000), make_client(store, "other", deposit=1_000)
    await _batch(
        writer,
        PlaceHold("w1", client, 600, EXPIRES_MS, "t"),
        PlaceHold("w2", other, 100, EXPIRES_MS, "t"),
    )
    second = GroupCommitWriter(store.engine)
    second.start()
    try:
        assert (
            await _batch(second, ReleaseHold("w1"), PlaceHold("x1", client, 900, EXPIRES_MS, "u"))
        )[0] == ReleaseResult("w1", 600, "released")
    finally:
        await second.close()
    caught_up, misses = writer.cache.caught_up, writer.cache.misses
    answers = await _batch(
        writer,
        ReleaseHold("w1"),  # released already: not answered from the stale memory
        PlaceHold("w3", client, 200, EXPIRES_MS, "t"),  # 100 left, not the 400 remembered
        PlaceHold("w4", other, 900, EXPIRES_MS, "t"),  # from memory: 900 left
    )
    assert answers[0] == ReleaseResult("w1", 0, "already_released")
    assert isinstance(answers[1], InsufficientBalance)
    assert answers[2] == HoldResult("w4", other, 900, created=True)
    assert (writer.cache.caught_up, writer.cache.misses) == (caught_up + 1, misses)
    assert other in writer.cache.accounts
    assert store.account(client).available_micro_usd == 100
    assert store.account(other).available_micro_usd == 0
    assert verify_ledger(store.engine).ok


LIMIT = 1_000


def _limited_hold(request_id: str, account_id: str, amount: int, owner: str = "t") -> PlaceHold:
    return PlaceHold(request_id, account_id, amount, EXPIRES_MS, owner, "key-1", LIMIT)


async def test_a_limited_keys_usage_is_remembered_between_batches(
    store: LedgerStore, writer: GroupCommitWriter
) -> None:
    """A key's spend and open holds are read once; later batches keep them in step and
    check the limit from memory, as they do balances."""
    client = make_client(store, deposit=10_000)
    await _batch(writer, _limited_hold("k1", client, 600))
    settle = replace(_settle("k1", client, 500), api_key_id="key-1", spend_limit_micro_usd=LIMIT)
    await _batch(writer, settle)  # spent 500, nothing held
    statements: list[str] = []
    listener = lambda *args: statements.append(args[2])  # noqa: E731  (conn, cursor, statement, ...)
    event.listen(store.engine, "before_cursor_execute", listener)
    try:
        answers = await _batch(
            writer, _limited_hold("k2", client, 600), _limited_hold("k3", client, 500)
        )
    finally:
        event.remove(store.engine, "before_cursor_execute", listener)
    assert isinstance(answers[0], SpendLimitExceeded)  # 500 + 600 > 1,000
    assert answers[1] == HoldResult("k3", client, 500, created=True)
    assert not [s for s in statements if "open_holds" in s and s.lstrip().startswith("SELECT")]
    assert writer.cache.key_usage["key-1"][0] == 500
    assert store.key_usage("key-1") == (500, 500)


async def test_a_limited_keys_usage_is_read_again_after_another_writer(
    store: LedgerStore, writer: GroupCommitWriter
) -> None:
    """Another coordinator's hold on the key counts against its limit here at once:
    the first writer forgets the usage it remembered when the journal moved on."""
    client = make_client(store, deposit=10_000)
    assert (await _batch(writer, _limited_hold("a1", client, 300)))[0].created
    second = GroupCommitWriter(store.engine)
    second.start()
    try:
        assert (await _batch(second, _limited_hold("b1", client, 600, owner="u")))[0].created
    finally:
        await second.close()
    [answer] = await _batch(writer, _limited_hold("a2", client, 300))
    assert isinstance(answer, SpendLimitExceeded)  # 300 + 600 + 300 > 1,000
    assert store.key_usage("key-1") == (0, 900)
    assert verify_ledger(store.engine).ok


async def test_a_provider_paid_through_another_writer_is_read_again(
    store: LedgerStore, writer: GroupCommitWriter
) -> None:
    """The provider account of a node the first writer knows is paid through the second:
    the first forgets the account's balance but still knows whose it is, and reads it
    again (before, its next settlement for that node found no such account)."""
    client = make_client(store, deposit=10_000)
    await _batch(writer, PlaceHold("p1", client, 500, EXPIRES_MS, "t"), _settle("p1", client, 100))
    second = GroupCommitWriter(store.engine)
    second.start()
    try:
        await _batch(
            second, PlaceHold("p2", client, 500, EXPIRES_MS, "u"), _settle("p2", client, 200)
        )
    finally:
        await second.close()
    answers = await _batch(
        writer, PlaceHold("p3", client, 500, EXPIRES_MS, "t"), _settle("p3", client, 300)
    )
    assert isinstance(answers[1], SettlementRecord), answers[1]
    provider = writer.cache.provider_by_node[NODE_ID]
    assert store.account(provider).available_micro_usd == 540  # 600 less the 10 % fee
    assert verify_ledger(store.engine).ok


async def test_a_journal_that_no_longer_has_the_writers_head_is_read_again(
    store: LedgerStore, writer: GroupCommitWriter
) -> None:
    """The entry this writer last committed is not in the journal as it was (a database
    restored from an older backup and written to since): nothing it remembers is
    trusted."""
    client = make_client(store, deposit=1_000)
    await _batch(writer, PlaceHold("t1", client, 100, EXPIRES_MS, "t"))
    head = writer.cache.head_seq
    store.deposit(client, 5)  # the head moves on
    with store.engine.begin() as conn:
        conn.execute(
            text("UPDATE transfers SET hash = :h WHERE seq = :s"), {"h": b"x" * 32, "s": head}
        )
    misses = writer.cache.misses
    await _batch(writer, PlaceHold("t2", client, 100, EXPIRES_MS, "t"))
    assert writer.cache.misses == misses + 1


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
