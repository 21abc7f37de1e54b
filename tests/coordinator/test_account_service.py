"""AccountService over a real in-process grpc.aio server and a real ledger (SQLite, and
PostgreSQL when 127.0.0.1:5432 answers): authentication, the caller's own account only,
paging and filters, leases, and the status codes of refusals."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from mercato.v1 import account_pb2, account_pb2_grpc, market_pb2

from coordinator.account_service import LeaseTerms, add_account_service
from marketplace.identity import Identity
from marketplace.ledger import (
    AccountKind,
    Ledger,
    LedgerSettings,
    Principal,
    RelayedSegment,
    sign_receipt,
    verify_offline,
)
from marketplace.ledger.ledger import LEASE_HOURS_MAX
from tests.postgres import fresh_schema

NODE = Identity.from_seed(b"n" * 32)
COORDINATOR = Identity.from_seed(b"c" * 32)
PRICE_PER_GPU_HOUR = 500_000
NODE_GPUS = 4


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    with fresh_schema("acct") as url:
        yield url


@dataclass
class Setup:
    ledger: Ledger
    stub: account_pb2_grpc.AccountServiceStub
    alice: str  # account ids
    bob: str
    alice_key: str  # full API keys
    bob_key: str
    provider_key: str


def _lease_terms(node_id: str) -> LeaseTerms | None:
    return LeaseTerms(PRICE_PER_GPU_HOUR, NODE_GPUS) if node_id == NODE.node_id else None


@pytest.fixture
async def setup(database_url: str, tmp_path: Path) -> AsyncIterator[Setup]:
    settings = LedgerSettings(
        database_url=database_url,
        intent_log_dir=tmp_path / "intents",
        hold_sweep_interval_s=3600,
        platform_fee_bps=1000,
    )
    ledger = Ledger(settings, coordinator=COORDINATOR)
    await ledger.start()
    store = ledger.store
    alice = store.create_account(AccountKind.CLIENT, "alice").id
    bob = store.create_account(AccountKind.CLIENT, "bob").id
    store.deposit(alice, 10_000_000)
    store.deposit(bob, 1_000_000)
    provider = store.create_account(AccountKind.PROVIDER, "prov", node_id=NODE.node_id).id
    keys = (
        store.issue_key(alice, spend_limit_micro_usd=9_000_000).secret_key,
        store.issue_key(bob).secret_key,
        store.issue_key(provider).secret_key,
    )
    server = grpc.aio.server()
    add_account_service(server, ledger, lease_terms=_lease_terms)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Setup(ledger, account_pb2_grpc.AccountServiceStub(channel), alice, bob, *keys)
    finally:
        await server.stop(grace=None)
        await ledger.close()


def _auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def _settle(
    ledger: Ledger,
    request_id: str,
    account_id: str,
    tokens: int,
    model: str = "smol",
    key: Principal | None = None,
) -> None:
    """A settled request of ``account_id`` (paid with ``key``, if given): hold, the
    node's signed receipt, settlement."""
    await ledger.place_hold(request_id, key or account_id, 1_000_000)
    worker_id = f"{request_id}#0"
    usage = market_pb2.UsageReceipt(
        request_id=worker_id,
        node_id=NODE.node_id,
        model=model,
        input_tokens=tokens,
        output_tokens=2 * tokens,
        price_input_micro_usd_per_mtok=100_000,
        price_output_micro_usd_per_mtok=300_000,
        started_at_unix_ms=1,
        finished_at_unix_ms=2,
    )
    relayed = RelayedSegment(worker_id, NODE.node_id, model, tokens, 2 * tokens, 100_000, 300_000)
    outcome = await ledger.settle(request_id, [sign_receipt(usage, NODE)], [relayed])
    await outcome.durable


async def _refusal(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value.code(), info.value.details() or ""


async def _status(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value.code()


async def test_every_call_needs_a_valid_key(setup: Setup) -> None:
    stub = setup.stub
    assert await _status(stub.GetBalance(account_pb2.GetBalanceRequest())) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    for bad in ("mk_nope", "mk_abcdefgh_" + "x" * 32, ""):
        code = await _status(stub.GetBalance(account_pb2.GetBalanceRequest(), metadata=_auth(bad)))
        assert code == grpc.StatusCode.UNAUTHENTICATED, bad
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetUsage(account_pb2.GetUsageRequest(), metadata=(("authorization", "x"),))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in (info.value.details() or "")
    key_id = setup.bob_key.split("_")[1]
    await setup.ledger.revoke_key(key_id)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetBalance(account_pb2.GetBalanceRequest(), metadata=_auth(setup.bob_key))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in (info.value.details() or "")
    assert setup.bob_key.split("_", 2)[2] not in (info.value.details() or "")


async def test_balance_is_the_callers_own(setup: Setup) -> None:
    hold = await setup.ledger.place_hold("held-1", setup.alice, 250_000)
    await hold.durable
    answer = await setup.stub.GetBalance(
        account_pb2.GetBalanceRequest(), metadata=_auth(setup.alice_key)
    )
    assert answer.account_id == setup.alice and answer.account_name == "alice"
    assert answer.kind == account_pb2.ACCOUNT_KIND_CLIENT
    assert answer.posted_micro_usd == 10_000_000
    assert answer.held_micro_usd == 250_000
    assert answer.available_micro_usd == 9_750_000
    assert answer.api_key_id == setup.alice_key.split("_")[1]
    assert answer.HasField("key_spend_limit_micro_usd")
    assert answer.key_spend_limit_micro_usd == 9_000_000
    other = await setup.stub.GetBalance(
        account_pb2.GetBalanceRequest(), metadata=_auth(setup.bob_key)
    )
    assert other.account_id == setup.bob and other.available_micro_usd == 1_000_000
    assert not other.HasField("key_spend_limit_micro_usd")


async def test_balance_shows_what_the_key_has_spent_and_holds(setup: Setup) -> None:
    """GetBalance tells a key what counts toward its spend limit and what is left: its
    charges, its holds in flight (through any coordinator), limit minus both."""
    ledger = setup.ledger
    key = await ledger.authenticate(setup.alice_key)
    await _settle(ledger, "spent-1", setup.alice, 1000, key=key)  # 100 + 600 micro-USD
    await (await ledger.place_hold("held-1", key, 40_000)).durable
    await (await ledger.place_hold("held-2", setup.alice, 5_000)).durable  # no key: not counted
    answer = await setup.stub.GetBalance(
        account_pb2.GetBalanceRequest(), metadata=_auth(setup.alice_key)
    )
    assert (answer.key_spent_micro_usd, answer.key_held_micro_usd) == (700, 40_000)
    assert answer.key_spend_left_micro_usd == 9_000_000 - 700 - 40_000
    assert answer.held_micro_usd == 45_000  # the account's holds, with or without a key
    other = await setup.stub.GetBalance(
        account_pb2.GetBalanceRequest(), metadata=_auth(setup.bob_key)
    )
    assert (other.key_spent_micro_usd, other.key_held_micro_usd) == (0, 0)
    assert not other.HasField("key_spend_left_micro_usd")


async def test_receipts_are_paged_filtered_and_verifiable(setup: Setup) -> None:
    ledger = setup.ledger
    for number in range(5):
        await _settle(ledger, f"a-{number}", setup.alice, 100 + number)
    await _settle(ledger, "b-0", setup.bob, 50)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await setup.stub.ListReceipts(
            account_pb2.ListReceiptsRequest(page_size=2, page_token=token),
            metadata=_auth(setup.alice_key),
        )
        pages += 1
        assert len(page.receipts) <= 2
        seen.extend(r.request_id for r in page.receipts)
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert sorted(seen) == [f"a-{n}" for n in range(5)]  # each once, none of bob's
    one = await setup.stub.ListReceipts(
        account_pb2.ListReceiptsRequest(request_id="a-3"), metadata=_auth(setup.alice_key)
    )
    assert [r.request_id for r in one.receipts] == ["a-3"]
    item = one.receipts[0]
    usage = verify_offline(item.receipt, [COORDINATOR.public_key])
    assert usage.request_id == "a-3#0" and usage.input_tokens == item.input_tokens == 103
    assert item.node_id == NODE.node_id and item.model == "smol"
    assert item.cost_micro_usd == -(-(103 * 100_000 + 206 * 300_000) // 1_000_000)
    # Bob's request is invisible to alice.
    none = await setup.stub.ListReceipts(
        account_pb2.ListReceiptsRequest(request_id="b-0"), metadata=_auth(setup.alice_key)
    )
    assert list(none.receipts) == []
    code = await _status(
        setup.stub.ListReceipts(
            account_pb2.ListReceiptsRequest(page_token="garbage!"),
            metadata=_auth(setup.alice_key),
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code = await _status(
        setup.stub.ListReceipts(
            account_pb2.ListReceiptsRequest(page_size=501), metadata=_auth(setup.alice_key)
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_usage_by_day_key_and_model(setup: Setup) -> None:
    ledger = setup.ledger
    await _settle(ledger, "u-1", setup.alice, 100)
    await _settle(ledger, "u-2", setup.alice, 200, model="big")
    await _settle(ledger, "u-3", setup.bob, 300)
    answer = await setup.stub.GetUsage(
        account_pb2.GetUsageRequest(), metadata=_auth(setup.alice_key)
    )
    assert sorted((r.model, r.requests, r.input_tokens) for r in answer.rows) == [
        ("big", 1, 200),
        ("smol", 1, 100),
    ]
    only = await setup.stub.GetUsage(
        account_pb2.GetUsageRequest(model="big"), metadata=_auth(setup.alice_key)
    )
    assert [(r.model, r.output_tokens) for r in only.rows] == [("big", 400)]
    assert only.rows[0].day.count("-") == 2 and only.rows[0].cost_micro_usd > 0


async def test_lease_lifecycle_and_ownership(setup: Setup) -> None:
    stub = setup.stub
    # gpus 0: the node's own count (it is leased whole).
    create = account_pb2.CreateLeaseRequest(node_id=NODE.node_id, hours=2, lease_id="lease-alice-1")
    created = await stub.CreateLease(create, metadata=_auth(setup.alice_key))
    lease = created.lease
    hour = PRICE_PER_GPU_HOUR * NODE_GPUS
    total = hour * 2
    assert lease.lease_id == "lease-alice-1" and lease.node_id == NODE.node_id
    assert lease.status == account_pb2.LEASE_STATUS_ACTIVE
    assert lease.held_micro_usd == total and lease.periods_total == 2
    assert lease.ends_at_unix_ms - lease.started_at_unix_ms == 2 * 3_600_000
    # A retry with the same id is the same lease, charged once.
    again = await stub.CreateLease(create, metadata=_auth(setup.alice_key))
    assert again.lease == lease
    balance = await stub.GetBalance(
        account_pb2.GetBalanceRequest(), metadata=_auth(setup.alice_key)
    )
    assert balance.available_micro_usd == 10_000_000 - total
    got = await stub.GetLease(
        account_pb2.GetLeaseRequest(lease_id="lease-alice-1"), metadata=_auth(setup.alice_key)
    )
    assert got.lease == lease
    # Bob can neither see, end nor take over alice's lease.
    for call in (
        stub.GetLease(
            account_pb2.GetLeaseRequest(lease_id="lease-alice-1"), metadata=_auth(setup.bob_key)
        ),
        stub.EndLease(
            account_pb2.EndLeaseRequest(lease_id="lease-alice-1"), metadata=_auth(setup.bob_key)
        ),
    ):
        assert await _status(call) == grpc.StatusCode.NOT_FOUND
    taken = await _status(stub.CreateLease(create, metadata=_auth(setup.bob_key)))
    assert taken == grpc.StatusCode.ALREADY_EXISTS
    listed = await stub.ListLeases(account_pb2.ListLeasesRequest(), metadata=_auth(setup.alice_key))
    assert list(listed.leases) == [lease] and not listed.next_page_token
    theirs = await stub.ListLeases(account_pb2.ListLeasesRequest(), metadata=_auth(setup.bob_key))
    assert not theirs.leases
    ended = await stub.EndLease(
        account_pb2.EndLeaseRequest(lease_id="lease-alice-1"), metadata=_auth(setup.alice_key)
    )
    assert ended.lease.status == account_pb2.LEASE_STATUS_ENDED
    # Ended within its first hour: that hour is paid, the second refunded.
    assert ended.lease.charged_micro_usd == hour
    assert ended.lease.refunded_micro_usd == hour
    # A retry (its answer was lost, say) is answered with the lease as it ended: no
    # error, no second refund.
    twice = await stub.EndLease(
        account_pb2.EndLeaseRequest(lease_id="lease-alice-1"), metadata=_auth(setup.alice_key)
    )
    assert twice.lease == ended.lease
    # Two at once: both answered, one refund.
    await stub.CreateLease(
        account_pb2.CreateLeaseRequest(node_id=NODE.node_id, hours=2, lease_id="lease-alice-2"),
        metadata=_auth(setup.alice_key),
    )
    end = account_pb2.EndLeaseRequest(lease_id="lease-alice-2")
    pair = await asyncio.gather(
        *(stub.EndLease(end, metadata=_auth(setup.alice_key)) for _ in range(2))
    )
    assert pair[0].lease == pair[1].lease and pair[0].lease.refunded_micro_usd == hour
    balance = await stub.GetBalance(
        account_pb2.GetBalanceRequest(), metadata=_auth(setup.alice_key)
    )
    assert balance.available_micro_usd == 10_000_000 - 2 * hour


async def test_lease_refusals_say_why(setup: Setup) -> None:
    stub = setup.stub

    async def refused(key: str, **fields: object) -> tuple[grpc.StatusCode, str]:
        request = account_pb2.CreateLeaseRequest(**fields)  # type: ignore[arg-type]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateLease(request, metadata=_auth(key))
        return info.value.code(), info.value.details() or ""

    node = NODE.node_id
    code, detail = await refused(setup.bob_key, node_id=node, hours=1, gpus=NODE_GPUS)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "insufficient balance" in detail
    code, _ = await refused(setup.alice_key, node_id="12D3KooWnobody", hours=1, gpus=1)
    assert code == grpc.StatusCode.NOT_FOUND
    for gpus in (1, NODE_GPUS + 1):  # a node is leased whole: all its GPUs or none
        code, detail = await refused(setup.alice_key, node_id=node, hours=1, gpus=gpus)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"has {NODE_GPUS} GPU(s)" in detail and f"gpus={NODE_GPUS}" in detail
    code, detail = await refused(
        setup.alice_key, node_id=node, hours=1, max_price_micro_usd_per_gpu_hour=1
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "cap" in detail
    code, _ = await refused(setup.alice_key, node_id=node, hours=0)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = await refused(setup.provider_key, node_id=node, hours=1)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert (
        await _status(
            stub.GetLease(
                account_pb2.GetLeaseRequest(lease_id="no-such"), metadata=_auth(setup.alice_key)
            )
        )
        == grpc.StatusCode.NOT_FOUND
    )
    code, detail = await _refusal(
        stub.ListLeases(
            account_pb2.ListLeasesRequest(page_token="not-a-token"), metadata=_auth(setup.alice_key)
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in detail
    code, detail = await _refusal(
        stub.ListLeases(
            account_pb2.ListLeasesRequest(page_size=501), metadata=_auth(setup.alice_key)
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in detail


async def test_a_node_is_leased_to_one_client_at_a_time(setup: Setup) -> None:
    stub = setup.stub
    alice, bob = _auth(setup.alice_key), _auth(setup.bob_key)
    setup.ledger.store.deposit(setup.bob, 10_000_000)
    ask = account_pb2.CreateLeaseRequest(node_id=NODE.node_id, hours=1)
    mine = (await stub.CreateLease(ask, metadata=alice)).lease
    code, detail = await _refusal(stub.CreateLease(ask, metadata=bob))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "leased to another client until" in detail and "ListNodes" in detail
    bobs = await stub.GetBalance(account_pb2.GetBalanceRequest(), metadata=bob)
    assert bobs.available_micro_usd == 11_000_000  # refused: nothing taken
    code, detail = await _refusal(stub.CreateLease(ask, metadata=alice))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and mine.lease_id in detail
    await stub.EndLease(account_pb2.EndLeaseRequest(lease_id=mine.lease_id), metadata=alice)
    theirs = (await stub.CreateLease(ask, metadata=bob)).lease
    assert theirs.status == account_pb2.LEASE_STATUS_ACTIVE
    active = await stub.ListLeases(account_pb2.ListLeasesRequest(active_only=True), metadata=alice)
    assert not active.leases
    everything = await stub.ListLeases(account_pb2.ListLeasesRequest(), metadata=alice)
    assert [x.lease_id for x in everything.leases] == [mine.lease_id]
    assert everything.leases[0].status == account_pb2.LEASE_STATUS_ENDED


async def test_list_leases_pages_newest_first(setup: Setup) -> None:
    stub = setup.stub
    alice = _auth(setup.alice_key)
    for n in range(3):
        ask = account_pb2.CreateLeaseRequest(node_id=NODE.node_id, hours=1, lease_id=f"l{n}")
        await stub.CreateLease(ask, metadata=alice)
        await stub.EndLease(account_pb2.EndLeaseRequest(lease_id=f"l{n}"), metadata=alice)
    first = await stub.ListLeases(account_pb2.ListLeasesRequest(page_size=2), metadata=alice)
    assert len(first.leases) == 2 and first.next_page_token
    rest = await stub.ListLeases(
        account_pb2.ListLeasesRequest(page_size=2, page_token=first.next_page_token),
        metadata=alice,
    )
    assert len(rest.leases) == 1 and not rest.next_page_token
    leases = [*first.leases, *rest.leases]
    assert sorted(x.lease_id for x in leases) == ["l0", "l1", "l2"]
    started = [x.started_at_unix_ms for x in leases]
    assert started == sorted(started, reverse=True)


async def test_without_market_prices_leases_are_unimplemented(
    database_url: str, tmp_path: Path
) -> None:
    ledger = Ledger(
        LedgerSettings(database_url=database_url, intent_log_dir=tmp_path / "i"),
        coordinator=COORDINATOR,
    )
    await ledger.start(sweep=False)
    server = grpc.aio.server()
    add_account_service(server, ledger)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        account = ledger.store.create_account(AccountKind.CLIENT, "carol").id
        key = ledger.store.issue_key(account).secret_key
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = account_pb2_grpc.AccountServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.CreateLease(
                    account_pb2.CreateLeaseRequest(node_id=NODE.node_id, hours=1, gpus=1),
                    metadata=_auth(key),
                )
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(grace=None)
        await ledger.close()


@pytest.mark.parametrize("hours", [LEASE_HOURS_MAX + 1, 2**32 - 1])
async def test_a_lease_longer_than_the_maximum_is_refused_and_writes_nothing(
    database_url: str, tmp_path: Path, hours: int
) -> None:
    """CreateLease's hours is a uint32: a gRPC caller (the CLI caps it) could lease a
    cheap node for 2**32-1 hours, a lease ending after the year 9999, and every later
    CreateLease for that node failed in the writer (its end cannot be formatted),
    failing the whole batch with it. Now the service refuses it up front, naming the
    maximum, the CLI's."""
    ledger = Ledger(
        LedgerSettings(database_url=database_url, intent_log_dir=tmp_path / "i"),
        coordinator=COORDINATOR,
    )
    await ledger.start(sweep=False)
    server = grpc.aio.server()
    add_account_service(server, ledger, lease_terms=lambda node_id: LeaseTerms(1, 1))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        account = ledger.store.create_account(AccountKind.CLIENT, "carol").id
        ledger.store.deposit(account, 10**10)
        key = ledger.store.issue_key(account).secret_key
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = account_pb2_grpc.AccountServiceStub(channel)
            code, detail = await _refusal(
                stub.CreateLease(
                    account_pb2.CreateLeaseRequest(node_id=NODE.node_id, hours=hours),
                    metadata=_auth(key),
                )
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert f"from 1 to {LEASE_HOURS_MAX}" in detail and "lease fewer hours" in detail
            await ledger.flush()
            assert ledger.store.leases() == []
            assert ledger.store.account(account).available_micro_usd == 10**10
            # The longest lease allowed is made, and a second one on its node is refused
            # with the time it ends.
            ask = account_pb2.CreateLeaseRequest(node_id=NODE.node_id, hours=LEASE_HOURS_MAX)
            lease = (await stub.CreateLease(ask, metadata=_auth(key))).lease
            assert lease.periods_total == LEASE_HOURS_MAX
            code, detail = await _refusal(stub.CreateLease(ask, metadata=_auth(key)))
            assert code == grpc.StatusCode.FAILED_PRECONDITION and lease.lease_id in detail
    finally:
        await server.stop(grace=None)
        await ledger.close()


def _token(*position: object) -> str:
    raw = json.dumps(list(position)).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        _token(2**63, "x"),
        _token(2**70, "x"),
        _token(-(2**63) - 1, "x"),
        _token(-1, "x"),
        _token(True, "x"),
        _token(1, "a\x00b"),
        _token(1, 2),
        _token(1, "x", 3),
        _token({"a": 1}),
    ],
)
async def test_a_page_token_this_service_did_not_issue_is_invalid_argument(
    setup: Setup, token: str
) -> None:
    """A token is decoded into the (time, id) the query starts after: a time beyond a
    64-bit integer overflowed in the database driver (INTERNAL) before."""
    alice = _auth(setup.alice_key)
    for call in (
        setup.stub.ListReceipts(account_pb2.ListReceiptsRequest(page_token=token), metadata=alice),
        setup.stub.ListLeases(account_pb2.ListLeasesRequest(page_token=token), metadata=alice),
    ):
        code, detail = await _refusal(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_token is not one this service issued" in detail


async def test_a_page_token_at_the_int64_limit_is_accepted(setup: Setup) -> None:
    alice = _auth(setup.alice_key)
    token = _token(2**63 - 1, "x")
    page = await setup.stub.ListReceipts(
        account_pb2.ListReceiptsRequest(page_token=token), metadata=alice
    )
    assert list(page.receipts) == []
    await setup.stub.ListLeases(account_pb2.ListLeasesRequest(page_token=token), metadata=alice)
