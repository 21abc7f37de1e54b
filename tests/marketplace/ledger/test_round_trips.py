"""How many times a settlement batch waits for PostgreSQL: every wait is a round trip to
the server, paid by every request in the batch. Counted from libpq's protocol trace of the
writer's connection (a ReadyForQuery or CopyInResponse from the server ends each wait)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg import pq

from marketplace.ledger import LedgerStore, LedgerUnavailable, applier, verify_ledger
from marketplace.ledger.operations import PlaceHold, Settle, SettleSegment
from marketplace.ledger.writer import Committer

from .conftest import make_client, row_counts

EXPIRES_MS = 10**15
NODE_ID = "12D3KooWroundtripnode"


def _settle(request_id: str, client: str, key: str) -> Settle:
    segment = SettleSegment(
        f"{request_id}#0", 0, NODE_ID, "m", 10, 20, 300, b"r", b"k", b"s", b"c", b"t"
    )
    return Settle(request_id, client, "m", 1000, (segment,), 500, api_key_id=key)


def _server_answers(trace: str) -> list[str]:
    """The server's messages that end a wait of the client, in order."""
    return [
        line.split("\t")[2].strip()
        for line in trace.splitlines()
        if line.startswith("B\t")
        and line.split("\t")[2].strip() in ("ReadyForQuery", "CopyInResponse")
    ]


@pytest.fixture
def committer(store: LedgerStore) -> Iterator[Committer]:
    instance = Committer(store.engine)
    yield instance
    instance.close()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_settlement_batch_waits_for_the_server_twelve_times(
    store: LedgerStore, committer: Committer
) -> None:
    """BEGIN, the head lock, four COPYs (two waits each), one pipeline for the closed
    holds, balances, key spend and journal head, and COMMIT: 12. Each of those four
    statements waiting on its own made it 15."""
    client = make_client(store)
    key = store.issue_key(client, "k").key.id
    committer.commit([PlaceHold("r0", client, 500, EXPIRES_MS, "t", key)])
    # the node's provider account is created here, with its first earning
    committer.commit(
        [_settle("r0", client, key), PlaceHold("r1", client, 500, EXPIRES_MS, "t", key)]
    )
    driver = committer._connection().connection.driver_connection
    with tempfile.NamedTemporaryFile("w+", suffix=".trace") as file:
        driver.pgconn.trace(file.fileno())  # type: ignore[union-attr]
        driver.pgconn.set_trace_flags(  # type: ignore[union-attr]
            pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE
        )
        try:
            answers, _ = committer.commit(
                [_settle("r1", client, key), PlaceHold("r2", client, 500, EXPIRES_MS, "t", key)]
            )
        finally:
            driver.pgconn.untrace()  # type: ignore[union-attr]
        os.fsync(file.fileno())
        trace = Path(file.name).read_text()
    assert answers[0].created and answers[1].created
    waits = _server_answers(trace)
    assert waits.count("CopyInResponse") == 4  # transfers, open holds, settlements, receipts
    assert len(waits) == 12, trace
    assert store.key_spent_micro_usd(key) == 2 * answers[0].cost_micro_usd


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_statement_failing_in_the_pipeline_rolls_back_the_whole_batch(
    store: LedgerStore, committer: Committer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server refuses one pipelined statement: the batch's COPYs before it are rolled
    back with it, the operations are answered with the error, and the connection goes on
    to commit the next batch."""
    client = make_client(store)
    key = store.issue_key(client, "k").key.id
    committer.commit([PlaceHold("r0", client, 500, EXPIRES_MS, "t", key)])
    before = row_counts(store)
    monkeypatch.setattr(
        applier, "_KEY_SPEND_ADD_PG", applier._KEY_SPEND_ADD_PG.replace("key_spend", "no_such")
    )
    answers, _ = committer.commit([_settle("r0", client, key)])
    assert isinstance(answers[0], LedgerUnavailable) and "no_such" in str(answers[0])
    assert row_counts(store) == before
    monkeypatch.undo()
    answers, _ = committer.commit([_settle("r0", client, key)])
    assert answers[0].created
    assert row_counts(store)["settlements"] == before["settlements"] + 1
    assert verify_ledger(store.engine).ok
