"""Property: group commit is invisible. The same operations applied in one batch, or split
into any number of batches, give the same answers and the same balances, and the ledger
always verifies (hypothesis, SQLite)."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marketplace.ledger import LedgerSettings, LedgerStore, verify_ledger
from marketplace.ledger.applier import DEPOSITS
from marketplace.ledger.database import WRITE_OPTION
from marketplace.ledger.models import AccountKind, TransferKind
from marketplace.ledger.operations import (
    PlaceHold,
    PostTransfer,
    ReleaseHold,
    Settle,
    SettleSegment,
)
from marketplace.ledger.writer import commit_ops

NODE_ID = "12D3KooWnode"

op_specs = st.lists(
    st.tuples(
        st.sampled_from(["deposit", "hold", "release", "settle"]),
        st.integers(0, 1),  # client
        st.integers(0, 5),  # request number
        st.integers(1, 5_000),  # amount
    ),
    min_size=1,
    max_size=30,
)


def _ops(specs: list[tuple[str, int, int, int]], clients: list[str]) -> list[object]:
    ops: list[object] = []
    for index, (kind, client_no, request_no, amount) in enumerate(specs):
        client = clients[client_no]
        rid = f"r{client_no}-{request_no}"
        if kind == "deposit":
            ops.append(PostTransfer(f"d{index}", TransferKind.DEPOSIT, DEPOSITS, client, amount))
        elif kind == "hold":
            ops.append(PlaceHold(rid, client, amount, 10**15, "prop"))
        elif kind == "release":
            ops.append(ReleaseHold(rid))
        else:
            segment = SettleSegment(
                f"{rid}#0", 0, NODE_ID, "m", 1, 1, amount, b"r", b"k", b"s", b"ck", b"cs"
            )
            ops.append(Settle(rid, client, "m", 1000, (segment,), 0))
    return ops


def _run(ops: list[object], cuts: list[int]) -> tuple[list[str], dict[str, int]]:
    with tempfile.TemporaryDirectory() as folder:
        store = LedgerStore.open(LedgerSettings(database_url=f"sqlite:///{Path(folder) / 'p.db'}"))
        try:
            clients = [
                store.create_account(AccountKind.CLIENT, f"c{i}", account_id=f"acct_c{i}").id
                for i in range(2)
            ]
            assert clients == ["acct_c0", "acct_c1"]
            answers: list[str] = []
            bounds = sorted({0, len(ops), *(c % (len(ops) + 1) for c in cuts)})
            with store.engine.connect().execution_options(**{WRITE_OPTION: True}) as conn:
                for start, end in itertools.pairwise(bounds):
                    batch_answers, _ = commit_ops(conn, ops[start:end])  # type: ignore[arg-type]
                    answers.extend(
                        type(a).__name__ if isinstance(a, Exception) else _strip(a)
                        for a in batch_answers
                    )
            report = verify_ledger(store.engine)
            assert report.ok, report.problems
            balances = {
                a.id: a.available_micro_usd
                for a in store.accounts()
                if not a.id.startswith("platform.deposits")
            }
            for account_id, value in balances.items():
                assert value >= 0, (account_id, value)
            return answers, {k: v for k, v in balances.items() if not k.startswith("prov_")}
        finally:
            store.close()


def _strip(answer: object) -> str:
    text = repr(answer)
    return text.split("created_at")[0]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(op_specs, st.lists(st.integers(0, 40), max_size=6))
def test_batching_is_invisible(specs: list[tuple[str, int, int, int]], cuts: list[int]) -> None:
    ops = _ops(specs, ["acct_c0", "acct_c1"])
    one_batch = _run(ops, [])
    many_batches = _run(ops, cuts)
    assert one_batch == many_batches
