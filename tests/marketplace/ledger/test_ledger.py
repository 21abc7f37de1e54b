"""The request lifecycle through the async facade, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from marketplace.identity import Identity
from marketplace.ledger import (
    IdConflict,
    InsufficientBalance,
    InvalidAmount,
    Ledger,
    LedgerSettings,
    LedgerStore,
    Principal,
    RecoveryReport,
    verify_ledger,
)
from marketplace.ledger.errors import (
    ForgedReceipt,
    InvalidKey,
    LedgerUnavailable,
    MalformedKey,
    MiscountedReceipt,
    NodeLeased,
    PermissionDenied,
    RateLimited,
    ReplayedReceipt,
    RevokedKey,
    SpendLimitExceeded,
    UnknownAccount,
    WrongAccountKind,
)
from marketplace.ledger.models import AccountKind
from marketplace.ledger.rate_limit import KeyRateLimiter
from tests.marketplace.ledger.conftest import kill_ledger, make_client, receipt_for, row_counts


async def test_hold_settle_pays_provider_and_fee_and_releases_rest(
    ledger: Ledger, store: LedgerStore, node: Identity
) -> None:
    client = make_client(store, deposit=1_000_000)
    key = store.issue_key(client)
    principal = await ledger.authenticate(key.secret_key)
    hold = await ledger.place_hold("req-1", principal, 10_000)
    assert (await hold.durable).created
    assert store.account(client).available_micro_usd == 990_000
    signed, relayed = receipt_for(node, "req-1#0", 1000, 2000)  # 100000+600000 -> 700 µUSD
    outcome = await ledger.settle("req-1", [signed], [relayed])
    assert outcome.record.cost_micro_usd == 700
    assert outcome.record.fee_micro_usd == 70
    durable = await outcome.durable
    assert durable == outcome.record
    assert store.account(client).available_micro_usd == 999_300
    assert store.account(client).pending_debits_micro_usd == 0
    assert store.account(node.node_id).available_micro_usd == 630
    assert store.account("platform.fees").available_micro_usd == 70
    assert store.account("platform.clearing").posted_micro_usd == 0
    assert verify_ledger(store.engine).ok
    assert outcome.receipts[0].coordinator_signature
    usage = store.usage(client)
    assert [(u.model, u.requests, u.cost_micro_usd, u.api_key_id) for u in usage] == [
        ("smol", 1, 700, key.key.id)
    ]


async def test_settle_twice_charges_once(
    ledger: Ledger, store: LedgerStore, node: Identity
) -> None:
    client = make_client(store)
    await ledger.place_hold("req-1", client, 5_000)
    signed, relayed = receipt_for(node, "req-1#0", 100, 100)
    first = await ledger.settle("req-1", [signed], [relayed])
    await first.durable
    second = await ledger.settle("req-1", [signed], [relayed])
    assert second.record.cost_micro_usd == first.record.cost_micro_usd
    # A fresh ledger (no memory of the first) also answers from the database.
    await ledger.flush()
    # Another coordinator's writer (its own owner: this one's lock stays with this one).
    other = Ledger(
        ledger.settings.model_copy(update={"owner": "other"}), coordinator=ledger.coordinator
    )
    await other.start(recover=False, sweep=False)
    try:
        third = await other.settle("req-1", [signed], [relayed], account_id=client)
        assert not third.record.created
        assert third.record.cost_micro_usd == first.record.cost_micro_usd
    finally:
        await other.close()
    assert store.account(client).available_micro_usd == 1_000_000 - first.record.cost_micro_usd
    assert verify_ledger(store.engine).ok


async def test_insufficient_balance_message(ledger: Ledger, store: LedgerStore) -> None:
    client = make_client(store, deposit=1_000)
    with pytest.raises(InsufficientBalance, match="insufficient balance: need 5000, have 1000"):
        await ledger.place_hold("req-1", client, 5_000)
    before = row_counts(store)
    await ledger.flush()
    assert row_counts(store) == before


async def test_concurrent_holds_never_overspend(ledger: Ledger, store: LedgerStore) -> None:
    client = make_client(store, deposit=10_000)
    results = await asyncio.gather(
        *(ledger.place_hold(f"r{i}", client, 1_000) for i in range(25)), return_exceptions=True
    )
    placed = [r for r in results if not isinstance(r, BaseException)]
    assert len(placed) == 10
    assert all(isinstance(r, InsufficientBalance) for r in results if r not in placed)
    await ledger.flush()
    assert store.account(client).available_micro_usd == 0
    for hold in placed:
        await ledger.release_hold(hold.request_id)
    assert store.account(client).available_micro_usd == 10_000
    assert verify_ledger(store.engine).ok


async def test_deposit_from_another_process_is_seen(ledger: Ledger, store: LedgerStore) -> None:
    client = make_client(store, deposit=1_000)
    await (await ledger.place_hold("r1", client, 1_000)).durable
    store.deposit(client, 5_000)  # the operator's CLI, behind the ledger's back
    hold = await ledger.place_hold("r2", client, 5_000)
    assert (await hold.durable).created


async def test_release_and_expiry_return_the_money(ledger: Ledger, store: LedgerStore) -> None:
    client = make_client(store, deposit=10_000)
    await (await ledger.place_hold("r1", client, 4_000)).durable
    released = await ledger.release_hold("r1")
    assert released.status == "released"
    assert (await ledger.release_hold("r1")).status == "already_released"
    await (await ledger.place_hold("r2", client, 4_000, expires_in_s=0.001)).durable
    await asyncio.sleep(0.01)
    assert await ledger.expire_holds() == 1
    assert store.account(client).available_micro_usd == 10_000
    assert store.open_holds() == []
    assert verify_ledger(store.engine).ok


async def test_a_request_id_is_used_once_also_after_a_restart(
    settings: LedgerSettings, store: LedgerStore, node: Identity
) -> None:
    """An id whose request was settled, released or expired cannot hold again: not in the
    same ledger, and not in a new one that remembers nothing (a restart, or another
    coordinator). Before, after a restart the hold was answered as if it were a retry,
    the request was served, and its settlement answered the first one's: never charged.
    A caller that says the id is fresh skips the look-up; the writer still refuses it."""
    client = make_client(store, deposit=100_000)
    coordinator = Identity.from_seed(b"c" * 32)
    async with Ledger(settings, coordinator=coordinator) as first:
        await (await first.place_hold("settled", client, 5_000)).durable
        signed, relayed = receipt_for(node, "settled#0", 10, 10)
        await (await first.settle("settled", [signed], [relayed])).durable
        await (await first.place_hold("released", client, 5_000)).durable
        await first.release_hold("released")
        await (await first.place_hold("expired", client, 5_000, expires_in_s=0.001)).durable
        await asyncio.sleep(0.01)
        assert await first.expire_holds() == 1
        with pytest.raises(IdConflict, match="'settled' was used by an earlier request"):
            await first.place_hold("settled", client, 5_000)
        # Asked again for a hold still open: the same hold (an idempotent retry).
        open_hold = await first.place_hold("open", client, 5_000)
        assert await first.place_hold("open", client, 5_000) is open_hold
        await first.release_hold("open")
    balance = store.account(client).available_micro_usd
    before = row_counts(store)
    async with Ledger(settings, coordinator=coordinator) as second:
        for used in ("settled", "released", "expired", "open"):
            with pytest.raises(IdConflict, match=f"{used!r} was used by an earlier request"):
                await second.check_request_id(used)
            with pytest.raises(IdConflict, match="a request id is used once"):
                await second.place_hold(used, client, 5_000)
        hold = await second.place_hold("settled", client, 5_000, fresh_id=True)
        with pytest.raises(IdConflict, match="used by an earlier request"):
            await hold.durable
        await second.check_request_id("never-used")  # no error
    assert row_counts(store) == before
    assert store.account(client).available_micro_usd == balance
    assert verify_ledger(store.engine).ok


async def test_a_hold_refused_by_the_writer_teaches_the_balance_and_settles_what_there_is(
    settings: LedgerSettings, store: LedgerStore, node: Identity
) -> None:
    """Two coordinators (two ledgers, one database): B spends what A still believes the
    client has. A admits a hold from memory; the writer refuses it (InsufficientBalance
    on ``hold.durable``) and A learns the real balance, so its next hold is refused up
    front. Before, A's idea of the balance never changed, and every request it admitted
    settled without a hold: charged nothing. Settling the refused request charges what it
    delivered up to the balance there is, and answers what the writer charged."""
    client = make_client(store, deposit=10_000)
    coordinator = Identity.from_seed(b"c" * 32)
    async with (
        Ledger(settings, coordinator=coordinator) as a,
        Ledger(settings.model_copy(update={"owner": "other"}), coordinator=coordinator) as b,
    ):
        await (await a.place_hold("warm", client, 1_000)).durable  # A caches the balance
        await a.release_hold("warm")
        await (await b.place_hold("elsewhere", client, 9_700)).durable  # B spends it
        hold = await a.place_hold("stale", client, 5_000)  # A still believes 10,000
        with pytest.raises(InsufficientBalance, match="need 5000, have 300"):
            await hold.durable
        with pytest.raises(InsufficientBalance, match="need 5000, have 300"):
            await a.place_hold("next", client, 5_000)  # refused up front now
        # The refused request ran meanwhile: 1,000 tokens at 300,000 and 1,000 at 100,000
        # per million cost 400, of which 300 are there.
        signed, relayed = receipt_for(node, "stale#0", 1000, 1000)
        outcome = await a.settle("stale", [signed], [relayed])
        assert outcome.record.cost_micro_usd == 300
        assert outcome.record == await outcome.durable
    assert store.account(client).available_micro_usd == 0
    assert verify_ledger(store.engine).ok


@contextlib.asynccontextmanager
async def two_coordinators(settings: LedgerSettings) -> AsyncIterator[tuple[Ledger, Ledger]]:
    """Two coordinators' ledgers (owners differ) on one database."""
    coordinator = Identity.from_seed(b"c" * 32)
    async with (
        Ledger(settings, coordinator=coordinator) as a,
        Ledger(settings.model_copy(update={"owner": "other"}), coordinator=coordinator) as b,
    ):
        yield a, b


async def key_with_limit(
    store: LedgerStore, limit: int, *ledgers: Ledger
) -> tuple[str, list[Principal]]:
    """A funded client's new key with a spend limit: its id, and each ledger's principal
    for it."""
    client = make_client(store, deposit=1_000_000)
    key = store.issue_key(client, "capped", spend_limit_micro_usd=limit)
    return key.key.id, [await ledger.authenticate(key.secret_key) for ledger in ledgers]


def spent_and_held(store: LedgerStore, key_id: str) -> int:
    """What counts toward the key's limit in the database."""
    held = sum(row["amount"] for row in store.open_holds() if row["api_key_id"] == key_id)
    return store.key_spent_micro_usd(key_id) + held


async def test_a_keys_spend_limit_holds_across_coordinators(
    settings: LedgerSettings, store: LedgerStore, node: Identity
) -> None:
    """Two coordinators (two ledgers, one database) serve one key with a spend limit.
    Before, each counted only its own holds and settlements, so together they let the
    key spend twice its limit. Now the writer counts every open hold of the key, the
    coordinator it refused learns the others' holds, and a coordinator whose figure is
    stale (the others' holds have ended) reads it again before refusing."""
    async with two_coordinators(settings) as (a, b):
        key_id, (at_a, at_b) = await key_with_limit(store, 1_000, a, b)
        await (await b.place_hold("warm", at_b, 1)).durable  # B has read the key's spend
        await b.release_hold("warm")
        await (await a.place_hold("a1", at_a, 800)).durable
        hold = await b.place_hold("b1", at_b, 800)  # B's memory: nothing spent or held
        with pytest.raises(SpendLimitExceeded, match="in flight 800, this request needs 800"):
            await hold.durable  # the writer counts A's hold
        with pytest.raises(SpendLimitExceeded, match="in flight 800, this request needs 300"):
            await b.place_hold("b2", at_b, 300)  # refused up front: B has learned
        await (await b.place_hold("b3", at_b, 200)).durable  # 800 + 200: the limit
        # A's request costs 100 of its 800. B still counts 800 for it, so it reads again
        # before refusing: 100 + 200 + 700 fit.
        signed, relayed = receipt_for(node, "a1#0", 1000, 0)
        await (await a.settle("a1", [signed], [relayed])).durable
        await (await b.place_hold("b4", at_b, 700)).durable
        # A lease is held to the same limit. A knows only its own 100: the writer refuses.
        lease = {"gpus": 1, "price_micro_usd_per_gpu_hour": 1, "hours": 1}
        with pytest.raises(SpendLimitExceeded, match="in flight 1000, this lease costs 1"):
            await a.create_lease(at_a, node.node_id, **lease)
        before = row_counts(store)
        with pytest.raises(SpendLimitExceeded, match="in flight 1000, this lease costs 1"):
            await a.create_lease(at_a, node.node_id, **lease)  # A has learned
        assert row_counts(store) == before
    assert spent_and_held(store, key_id) == 1_000
    assert verify_ledger(store.engine).ok


async def test_one_request_id_sent_to_two_coordinators_at_once_is_paid_for_once(
    settings: LedgerSettings, store: LedgerStore, node: Identity
) -> None:
    """A client sends one request id to two coordinators in the same instant, so both
    admit it from memory. Before, the second coordinator's hold (same id, account and
    amount) was answered as a retry of the first, the two requests shared one hold, and
    the second to settle got the first's record: one request served free, its provider
    unpaid. Now the writer refuses the second hold (which stops that request) and its
    settlement against the other's hold."""
    async with two_coordinators(settings) as (a, b):
        client = make_client(store)
        key = store.issue_key(client, "twin")
        at_a, at_b = await a.authenticate(key.secret_key), await b.authenticate(key.secret_key)
        hold_a = await a.place_hold("twin", at_a, 5_000)
        hold_b = await b.place_hold("twin", at_b, 5_000)
        await hold_a.durable
        with pytest.raises(IdConflict, match="in flight already through another coordinator"):
            await hold_b.durable
        signed, relayed = receipt_for(node, "twin-b", 1000, 100)
        with pytest.raises(IdConflict, match="in flight already through another coordinator"):
            await (await b.settle("twin", [signed], [relayed])).durable
        signed, relayed = receipt_for(node, "twin", 1000, 200)
        settled = await (await a.settle("twin", [signed], [relayed])).durable
        assert settled.cost_micro_usd == 160  # A's own request: 1000 in, 200 out
    assert store.settlement("twin")["cost_micro_usd"] == 160
    assert verify_ledger(store.engine).ok


async def test_a_request_refused_for_its_keys_limit_is_charged_no_further_than_the_limit(
    settings: LedgerSettings, store: LedgerStore, node: Identity
) -> None:
    """A's hold is refused by the writer because B's requests hold most of the key's
    limit; A's request ran meanwhile (the billing stops it) and delivered 700. Settling
    it charges what the limit has left (400), so the key never passes its limit. Before,
    it charged all 700, up to the hold and the balance only."""
    async with two_coordinators(settings) as (a, b):
        key_id, (at_a, at_b) = await key_with_limit(store, 1_000, a, b)
        await (await a.place_hold("warm", at_a, 1)).durable  # A has read the key's spend
        await a.release_hold("warm")
        await (await b.place_hold("b1", at_b, 600)).durable
        hold = await a.place_hold("a1", at_a, 900)  # A's memory: nothing held
        with pytest.raises(SpendLimitExceeded):
            await hold.durable
        signed, relayed = receipt_for(node, "a1#0", 1000, 2000)  # costs 100 + 600
        outcome = await a.settle("a1", [signed], [relayed])
        assert (await outcome.durable).cost_micro_usd == 400
        assert outcome.record.cost_micro_usd == 400
    assert spent_and_held(store, key_id) == 1_000
    assert verify_ledger(store.engine).ok


async def test_a_keys_spend_read_while_its_settlement_commits_counts_it_once(
    ledger: Ledger, store: LedgerStore, node: Identity
) -> None:
    """A key's figure is read again (the next hold looks over the limit) while one of its
    settlements is still being written: the settlement is counted once, in the figure
    read or when it becomes durable, whichever the writer's order gives."""
    client = make_client(store, deposit=10_000)
    key = store.issue_key(client, "capped", spend_limit_micro_usd=1_000)
    principal = await ledger.authenticate(key.secret_key)
    await (await ledger.place_hold("r1", principal, 500)).durable
    signed, relayed = receipt_for(node, "r1#0", 1000, 0)  # costs 100
    outcome = await ledger.settle("r1", [signed], [relayed])  # queued, not yet durable
    with pytest.raises(SpendLimitExceeded, match="in flight 100, this request needs 901"):
        await ledger.place_hold("r2", principal, 901)  # 500 held by memory: read again
    assert (await outcome.durable).cost_micro_usd == 100
    await (await ledger.place_hold("r3", principal, 900)).durable  # 100 + 900: the limit


async def test_a_refused_hold_released_first_is_not_taken_off_the_key_twice(
    ledger: Ledger, store: LedgerStore
) -> None:
    """A request fails at once (no node) and releases its hold while the hold's write is
    still queued; then the writer refuses that write (the balance was spent behind this
    coordinator's back). The key's in-flight figure was lowered by the release and then
    again by the refusal, so this coordinator counted less than the key had and admitted
    from memory what the limit forbids (the writer refused it later)."""
    client = make_client(store, deposit=10_000)
    key = store.issue_key(client, "capped", spend_limit_micro_usd=1_000)
    principal = await ledger.authenticate(key.secret_key)
    await (await ledger.place_hold("warm", principal, 1)).durable  # balance and key known
    await ledger.release_hold("warm")
    store.correct("spent-elsewhere", client, "platform.fees", 10_000)
    hold = await ledger.place_hold("gone", principal, 600)  # admitted from memory
    ledger.release_hold("gone")  # the request failed before its hold was written
    with pytest.raises(InsufficientBalance):
        await hold.durable
    store.deposit(client, 10_000, "again")
    with pytest.raises(SpendLimitExceeded, match="this request needs 1001"):
        await ledger.place_hold("over", principal, 1_001)  # refused up front
    await (await ledger.place_hold("fits", principal, 1_000)).durable


async def test_a_request_that_outlives_its_hold_still_pays(
    ledger: Ledger, store: LedgerStore, node: Identity
) -> None:
    """A request running longer than hold_expiry_s has its hold expired by the sweeper
    (the money is the client's again). Settling it afterwards charges what it delivered,
    up to the hold it had and to the balance there is. Before, the expiry made the
    ledger forget the hold, and the settlement charged nothing."""
    client = make_client(store, deposit=10_000)
    await (await ledger.place_hold("long", client, 5_000, expires_in_s=0.001)).durable
    await asyncio.sleep(0.01)
    assert await ledger.expire_holds() == 1
    assert store.account(client).available_micro_usd == 10_000
    signed, relayed = receipt_for(node, "long#0", 1000, 1000)  # costs 400
    outcome = await ledger.settle("long", [signed], [relayed])
    assert outcome.record.cost_micro_usd == 400
    assert outcome.record == await outcome.durable
    assert store.account(client).available_micro_usd == 10_000 - 400
    assert verify_ledger(store.engine).ok


async def test_hold_then_settle_is_capped_at_the_hold(
    ledger: Ledger, store: LedgerStore, node: Identity
) -> None:
    client = make_client(store)
    await ledger.place_hold("r1", client, 100)
    signed, relayed = receipt_for(node, "r1#0", 1000, 1000)  # costs 400
    outcome = await ledger.settle("r1", [signed], [relayed])
    assert outcome.record.cost_micro_usd == 100
    assert outcome.record.capped_micro_usd == 300
    assert (await outcome.durable).cost_micro_usd == 100
    assert store.account(client).available_micro_usd == 1_000_000 - 100


async def test_two_segments_pay_two_providers(ledger: Ledger, store: LedgerStore) -> None:
    a, b = Identity.from_seed(b"a" * 32), Identity.from_seed(b"b" * 32)
    client = make_client(store)
    await ledger.place_hold("r1", client, 10_000)
    s1, r1 = receipt_for(a, "r1#0", 1000, 1000)
    s2, r2 = receipt_for(b, "r1#1", 2000, 1000, segment_index=1)
    outcome = await ledger.settle("r1", [s1, s2], [r1, r2])
    await outcome.durable
    assert outcome.record.cost_micro_usd == 400 + 500
    assert store.account(a.node_id).available_micro_usd == 360
    assert store.account(b.node_id).available_micro_usd == 450
    assert verify_ledger(store.engine).ok


@pytest.mark.parametrize("attack", ["forged", "miscounted"])
async def test_bad_receipt_is_refused_recorded_and_charges_nothing(
    ledger: Ledger, store: LedgerStore, node: Identity, attack: str
) -> None:
    client = make_client(store)
    await (await ledger.place_hold("r1", client, 10_000)).durable
    signed, relayed = receipt_for(node, "r1#0", 100, 100)
    if attack == "forged":
        signed.node_signature = Identity.from_seed(b"x" * 32).sign(
            "mercato.v1.UsageReceipt", signed.receipt
        )
        expected: type[Exception] = ForgedReceipt
    else:
        _, relayed = receipt_for(node, "r1#0", 100, 99)  # the coordinator counted 99
        expected = MiscountedReceipt
    before = row_counts(store)
    with pytest.raises(expected):
        await ledger.settle("r1", [signed], [relayed])
    await ledger.flush()
    assert row_counts(store) == before
    [rejection] = store.rejections("r1")
    assert rejection["reason"] == expected.code
    assert store.account(client).available_micro_usd == 990_000  # the hold stays until released
    assert (await ledger.release_hold("r1")).status == "released"


async def test_replayed_receipt_is_refused(
    ledger: Ledger, store: LedgerStore, node: Identity
) -> None:
    client = make_client(store)
    await ledger.place_hold("r1", client, 10_000)
    signed, relayed = receipt_for(node, "r1#0", 100, 100)
    await (await ledger.settle("r1", [signed], [relayed])).durable
    await ledger.place_hold("r2", client, 10_000)
    _, relayed2 = receipt_for(node, "r2#0", 100, 100)
    with pytest.raises(ReplayedReceipt):
        await ledger.settle("r2", [signed], [relayed2])
    await ledger.flush()
    assert store.rejections("r2")[0]["reason"] == "replayed_receipt"
    assert store.settlement("r2") is None


async def test_keys_revoked_malformed_wrong_and_permissions(
    ledger: Ledger, store: LedgerStore
) -> None:
    client = make_client(store)
    key = store.issue_key(client)
    assert (await ledger.authenticate(key.secret_key)).account_id == client
    with pytest.raises(MalformedKey):
        await ledger.authenticate("hello")
    with pytest.raises(InvalidKey):
        await ledger.authenticate(key.secret_key[:-4] + "AAAA")
    store.revoke_key(key.key.id)  # another process: the operator's CLI
    with pytest.raises(RevokedKey):
        await ledger.authenticate(key.secret_key)
    provider = store.create_account(AccountKind.PROVIDER, "gpu-1", node_id="12D3KooWtest")
    pkey = store.issue_key(provider.id)
    principal = await ledger.authenticate(pkey.secret_key)
    with pytest.raises(PermissionDenied):
        await ledger.place_hold("r1", principal, 10)
    assert RevokedKey.grpc_status.name == "UNAUTHENTICATED"
    assert PermissionDenied.grpc_status.name == "PERMISSION_DENIED"


async def test_rate_and_spend_limits(ledger: Ledger, store: LedgerStore, node: Identity) -> None:
    client = make_client(store)
    limited = store.issue_key(client, "limited", rate_limit_per_minute=2)
    await ledger.authenticate(limited.secret_key)
    await ledger.authenticate(limited.secret_key)
    with pytest.raises(RateLimited):
        await ledger.authenticate(limited.secret_key)
    assert RateLimited.grpc_status.name == "RESOURCE_EXHAUSTED"
    capped = store.issue_key(client, "capped", spend_limit_micro_usd=1_000)
    principal = await ledger.authenticate(capped.secret_key)
    await ledger.place_hold("r1", principal, 800)
    with pytest.raises(SpendLimitExceeded):
        await ledger.place_hold("r2", principal, 300)
    signed, relayed = receipt_for(node, "r1#0", 1000, 0)  # costs 100
    await (await ledger.settle("r1", [signed], [relayed])).durable
    await ledger.place_hold("r2", principal, 900)  # spent 100 of 1000
    with pytest.raises(SpendLimitExceeded):
        await ledger.place_hold("r3", principal, 1)


async def test_spend_is_recorded_per_key_and_survives_a_restart(
    ledger: Ledger, settings: LedgerSettings, store: LedgerStore, node: Identity
) -> None:
    client = make_client(store)
    capped = store.issue_key(client, "capped", spend_limit_micro_usd=1_000)
    other = store.issue_key(client, "other")
    principal = await ledger.authenticate(capped.secret_key)
    for index, input_tokens in enumerate((1000, 3000)):  # cost 100, then 300
        request_id = f"s{index}"
        await ledger.place_hold(request_id, principal, 400)
        signed, relayed = receipt_for(node, f"{request_id}#0", input_tokens, 0)
        await (await ledger.settle(request_id, [signed], [relayed])).durable
    await ledger.place_hold("s2", await ledger.authenticate(other.secret_key), 50)
    signed, relayed = receipt_for(node, "s2#0", 500, 0)
    await (await ledger.settle("s2", [signed], [relayed])).durable
    assert store.key_spent_micro_usd(capped.key.id) == 400
    assert store.key_spent_micro_usd(other.key.id) == 50
    assert verify_ledger(store.engine).ok
    # A new coordinator process knows the key's spend from the ledger alone.
    await ledger.close()  # the old process ends (its writer lock with it)
    restarted = Ledger(settings, coordinator=Identity.from_seed(b"c" * 32))
    await restarted.start()
    try:
        again = await restarted.authenticate(capped.secret_key)
        await restarted.place_hold("s3", again, 600)  # 400 + 600 = the limit
        with pytest.raises(SpendLimitExceeded):
            await restarted.place_hold("s4", again, 1)
    finally:
        await restarted.close()
    # The recorded spend is checked by `ledger verify`.
    with store.engine.begin() as conn:
        conn.execute(
            text("UPDATE key_spend SET spent_micro_usd = 7 WHERE api_key_id = :k"),
            {"k": capped.key.id},
        )
    report = verify_ledger(store.engine)
    assert not report.ok
    assert any(capped.key.id in problem and "400" in problem for problem in report.problems)


@pytest.mark.parametrize("amount", [0, -5])
async def test_bad_inputs_leave_no_row(ledger: Ledger, store: LedgerStore, amount: int) -> None:
    client = make_client(store)
    before = row_counts(store)
    with pytest.raises(InvalidAmount):
        await ledger.place_hold("r1", client, amount)
    with pytest.raises(InvalidAmount):
        store.deposit(client, amount)
    with pytest.raises(UnknownAccount):
        await ledger.place_hold("r2", "acct_nobody", 10)
    with pytest.raises(UnknownAccount):
        store.deposit("acct_nobody", 10)
    with pytest.raises(WrongAccountKind):
        store.deposit("platform.fees", 10)
    with pytest.raises(IdConflict):
        store.create_account(AccountKind.CLIENT, "alice")
    await ledger.flush()
    assert row_counts(store) == before


async def test_deposit_is_idempotent_by_transfer_id(store: LedgerStore) -> None:
    client = make_client(store, deposit=0)
    assert store.deposit(client, 500, "dep-1").created
    assert not store.deposit(client, 500, "dep-1").created
    with pytest.raises(IdConflict):
        store.deposit(client, 501, "dep-1")
    assert store.account(client).available_micro_usd == 500


async def restart(settings: LedgerSettings, coordinator: Identity) -> RecoveryReport:
    """A coordinator started again on the ledger (its recovery runs), then stopped:
    what the recovery did."""
    restarted = Ledger(settings, coordinator=coordinator)
    report = await restarted.start(sweep=False)
    await restarted.close()
    assert report is not None
    return report


async def test_crash_between_relay_and_commit_is_recovered_once(
    settings: LedgerSettings, store: LedgerStore, node: Identity
) -> None:
    client = make_client(store)
    coordinator = Identity.from_seed(b"c" * 32)
    first = Ledger(settings, coordinator=coordinator)
    await first.start(sweep=False)
    await (await first.place_hold("r1", client, 10_000)).durable
    await (await first.place_hold("r2", client, 10_000)).durable  # never settled: orphaned
    # The process dies after settle() returned but before the batch committed.
    assert first._writer is not None
    real_submit = first._writer.submit
    lost: list[object] = []

    def dying_submit(op: object) -> asyncio.Future[object]:
        lost.append(op)
        return asyncio.get_running_loop().create_future()  # never resolves

    first._writer.submit = dying_submit  # type: ignore[method-assign]
    signed, relayed = receipt_for(node, "r1#0", 1000, 1000)
    outcome = await first.settle("r1", [signed], [relayed])
    assert outcome.record.cost_micro_usd == 400 and lost
    first._writer.submit = real_submit  # type: ignore[method-assign]
    assert store.settlement("r1") is None
    await kill_ledger(first)  # the process dies: no close, no clean-up

    report = await restart(settings, coordinator)
    assert report.replayed == 1 and report.settled == 1
    assert report.released == 1  # r2's hold, orphaned by the crash
    report = await restart(settings, coordinator)
    assert report.replayed == 0
    assert store.settlement("r1")["cost_micro_usd"] == 400  # type: ignore[index]
    assert store.account(client).available_micro_usd == 1_000_000 - 400
    assert store.open_holds() == []
    assert verify_ledger(store.engine).ok


@contextlib.contextmanager
def database_down(ledger: Ledger) -> Iterator[None]:
    """Every commit of ``ledger``'s writer fails as with a dead database, until the end."""
    assert ledger._writer is not None
    committer = ledger._writer._committer
    real_commit = committer.commit

    def refuse(ops: object) -> object:
        raise OperationalError("COMMIT", {}, Exception("server closed the connection"))

    committer.commit = refuse  # type: ignore[method-assign]
    try:
        yield
    finally:
        committer.commit = real_commit  # type: ignore[method-assign]


async def test_a_settlement_the_database_refused_is_settled_on_restart(
    settings: LedgerSettings, store: LedgerStore, node: Identity
) -> None:
    """The database is down when a settlement's batch commits: its future fails with
    LedgerUnavailable, its record stays in the intent log, and the next start settles it
    once (a successful commit, by contrast, removes the record: nothing is replayed)."""
    client = make_client(store)
    coordinator = Identity.from_seed(b"c" * 32)
    first = Ledger(settings, coordinator=coordinator)
    await first.start(sweep=False)
    await (await first.place_hold("r1", client, 10_000)).durable
    with database_down(first):
        signed, relayed = receipt_for(node, "r1#0", 1000, 1000)
        outcome = await first.settle("r1", [signed], [relayed])
        with pytest.raises(LedgerUnavailable):
            await outcome.durable
    assert store.settlement("r1") is None
    await first.close()

    report = await restart(settings, coordinator)
    assert report.replayed == 1 and report.settled == 1
    assert store.settlement("r1")["cost_micro_usd"] == 400  # type: ignore[index]
    assert store.account(client).available_micro_usd == 1_000_000 - 400
    report = await restart(settings, coordinator)
    assert report.replayed == 0
    assert verify_ledger(store.engine).ok


async def test_a_hold_written_while_the_database_is_down_is_charged_on_restart(
    settings: LedgerSettings, store: LedgerStore, node: Identity
) -> None:
    """The database is down when a request's hold is written (LedgerUnavailable): the
    request goes on, settling it still answers at once (from the hold), and the restart
    settles it from the intent log, charged up to that hold. Before, the failed write made
    the ledger forget the hold and the request was settled at zero."""
    client = make_client(store)
    coordinator = Identity.from_seed(b"c" * 32)
    first = Ledger(settings, coordinator=coordinator)
    await first.start(sweep=False)
    await (await first.place_hold("warm", client, 1)).durable  # the balance is known
    await first.release_hold("warm")
    with database_down(first):
        hold = await first.place_hold("r1", client, 10_000, fresh_id=True)
        with pytest.raises(LedgerUnavailable):
            await hold.durable
        signed, relayed = receipt_for(node, "r1#0", 1000, 1000)
        outcome = await first.settle("r1", [signed], [relayed])
        assert outcome.record.cost_micro_usd == 400
        with pytest.raises(LedgerUnavailable):
            await outcome.durable
    await first.close()
    report = await restart(settings, coordinator)
    assert report.settled == 1
    assert store.settlement("r1")["cost_micro_usd"] == 400  # type: ignore[index]
    assert store.account(client).available_micro_usd == 1_000_000 - 400
    assert verify_ledger(store.engine).ok


async def test_lease_paid_up_front_charged_per_period_refunded_on_failure(
    ledger: Ledger, store: LedgerStore, node: Identity
) -> None:
    client = make_client(store, deposit=10_000_000)
    with pytest.raises(InsufficientBalance):
        await ledger.create_lease(
            client, node.node_id, gpus=1, price_micro_usd_per_gpu_hour=10**8, hours=1
        )
    lease = await ledger.create_lease(
        client, node.node_id, gpus=2, price_micro_usd_per_gpu_hour=1_000_000, hours=2, period_s=600
    )
    assert lease.total_micro_usd == 4_000_000 and lease.periods_total == 12
    assert store.account(client).available_micro_usd == 6_000_000
    start = lease.started_at_unix_ms
    charged = await ledger.charge_leases(now_ms=start + 3 * 600_000 + 5)
    assert charged[0].charged_micro_usd == 1_000_000
    ended = await ledger.end_lease(lease.lease_id, node_failed=True, now_ms=start + 4 * 600_000 + 1)
    # The node failed during period 5: four periods charged, the rest refunded.
    assert ended.status == "failed"
    assert ended.charged_micro_usd == 4 * 4_000_000 // 12
    assert ended.refunded_micro_usd == 4_000_000 - ended.charged_micro_usd
    assert store.account(client).available_micro_usd == 10_000_000 - ended.charged_micro_usd
    provider = store.account(node.node_id).available_micro_usd
    fees = store.account("platform.fees").available_micro_usd
    assert (provider, fees) == (1_200_000, 133_333)  # fee per charge: 100_000 + 33_333
    assert store.account("platform.lease_escrow").posted_micro_usd == 0
    assert verify_ledger(store.engine).ok


async def test_lease_ended_by_client_pays_started_period(
    ledger: Ledger, store: LedgerStore, node: Identity
) -> None:
    client = make_client(store, deposit=10_000_000)
    key = store.issue_key(client)
    principal = await ledger.authenticate(key.secret_key)
    lease = await ledger.create_lease(
        principal,
        node.node_id,
        gpus=1,
        price_micro_usd_per_gpu_hour=3_600_000,
        hours=1,
        period_s=60,
    )
    assert await ledger.lease_node(principal, lease.lease_id) == node.node_id
    assert [x.lease_id for x in await ledger.active_leases()] == [lease.lease_id]
    ended = await ledger.end_lease(lease.lease_id, now_ms=lease.started_at_unix_ms + 90_000)
    assert ended.charged_micro_usd == 2 * 60_000  # 1.5 minutes -> 2 started periods
    assert store.account(client).available_micro_usd == 10_000_000 - 120_000
    # Requests under the lease: receipts stored, nothing charged per token.
    signed, relayed = receipt_for(node, "lr1#0", 100, 100, lease_id=lease.lease_id)
    await (await ledger.place_hold("lr1", principal, 1)).durable
    outcome = await ledger.settle("lr1", [signed], [relayed], lease_id=lease.lease_id)
    assert (await outcome.durable).cost_micro_usd == 0
    assert verify_ledger(store.engine).ok


async def test_payouts_run_twice_pays_once(
    ledger: Ledger, store: LedgerStore, node: Identity
) -> None:
    client = make_client(store)
    await ledger.place_hold("r1", client, 10_000)
    signed, relayed = receipt_for(node, "r1#0", 10_000, 10_000)  # 4000
    await (await ledger.settle("r1", [signed], [relayed])).durable
    first = store.run_payouts("batch-1")
    assert first.created and first.payouts == [(store.account(node.node_id).id, 3_600)]
    again = store.run_payouts("batch-1")
    assert not again.created and again.payouts == first.payouts
    assert not store.run_payouts().payouts  # nothing left to pay
    assert store.account(node.node_id).available_micro_usd == 0
    assert store.account("platform.payouts").posted_micro_usd == 3_600
    assert verify_ledger(store.engine).ok


def test_api_key_secret_is_stored_only_as_its_sha256(store: LedgerStore) -> None:
    """The database keeps the SHA-256 of a key's secret, never the key or the secret."""
    client = make_client(store)
    issued = store.issue_key(client)
    secret = issued.secret_key[len("mk_") + 16 + 1 :]  # mk_<16 hex id>_<secret>
    with store.engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM api_keys")).one()._mapping
    assert row["secret_sha256"] == hashlib.sha256(secret.encode()).hexdigest()
    stored = " ".join(str(v) for v in row.values())
    assert secret not in stored and issued.secret_key not in stored


async def test_payouts_skip_balances_below_the_minimum(
    ledger: Ledger, store: LedgerStore, node: Identity
) -> None:
    """A provider whose balance is below the minimum payout is not paid (nor recorded)."""
    client = make_client(store)
    await ledger.place_hold("r1", client, 10_000)
    signed, relayed = receipt_for(node, "r1#0", 10_000, 10_000)  # 4000, provider gets 3600
    await (await ledger.settle("r1", [signed], [relayed])).durable
    result = store.run_payouts("batch-1", min_micro_usd=3_601)
    assert result.payouts == [] and not result.created
    assert store.account(node.node_id).available_micro_usd == 3_600
    assert store.run_payouts("batch-2", min_micro_usd=3_600).payouts == [
        (store.account(node.node_id).id, 3_600)
    ]


def test_rate_limiter_refills_at_the_per_minute_rate() -> None:
    """A key limited to 60 requests per minute gets one more request per second, not more."""
    limiter = KeyRateLimiter()
    for _ in range(60):
        limiter.check("k", 60, now_s=100.0)
    with pytest.raises(RateLimited):
        limiter.check("k", 60, now_s=100.5)  # half a request refilled
    limiter.check("k", 60, now_s=101.0)  # one whole request refilled
    with pytest.raises(RateLimited):
        limiter.check("k", 60, now_s=101.0)


async def test_a_lease_charged_to_its_end_is_ended(
    ledger: Ledger, store: LedgerStore, node: Identity
) -> None:
    """Once every period is charged the lease ends: it leaves the active list and a later
    end_lease refunds nothing."""
    client = make_client(store, deposit=10_000_000)
    lease = await ledger.create_lease(
        client, node.node_id, gpus=1, price_micro_usd_per_gpu_hour=1_000_000, hours=1, period_s=600
    )
    charged = await ledger.charge_leases(now_ms=lease.started_at_unix_ms + 3_600_000 + 1)
    assert [(c.status, c.charged_micro_usd) for c in charged] == [("ended", 1_000_000)]
    assert await ledger.active_leases() == []
    assert (await ledger.lease(lease.lease_id)).status == "ended"  # type: ignore[union-attr]
    assert store.account(client).available_micro_usd == 9_000_000
    assert verify_ledger(store.engine).ok


async def test_a_node_is_leased_whole_to_one_client_at_a_time(
    ledger: Ledger, store: LedgerStore, node: Identity
) -> None:
    """A node's engine serves one lessee: a second active lease on it is refused (before,
    two clients could each pay for the same node), also when both ask in one batch; the
    node is free again once its lease ends, or once it is past its end."""
    alice = make_client(store, "alice", deposit=10_000_000)
    bob = make_client(store, "bob", deposit=10_000_000)
    terms = {"gpus": 1, "price_micro_usd_per_gpu_hour": 1_000_000, "hours": 1}
    lease = await ledger.create_lease(alice, node.node_id, **terms)
    before = row_counts(store)
    with pytest.raises(NodeLeased, match="leased to another client until"):
        await ledger.create_lease(bob, node.node_id, **terms)
    with pytest.raises(NodeLeased, match=f"you already lease .*{lease.lease_id}"):
        await ledger.create_lease(alice, node.node_id, **terms)
    assert row_counts(store) == before  # refused: nothing written, nothing taken
    assert store.account(bob).available_micro_usd == 10_000_000
    assert [x.lease_id for x in await ledger.active_leases()] == [lease.lease_id]

    # Two clients asking for the same free node at once: one gets it.
    other = Identity.from_seed(b"o" * 32).node_id
    results = await asyncio.gather(
        ledger.create_lease(alice, other, **terms),
        ledger.create_lease(bob, other, **terms),
        return_exceptions=True,
    )
    assert sorted(type(r).__name__ for r in results) == ["LeaseRecord", "NodeLeased"]

    await ledger.end_lease(lease.lease_id)
    taken = await ledger.create_lease(bob, node.node_id, **terms)
    assert taken.status == "active"
    # Past its end but not yet swept: it holds the node no longer.
    with store.engine.begin() as conn:
        conn.execute(
            text("UPDATE leases SET ends_at_unix_ms = :t WHERE id = :id"),
            {"t": taken.started_at_unix_ms - 1, "id": taken.lease_id},
        )
    assert (await ledger.create_lease(alice, node.node_id, **terms)).status == "active"
    assert verify_ledger(store.engine).ok


async def test_a_retried_lease_is_answered_before_money_is_checked(
    ledger: Ledger, store: LedgerStore, node: Identity
) -> None:
    """create_lease is idempotent by lease id: a retry (after the lease was made, or while
    it is being made) answers that lease, and is not refused for the money the lease
    itself took (before, a client who could pay for one lease had its retry refused for
    insufficient balance). An id of another lease is IdConflict."""
    alice = make_client(store, "alice", deposit=1_500_000)
    terms = {"gpus": 1, "price_micro_usd_per_gpu_hour": 1_000_000, "hours": 1}
    twins = await asyncio.gather(
        ledger.create_lease(alice, node.node_id, lease_id="lease-a", **terms),
        ledger.create_lease(alice, node.node_id, lease_id="lease-a", **terms),
    )
    assert twins[0] == twins[1] and twins[0].lease_id == "lease-a"
    assert await ledger.create_lease(alice, node.node_id, lease_id="lease-a", **terms) == twins[0]
    assert store.account(alice).available_micro_usd == 500_000  # paid once
    other = Identity.from_seed(b"o" * 32).node_id
    for changed in ({"node_id": other}, {"hours": 2}):
        call = {"node_id": node.node_id, **terms, **changed}
        with pytest.raises(IdConflict, match="'lease-a' is taken by another lease"):
            await ledger.create_lease(alice, lease_id="lease-a", **call)  # type: ignore[arg-type]
    assert store.account(alice).available_micro_usd == 500_000
    assert verify_ledger(store.engine).ok


async def test_a_keys_spend_limit_bounds_its_leases(
    ledger: Ledger, store: LedgerStore, node: Identity
) -> None:
    """A lease counts its prepaid price toward the paying key's spend, less its refund.
    Before, a key with a spend limit could lease any node for any number of hours."""
    client = make_client(store, deposit=10_000_000)
    key = store.issue_key(client, spend_limit_micro_usd=2_500_000)
    principal = await ledger.authenticate(key.secret_key)
    nodes = [Identity.from_seed(bytes([i]) * 32).node_id for i in range(3)]
    per_hour = {"gpus": 1, "price_micro_usd_per_gpu_hour": 1_000_000}
    first = await ledger.create_lease(principal, nodes[0], hours=2, **per_hour)
    assert first.api_key_id == key.key.id
    assert store.key_spent_micro_usd(key.key.id) == 2_000_000
    before = row_counts(store)
    with pytest.raises(SpendLimitExceeded, match="this lease costs 1000000"):
        await ledger.create_lease(principal, nodes[1], hours=1, **per_hour)
    assert row_counts(store) == before
    ended = await ledger.end_lease(first.lease_id)  # within its first hour: one refunded
    assert ended.refunded_micro_usd == 1_000_000
    assert store.key_spent_micro_usd(key.key.id) == 1_000_000
    await ledger.create_lease(principal, nodes[1], hours=1, **per_hour)  # 2,000,000 spent
    with pytest.raises(SpendLimitExceeded):
        await ledger.create_lease(principal, nodes[2], hours=1, **per_hour)
    # Requests see the same spend: 500,000 left under the limit.
    with pytest.raises(SpendLimitExceeded):
        await ledger.place_hold("r-over", principal, 500_001)
    await (await ledger.place_hold("r-fits", principal, 500_000)).durable
    report = verify_ledger(store.engine)
    assert report.ok, report
    # The audit recomputes key spend from settlements and leases: an edit shows.
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE key_spend SET spent_micro_usd = 0"))
    assert any("recorded spend" in p for p in verify_ledger(store.engine).problems)


async def test_the_background_sweep_expires_overdue_holds(
    settings: LedgerSettings, store: LedgerStore
) -> None:
    """The sweeper a started ledger runs releases overdue holds without being asked."""
    client = make_client(store, deposit=10_000)
    fast = settings.model_copy(update={"hold_sweep_interval_s": 0.05})
    async with Ledger(fast, coordinator=Identity.from_seed(b"c" * 32)) as swept:
        await (await swept.place_hold("r1", client, 4_000, expires_in_s=0.001)).durable
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not store.open_holds():
                break
    assert store.open_holds() == []
    assert store.account(client).available_micro_usd == 10_000
    assert verify_ledger(store.engine).ok
