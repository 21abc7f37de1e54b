"""`verify_ledger` catches tampering and names the first bad entry; migrations build the
schema from empty; the journal's canonical encoding is the documented one."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlmodel import SQLModel

import marketplace.ledger.models  # noqa: F401  (the tables, on SQLModel.metadata)
from marketplace.ledger import LedgerSettings, LedgerStore, verify_ledger
from marketplace.ledger.database import create_ledger_engine, migrate
from marketplace.ledger.journal import CHAINED_FIELDS, GENESIS_HASH, canonical, entry_hash
from marketplace.ledger.operations import (
    ChargeLease,
    CreateLease,
    PlaceHold,
    ReleaseHold,
    Settle,
    SettleSegment,
)
from tests.marketplace.ledger.conftest import make_client


def _journal(store: LedgerStore) -> list[tuple[int, str]]:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT seq, id FROM transfers ORDER BY seq"))]


def test_altered_amount_is_named(store: LedgerStore) -> None:
    client = make_client(store, deposit=100)
    store.deposit(client, 200)
    store.deposit(client, 300)
    assert verify_ledger(store.engine).ok
    seq, transfer_id = _journal(store)[1]
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE transfers SET amount = 1 WHERE seq = :s"), {"s": seq})
    report = verify_ledger(store.engine)
    assert not report.ok
    assert (report.first_bad_seq, report.first_bad_id) == (seq, transfer_id)


def test_removed_entry_and_edited_balance_are_caught(store: LedgerStore) -> None:
    client = make_client(store, deposit=100)
    store.deposit(client, 200)
    store.deposit(client, 300)
    _first, second, _ = _journal(store)
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM transfers WHERE seq = :s"), {"s": second[0]})
    report = verify_ledger(store.engine)
    assert not report.ok and report.first_bad_seq == second[0] + 1
    other = make_client(store, "bob", deposit=0)
    with store.engine.begin() as conn:
        conn.execute(
            text("UPDATE balances SET credits_posted = 5 WHERE account_id = :a"), {"a": other}
        )
    assert any("bob" in p or other in p for p in verify_ledger(store.engine).problems)


def test_migrations_build_the_schema_from_empty(database_url: str) -> None:
    engine = create_ledger_engine(LedgerSettings(database_url=database_url))
    migrate(engine)
    migrate(engine)  # a second run is a no-op
    tables = set(inspect(engine).get_table_names())
    assert {
        "accounts",
        "transfers",
        "balances",
        "api_keys",
        "settlements",
        "receipts",
        "open_holds",
        "leases",
        "payout_batches",
        "journal_head",
        "key_spend",
        "alembic_version",
    } <= tables
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0005"
        platform = conn.execute(text("SELECT id FROM accounts ORDER BY id")).scalars().all()
    assert platform == [
        "platform.clearing",
        "platform.deposits",
        "platform.fees",
        "platform.lease_escrow",
        "platform.payouts",
    ]
    engine.dispose()


def test_the_migrations_build_exactly_the_models_schema(database_url: str) -> None:
    """Alembic's autogenerate finds nothing to change after every migration ran: a
    column added to a model without a migration (or the reverse) fails here."""
    engine = create_ledger_engine(LedgerSettings(database_url=database_url))
    migrate(engine)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []
    engine.dispose()


def test_canonical_encoding_is_the_documented_field_order() -> None:
    entry = {name: f"v{i}" for i, name in enumerate(CHAINED_FIELDS)}
    entry["pending_id"] = None
    expected = "\n".join("" if entry[n] is None else str(entry[n]) for n in CHAINED_FIELDS)
    assert canonical(entry) == expected.encode()


def test_key_spend_migration_fills_from_settlements(database_url: str) -> None:
    """A database at 0001 with settled requests: 0002 records each key's spend."""
    engine = create_ledger_engine(LedgerSettings(database_url=database_url))
    migrate(engine, "0001")
    columns = (
        "request_id, account_id, api_key_id, model, lease_id, input_tokens, output_tokens, "
        "hold_micro_usd, cost_micro_usd, fee_micro_usd, capped_micro_usd, created_at_unix_ms"
    )
    rows = [("r1", "k1", 30), ("r2", "k1", 12), ("r3", "k2", 5), ("r4", None, 99)]
    with engine.begin() as conn:
        for request_id, key_id, cost in rows:
            conn.execute(
                text(
                    f"INSERT INTO settlements ({columns}) VALUES (:r, 'a', :k, 'm', NULL, "
                    "1, 1, 100, :c, 0, 0, 1)"
                ),
                {"r": request_id, "k": key_id, "c": cost},
            )
    migrate(engine)
    with engine.connect() as conn:
        spend = dict(conn.execute(text("SELECT api_key_id, spent_micro_usd FROM key_spend")).all())
    assert spend == {"k1": 42, "k2": 5}
    engine.dispose()


def test_limited_key_migration_indexes_only_the_holds_of_limited_keys(database_url: str) -> None:
    """A database at 0004 with open holds: 0005 marks those of keys with a spend limit,
    and reading a key's holds by that column uses the partial index."""
    engine = create_ledger_engine(LedgerSettings(database_url=database_url))
    migrate(engine, "0004")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO accounts (id, kind, name, node_id, must_not_overdraw, "
                "created_at_unix_ms) VALUES ('a', 'client', 'alice', NULL, true, 1)"
            )
        )
        for key_id, limit in (("limited", 500), ("open", None)):
            conn.execute(
                text(
                    "INSERT INTO api_keys (id, account_id, name, secret_sha256, "
                    "spend_limit_micro_usd, rate_limit_per_minute, created_at_unix_ms, "
                    "revoked_at_unix_ms) VALUES (:k, 'a', :k, :h, :l, NULL, 1, NULL)"
                ),
                {"k": key_id, "h": key_id * 4, "l": limit},
            )
        for n, key_id in enumerate(("limited", "open", None, "limited")):
            conn.execute(
                text(
                    "INSERT INTO open_holds (transfer_id, request_id, account_id, api_key_id, "
                    "amount, expires_at_unix_ms, owner) VALUES (:t, :r, 'a', :k, 10, 1, 'o')"
                ),
                {"t": f"hold:r{n}", "r": f"r{n}", "k": key_id},
            )
    migrate(engine)
    with engine.connect() as conn:
        marked = conn.execute(
            text("SELECT request_id, limited_key_id FROM open_holds ORDER BY request_id")
        ).all()
        assert [tuple(row) for row in marked] == [
            ("r0", "limited"),
            ("r1", None),
            ("r2", None),
            ("r3", "limited"),
        ]
        query = "SELECT SUM(amount) FROM open_holds WHERE limited_key_id IN ('limited', 'x')"
        if engine.dialect.name == "sqlite":
            plan = " ".join(str(row) for row in conn.execute(text(f"EXPLAIN QUERY PLAN {query}")))
        else:
            conn.execute(text("SET enable_seqscan = off"))  # a 4-row table is scanned else
            plan = " ".join(str(row) for row in conn.execute(text(f"EXPLAIN {query}")))
        assert "ix_open_holds_limited_key_id" in plan, plan
    engine.dispose()


def _rechain(store: LedgerStore) -> None:
    """What a careful forger does after editing entries: recompute every hash, the
    journal head, and every stored balance from the (edited) journal, so that only the
    audit's semantic checks can still tell."""
    with store.engine.begin() as conn:
        rows = [
            dict(r._mapping) for r in conn.execute(text("SELECT * FROM transfers ORDER BY seq"))
        ]
        sums: dict[str, list[int]] = {}
        pending: dict[str, int] = {}
        prev = GENESIS_HASH
        for entry in rows:
            digest = entry_hash(prev, entry)
            conn.execute(
                text("UPDATE transfers SET prev_hash = :p, hash = :h WHERE seq = :s"),
                {"p": prev, "h": digest, "s": entry["seq"]},
            )
            prev = digest
            debit = sums.setdefault(entry["debit_account_id"], [0, 0, 0, 0])
            credit = sums.setdefault(entry["credit_account_id"], [0, 0, 0, 0])
            amount, phase = entry["amount"], entry["phase"]
            if phase == "single":
                debit[0] += amount
                credit[1] += amount
            elif phase == "pending":
                debit[2] += amount
                credit[3] += amount
                pending[entry["id"]] = amount
            else:
                held = pending.pop(entry["pending_id"])
                debit[2] -= held
                credit[3] -= held
                if phase == "post":
                    debit[0] += amount
                    credit[1] += amount
        conn.execute(
            text("UPDATE journal_head SET seq = :s, hash = :h WHERE id = 1"),
            {"s": rows[-1]["seq"], "h": prev},
        )
        for account_id, (dp, cp, dq, cq) in sums.items():
            conn.execute(
                text(
                    "UPDATE balances SET debits_posted = :dp, credits_posted = :cp, "
                    "debits_pending = :dq, credits_pending = :cq WHERE account_id = :a"
                ),
                {"dp": dp, "cp": cp, "dq": dq, "cq": cq, "a": account_id},
            )


def _caught_after(
    store: LedgerStore,
    sql: str,
    needle: str,
    params: dict[str, object] | None = None,
    *,
    rechain: bool = False,
) -> None:
    """Run the tampering ``sql`` (then re-chain, if asked): verify must fail, naming
    ``needle`` among its problems."""
    with store.engine.begin() as conn:
        conn.execute(text(sql), params or {})
    if rechain:
        _rechain(store)
    report = verify_ledger(store.engine)
    assert not report.ok
    assert any(needle in p for p in report.problems), report.problems


def _hold_and_release(store: LedgerStore, client: str, request_id: str, amount: int) -> None:
    store.apply([PlaceHold(request_id, client, amount, 10**15, "t")])
    store.apply([ReleaseHold(request_id)])


def test_an_edited_entry_with_a_recomputed_hash_breaks_the_next_link(store: LedgerStore) -> None:
    """An entry edited and re-hashed on its own still fails: the next entry's prev_hash
    names the old hash (the chain, not only each entry's own hash, is checked)."""
    client = make_client(store, deposit=100)
    store.deposit(client, 200)
    store.deposit(client, 300)
    _first, (seq, _edited_id), (next_seq, next_id) = _journal(store)
    with store.engine.begin() as conn:
        row = dict(
            conn.execute(text("SELECT * FROM transfers WHERE seq = :s"), {"s": seq}).one()._mapping
        )
        row["created_at_unix_ms"] += 1  # no balance changes: only the chain can tell
        conn.execute(
            text("UPDATE transfers SET created_at_unix_ms = :c, hash = :h WHERE seq = :s"),
            {
                "c": row["created_at_unix_ms"],
                "h": entry_hash(bytes(row["prev_hash"]), row),
                "s": seq,
            },
        )
    report = verify_ledger(store.engine)
    assert not report.ok
    assert (report.first_bad_seq, report.first_bad_id) == (next_seq, next_id)


def test_a_journal_head_behind_the_journal_is_caught(store: LedgerStore) -> None:
    """The head row must name the last entry (a truncated or stale head is tampering)."""
    make_client(store, deposit=100)
    assert verify_ledger(store.engine).ok
    _caught_after(store, "UPDATE journal_head SET seq = seq - 1 WHERE id = 1", "journal head")


def test_a_key_spend_that_differs_from_its_settlements_is_caught(store: LedgerStore) -> None:
    """Recorded key spend must equal the sum of that key's settlement costs."""
    sql = "INSERT INTO key_spend (api_key_id, spent_micro_usd) VALUES ('k1', 5)"
    _caught_after(store, sql, "api key k1")


def test_an_open_holds_index_that_differs_from_the_journal_is_caught(store: LedgerStore) -> None:
    """A deleted open-hold row (the money would stay held forever) is reported."""
    client = make_client(store, deposit=1_000)
    store.apply([PlaceHold("r1", client, 400, 10**15, "t")])
    assert verify_ledger(store.engine).ok
    _caught_after(store, "DELETE FROM open_holds", "open holds")


def test_a_rechained_overdraft_is_caught(store: LedgerStore) -> None:
    """A client account below zero is reported even when hashes and balances agree."""
    client = make_client(store, deposit=100)
    sql = (
        "UPDATE transfers SET debit_account_id = :c, credit_account_id = "
        "'platform.deposits' WHERE credit_account_id = :c"
    )
    _caught_after(store, sql, "overdrawn", {"c": client}, rechain=True)


def test_a_rechained_post_above_its_hold_is_caught(store: LedgerStore) -> None:
    """A post may not take more than its pending transfer held."""
    client = make_client(store, deposit=1_000)
    _hold_and_release(store, client, "r1", 100)
    sql = "UPDATE transfers SET phase = 'post', amount = 200 WHERE phase = 'void'"
    _caught_after(store, sql, "posts 200 of a 100 hold", rechain=True)


def _settle_one(store: LedgerStore, client: str, node_id: str, cost: int) -> None:
    """A held request settled at ``cost`` (fee 10 %): the charge goes through clearing to
    the node's provider account and the platform's fees."""
    segment = SettleSegment("r1#0", 0, node_id, "m", 10, 20, cost, b"r", b"k", b"s", b"ck", b"cs")
    store.apply([PlaceHold("r1", client, 2 * cost, 10**15, "t")])
    store.apply([Settle("r1", client, "m", 1000, (segment,), 2 * cost)])


def _problems_with_an_earning_one_short(store: LedgerStore) -> list[str]:
    """verify's problems once every earning is one micro-USD short and the journal is
    re-chained (hashes, head and balances made to agree); verify passes before."""
    assert verify_ledger(store.engine).ok
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE transfers SET amount = amount - 1 WHERE kind = 'earning'"))
    _rechain(store)
    return verify_ledger(store.engine).problems


def test_a_charge_not_passed_on_in_full_is_caught(store: LedgerStore) -> None:
    """An earning one micro-USD short, with every hash, the head and every balance made
    to agree: the journal still sums to zero, so only clearing's remainder shows it."""
    client = make_client(store, deposit=10_000)
    _settle_one(store, client, "node-1", 1_000)  # earning 900, fee 100
    assert _problems_with_an_earning_one_short(store) == [
        "account platform.clearing keeps 1 micro-USD posted: a charge was not passed on in "
        "full as earnings and fee"
    ]


def test_lease_escrow_must_hold_what_active_leases_have_not_been_charged(
    store: LedgerStore,
) -> None:
    """A lease's period earning one micro-USD short (rechained) leaves the escrow holding
    more than the active lease's unspent prepayment."""
    client = make_client(store, deposit=10_000_000)
    start = 1_000_000
    store.apply([CreateLease("l1", client, "node-1", 1, 1_000_000, 2, 1800, 1000, start)])
    store.apply([ChargeLease("l1", start + 1_800_000)])  # one period of four
    assert _problems_with_an_earning_one_short(store) == [
        "account platform.lease_escrow holds 1500001 micro-USD but active leases have "
        "1500000 prepaid and not yet charged"
    ]
