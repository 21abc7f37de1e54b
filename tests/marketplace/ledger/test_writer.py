"""The group-commit writer: what one loop turn submits commits as one batch (split at
``batch_max``), ``drain`` waits for everything submitted, ``close`` commits what is
queued, and a batch that raises fails alone. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from marketplace.ledger import InsufficientBalance, LedgerStore, LedgerUnavailable, verify_ledger
from marketplace.ledger.database import WRITE_OPTION
from marketplace.ledger.operations import HoldResult, Operation, PlaceHold, ReleaseHold
from marketplace.ledger.writer import GroupCommitWriter

from .conftest import make_client, row_counts

EXPIRES_MS = 10**15


class _GatedCommits:
    """Wraps the writer's committer: records each batch's size, and holds the first batch
    (on the database thread) until ``gate`` is set."""

    def __init__(self, writer: GroupCommitWriter) -> None:
        self.gate = threading.Event()
        self.started: list[int] = []
        self._commit = writer._committer.commit
        writer._committer.commit = self  # type: ignore[method-assign]

    def __call__(self, ops: Sequence[Operation]) -> Any:
        self.started.append(len(ops))
        if len(self.started) == 1:
            assert self.gate.wait(10), "the test never opened the gate"
        return self._commit(ops)


def _holds(writer: GroupCommitWriter, client: str, prefix: str, count: int) -> list[Any]:
    return [
        writer.submit(PlaceHold(f"{prefix}{i}", client, 10, EXPIRES_MS, "t")) for i in range(count)
    ]


async def test_one_loop_turn_commits_as_one_batch(
    store: LedgerStore, writer: GroupCommitWriter
) -> None:
    client = make_client(store)
    before = writer.batches
    answers = await asyncio.gather(*_holds(writer, client, "r", 50))
    assert writer.batches == before + 1
    assert answers == [HoldResult(f"r{i}", client, 10, created=True) for i in range(50)]
    assert row_counts(store)["open_holds"] == 50


async def test_batch_max_splits_what_one_turn_queued(store: LedgerStore) -> None:
    client = make_client(store)
    writer = GroupCommitWriter(store.engine, batch_max=16)
    writer.start()
    try:
        answers = await asyncio.gather(*_holds(writer, client, "r", 50))
    finally:
        await writer.close()
    assert writer.batches == 4  # 16 + 16 + 16 + 2
    assert all(isinstance(a, HoldResult) and a.created for a in answers)
    assert row_counts(store)["open_holds"] == 50
    assert verify_ledger(store.engine).ok


async def test_drain_waits_for_every_operation_even_when_the_last_is_cancelled(
    store: LedgerStore, writer: GroupCommitWriter
) -> None:
    client = make_client(store)
    commits = _GatedCommits(writer)
    futures = _holds(writer, client, "r", 3)
    futures[-1].cancel()  # its caller gave up; the operation is still committed
    drained = asyncio.ensure_future(writer.drain())
    await asyncio.sleep(0.05)
    assert not drained.done() and not futures[0].done()
    commits.gate.set()
    async with asyncio.timeout(10):
        await drained
    assert futures[0].done() and futures[1].done()
    assert row_counts(store)["open_holds"] == 3


async def test_close_commits_what_is_queued_then_refuses(store: LedgerStore) -> None:
    client = make_client(store)
    writer = GroupCommitWriter(store.engine)
    writer.start()
    futures = _holds(writer, client, "r", 5)
    await writer.close()
    assert all(f.done() and f.result().created for f in futures)
    with pytest.raises(LedgerUnavailable, match="not running"):
        writer.submit(PlaceHold("late", client, 10, EXPIRES_MS, "t"))
    assert row_counts(store)["open_holds"] == 5


def _first_commit_fails(
    writer: GroupCommitWriter, before: Callable[[], None] | None = None
) -> None:
    """The writer's next commit raises (after calling ``before``, if given); later
    commits go through."""
    commit = writer._committer.commit
    calls = 0

    def failing_first(ops: Sequence[Operation]) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            if before is not None:
                before()
            raise RuntimeError("disk on fire")
        return commit(ops)

    writer._committer.commit = failing_first  # type: ignore[method-assign]


async def test_a_batch_that_raises_fails_alone(
    store: LedgerStore, writer: GroupCommitWriter
) -> None:
    client = make_client(store)
    _first_commit_fails(writer)
    failed = await asyncio.gather(*_holds(writer, client, "a", 2), return_exceptions=True)
    assert all(isinstance(e, LedgerUnavailable) and "disk on fire" in str(e) for e in failed)
    answers = await asyncio.gather(*_holds(writer, client, "b", 2))
    assert all(a.created for a in answers)
    assert row_counts(store)["open_holds"] == 2


async def test_a_failing_batch_does_not_fail_the_batch_queued_behind_it(
    store: LedgerStore, writer: GroupCommitWriter
) -> None:
    """Operations queued while a batch is committing are not failed with it."""
    client = make_client(store)
    gate = threading.Event()
    committing = threading.Event()

    def held_at_the_gate() -> None:
        committing.set()
        assert gate.wait(10)

    _first_commit_fails(writer, before=held_at_the_gate)
    first = _holds(writer, client, "a", 2)
    assert await asyncio.to_thread(committing.wait, 10)  # the first batch, held at the gate
    second = _holds(writer, client, "b", 2)
    gate.set()
    failed = await asyncio.gather(*first, return_exceptions=True)
    assert all(isinstance(e, LedgerUnavailable) for e in failed)
    answers = await asyncio.gather(*second)
    assert all(a.created for a in answers)
    assert row_counts(store)["open_holds"] == 2


async def test_the_writer_refuses_a_hold_above_the_available_balance(
    store: LedgerStore, writer: GroupCommitWriter
) -> None:
    """The writer's own check, not only the in-memory one in front of it: a hold one
    micro-USD above what the account has is refused and writes nothing, and a hold of
    exactly the balance is accepted (two coordinators on one database rely on this)."""
    client = make_client(store, deposit=1_000)
    over = writer.submit(PlaceHold("r1", client, 1_001, 10**15, "t"))
    with pytest.raises(InsufficientBalance, match="need 1001"):
        await over
    assert row_counts(store)["open_holds"] == 0
    assert (await writer.submit(PlaceHold("r2", client, 1_000, 10**15, "t"))).created
    with pytest.raises(InsufficientBalance):
        await writer.submit(PlaceHold("r3", client, 1, 10**15, "t"))
    assert row_counts(store)["open_holds"] == 1


def test_the_sweeper_release_skips_a_hold_not_yet_due(store: LedgerStore) -> None:
    """The sweeper's release carries the time it judged holds by: a hold that expires
    later is left alone (answer "not_due"); one already past it is expired."""
    client = make_client(store, deposit=1_000)
    store.apply(
        [
            PlaceHold("late", client, 300, 2_000_000, "t"),
            PlaceHold("due", client, 200, 1_000_000, "t"),
        ]
    )
    late, due = store.apply(
        [
            ReleaseHold("late", expire=True, only_if_expired_at_unix_ms=1_500_000),
            ReleaseHold("due", expire=True, only_if_expired_at_unix_ms=1_500_000),
        ]
    )
    assert (late.status, late.released_micro_usd) == ("not_due", 0)
    assert (due.status, due.released_micro_usd) == ("expired", 200)
    assert [h["request_id"] for h in store.open_holds()] == ["late"]
    assert verify_ledger(store.engine).ok


def test_a_batch_the_database_keeps_refusing_is_retried_one_operation_at_a_time(
    store: LedgerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One operation the database refuses every time (here: whenever it is in the
    transaction) must not sink the operations batched with it: after the batch's
    attempts, each operation is committed alone, and only that one fails."""
    from marketplace.ledger import writer as writer_module

    client = make_client(store, deposit=1_000)
    real_apply = writer_module.apply_batch

    def refuse_poison(conn: Any, ops: Sequence[Operation], **kwargs: Any) -> Any:
        if any(getattr(op, "request_id", None) == "poison" for op in ops):
            raise sqlite3.OperationalError("disk I/O error")
        return real_apply(conn, ops, **kwargs)

    monkeypatch.setattr(writer_module, "apply_batch", refuse_poison)
    ops = [PlaceHold(rid, client, 100, 10**15, "t") for rid in ("a", "poison", "b")]
    with store.engine.connect().execution_options(**{WRITE_OPTION: True}) as conn:
        answers, _ = writer_module.commit_ops(conn, ops)
    assert [type(a).__name__ for a in answers] == ["HoldResult", "LedgerUnavailable", "HoldResult"]
    assert "disk I/O error" in str(answers[1])
    assert sorted(h["request_id"] for h in store.open_holds()) == ["a", "b"]
    assert verify_ledger(store.engine).ok
