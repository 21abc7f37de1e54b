"""`verify_ledger` catches tampering and names the first bad entry; migrations build the
schema from empty; the journal's canonical encoding is the documented one."""

from __future__ import annotations

from sqlalchemy import inspect, text

from marketplace.ledger import LedgerSettings, LedgerStore, verify_ledger
from marketplace.ledger.database import create_ledger_engine, migrate
from marketplace.ledger.journal import CHAINED_FIELDS, canonical
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
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0002"
        platform = conn.execute(text("SELECT id FROM accounts ORDER BY id")).scalars().all()
    assert platform == [
        "platform.clearing",
        "platform.deposits",
        "platform.fees",
        "platform.lease_escrow",
        "platform.payouts",
    ]
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
