"""Billing end to end, with real coordinator and node processes and the real engine, on
SQLite and on PostgreSQL (a fresh schema per module, dropped after).

One coordinator and one node per database; the crash tests restart the coordinator on
the same port and data directory (the node registers again by itself).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from mercato.v1 import (
    account_pb2,
    account_pb2_grpc,
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    market_pb2,
)

from marketplace.cli.processes import Service, mercato_command
from marketplace.ledger import LedgerSettings, LedgerStore
from marketplace.ledger.models import AccountKind
from tests.postgres import fresh_schema

from .conftest import MODEL, Cluster, authorized_channel, wait_for_nodes

pytestmark = pytest.mark.integration

FEE_BPS = 1_000  # the ledger's default platform fee
FAULT_EXIT_CODE = 70


@dataclass
class Market:
    cluster: Cluster
    coordinator: Service
    node: Service
    database_url: str  # what the CLI and the test's own store open
    coordinator_database_url: str | None  # MERCATO_DATABASE_URL of the coordinator

    @property
    def address(self) -> str:
        return str(self.coordinator.ready["address"])

    @property
    def key(self) -> str:
        return str(self.coordinator.ready["api_key"])

    @property
    def node_id(self) -> str:
        return str(self.node.ready["node_id"])

    def store(self) -> LedgerStore:
        return LedgerStore.open(LedgerSettings(database_url=self.database_url))

    def restart_coordinator(self, fault: str | None = None) -> Service:
        """Stop (or reap) the coordinator; start it again on the same port and home."""
        self.coordinator.stop(timeout_s=30)
        self.cluster.services.remove(self.coordinator)
        env = {"MERCATO_COORDINATOR_FAULT": fault} if fault else None
        self.coordinator = self.cluster.start_coordinator(
            "coordinator",
            "--port",
            str(self.coordinator.ready["port"]),
            env=env,
            database_url=self.coordinator_database_url,
        )
        wait_for_nodes(self.address, MODEL, 1, timeout_s=60)
        return self.coordinator

    def cli(self, *args: str) -> dict:
        completed = subprocess.run(
            [*mercato_command(*args), "--json", "--database-url", self.database_url],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return json.loads(completed.stdout)


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def database(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None for SQLite in the coordinator's home; a PostgreSQL URL with a fresh schema."""
    if request.param == "sqlite":
        yield None
        return
    with fresh_schema("billing") as url:
        yield url


@pytest.fixture(scope="module")
def market(
    database: str | None, tmp_path_factory: pytest.TempPathFactory, prepared_model: Path
) -> Iterator[Market]:
    cluster = Cluster(tmp_path_factory.mktemp("billing"))
    try:
        coordinator = cluster.start_coordinator("coordinator", database_url=database)
        node = cluster.start_node(
            "node",
            str(coordinator.ready["address"]),
            "--region",
            "eu-west",
            # The real engine; MERCATO_TEST_ENGINE=fake only to debug this module quickly.
            engine=os.environ.get("MERCATO_TEST_ENGINE", "vllm"),
        )
        wait_for_nodes(str(coordinator.ready["address"]), MODEL, 1)
        url = database or f"sqlite:///{cluster.root / 'coordinator' / 'mercato.db'}"
        yield Market(cluster, coordinator, node, url, database)
    finally:
        cluster.stop()


def _request(request_id: str = "", lease_id: str = "", max_tokens: int = 24):
    return inference_pb2.GenerateRequest(
        request_id=request_id,
        model=MODEL,
        chat=common_pb2.ChatInput(
            messages=[common_pb2.ChatMessage(role="user", content="Name three colours.")]
        ),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
        lease_id=lease_id,
    )


def _generate(channel: grpc.Channel, request: inference_pb2.GenerateRequest, metadata=()):
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    deltas = 0
    final = None
    for response in stub.Generate(request, timeout=300, metadata=metadata):
        if response.HasField("delta"):
            deltas += 1
        elif response.HasField("final"):
            final = response.final
    assert final is not None
    return final, deltas


def _posted(store: LedgerStore, ref: str) -> int:
    return store.account(ref).posted_micro_usd


def _posted_when_idle(store: LedgerStore, ref: str) -> int:
    """The posted balance once none of the account's requests holds money: an earlier
    test's cut-off request may still be settling (it waits for the node's late receipt,
    ``late_receipt_wait_s``, and is then charged for what it was sent)."""
    _until(lambda: store.account(ref).pending_debits_micro_usd == 0)
    return _posted(store, ref)


def _wait_settled(store: LedgerStore, request_id: str, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while (row := store.settlement(request_id)) is None:
        assert time.monotonic() < deadline, f"request {request_id} was never settled"
        time.sleep(0.05)
    return row


def _client(store: LedgerStore, name: str, credits_micro_usd: int) -> str:
    account = store.create_account(AccountKind.CLIENT, name)
    if credits_micro_usd:
        store.deposit(account.id, credits_micro_usd, f"fund-{account.id}")
    return store.issue_key(account.id, "k").secret_key


# ---------------------------------------------------------------- money


def test_paid_request_moves_exactly_the_final_cost(market: Market) -> None:
    store = market.store()
    try:
        client = store.account("test-client").id
        before_client = _posted(store, client)
        before_fees = _posted(store, "platform.fees")
        try:
            before_provider = _posted(store, market.node_id)
        except Exception:  # the provider account appears with the first earning
            before_provider = 0
        request_id = f"paid-{secrets.token_hex(4)}"
        with authorized_channel(market.address, market.key) as channel:
            final, deltas = _generate(channel, _request(request_id))
        assert deltas > 0 and final.request_id == request_id
        [segment] = final.segments
        expected = math.ceil(
            (
                segment.input_tokens * segment.price_input_micro_usd_per_mtok
                + segment.output_tokens * segment.price_output_micro_usd_per_mtok
            )
            / 1_000_000
        )
        assert final.cost_micro_usd == expected > 0
        [signed] = final.receipts
        usage = market_pb2.UsageReceipt.FromString(signed.receipt)
        assert usage.node_id == market.node_id and usage.request_id == request_id
        assert usage.output_tokens == final.output_tokens
        assert (
            signed.coordinator_public_key.hex()
            == market.coordinator.ready["coordinator_public_key"]
        )
        _wait_settled(store, request_id)
        fee = final.cost_micro_usd * FEE_BPS // 10_000
        assert _posted(store, client) == before_client - final.cost_micro_usd
        assert _posted(store, market.node_id) == before_provider + final.cost_micro_usd - fee
        assert _posted(store, "platform.fees") == before_fees + fee
        assert store.account(client).pending_debits_micro_usd == 0  # hold resolved
    finally:
        store.close()
    verified = market.cli("receipts", "verify", request_id)
    assert verified["ok"] is True and len(verified["receipts"]) == 1


def _story(request_id: str, max_tokens: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        request_id=request_id,
        model=MODEL,
        chat=common_pb2.ChatInput(
            messages=[
                common_pb2.ChatMessage(
                    role="user", content="Write a long story about a dragon who learns to cook."
                )
            ]
        ),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )


def test_client_cancel_mid_stream_pays_for_what_it_was_sent(market: Market) -> None:
    """The client reads a few tokens and cancels: no final, so the node's receipt comes
    late, on its heartbeat stream; the client pays for the tokens the coordinator relayed
    to it (those it read, and the few in flight when it cancelled), the provider earns
    its share, and the receipt is the node's, countersigned."""
    max_tokens = 256
    request_id = f"cut-{secrets.token_hex(4)}"
    store = market.store()
    try:
        try:
            before_provider = _posted(store, market.node_id)
        except Exception:  # the provider account appears with the first earning
            before_provider = 0
        before_fees = _posted(store, "platform.fees")
        with authorized_channel(market.address, market.key) as channel:
            accounts = account_pb2_grpc.AccountServiceStub(channel)
            before = accounts.GetBalance(account_pb2.GetBalanceRequest(), timeout=30)
            call = inference_pb2_grpc.InferenceServiceStub(channel).Generate(
                _story(request_id, max_tokens), timeout=300
            )
            received = 0
            for response in call:
                assert response.HasField("delta"), "the request ended before the cancel"
                received += len(response.delta.token_ids)
                if received >= 4:
                    break
            call.cancel()

            deadline = time.monotonic() + 30
            while not (
                page := accounts.ListReceipts(
                    account_pb2.ListReceiptsRequest(request_id=request_id), timeout=30
                )
            ).receipts:
                assert time.monotonic() < deadline, "the cancelled request was never billed"
                time.sleep(0.1)
            [item] = page.receipts
            _until(
                lambda: (
                    accounts.GetBalance(account_pb2.GetBalanceRequest(), timeout=30).held_micro_usd
                    == before.held_micro_usd
                )
            )
            after = accounts.GetBalance(account_pb2.GetBalanceRequest(), timeout=30)

        usage = market_pb2.UsageReceipt.FromString(item.receipt.receipt)
        assert usage.request_id == request_id and usage.node_id == market.node_id
        assert received <= item.output_tokens < max_tokens  # relayed, cut off mid-stream
        assert usage.output_tokens >= item.output_tokens  # the node wrote at least as many
        assert item.input_tokens == usage.input_tokens > 0
        cost = math.ceil(
            (
                item.input_tokens * usage.price_input_micro_usd_per_mtok
                + item.output_tokens * usage.price_output_micro_usd_per_mtok
            )
            / 1_000_000
        )
        assert item.cost_micro_usd == cost > 0
        assert before.posted_micro_usd - after.posted_micro_usd == cost
        fee = cost * FEE_BPS // 10_000
        assert _posted(store, market.node_id) == before_provider + cost - fee
        assert _posted(store, "platform.fees") == before_fees + fee
        assert store.rejections(request_id) == []
    finally:
        store.close()
    verified = market.cli("receipts", "verify", request_id)
    assert verified["ok"] is True and len(verified["receipts"]) == 1


def test_insufficient_balance_is_failed_precondition(market: Market) -> None:
    store = market.store()
    try:
        key = _client(store, f"poor-{secrets.token_hex(3)}", 1)
    finally:
        store.close()
    with authorized_channel(market.address, key) as channel, pytest.raises(grpc.RpcError) as caught:
        _generate(channel, _request())
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "insufficient balance: need " in caught.value.details()
    assert ", have 1 " in caught.value.details()


def test_missing_invalid_and_revoked_keys_are_unauthenticated(market: Market) -> None:
    store = market.store()
    try:
        key = _client(store, f"revokee-{secrets.token_hex(3)}", 1_000_000)
    finally:
        store.close()
    with grpc.insecure_channel(market.address) as channel:
        for metadata in ((), (("authorization", "Bearer mk_0123456789abcdef_" + "A" * 43),)):
            with pytest.raises(grpc.RpcError) as caught:
                _generate(channel, _request(), metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        final, _ = _generate(channel, _request(), (("authorization", f"Bearer {key}"),))
        assert final.cost_micro_usd > 0
        key_id = key.split("_")[1]
        assert market.cli("keys", "revoke", key_id)["id"] == key_id
        with pytest.raises(grpc.RpcError) as caught:
            _generate(channel, _request(), (("authorization", f"Bearer {key}"),))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in caught.value.details()


# ---------------------------------------------------------------- leases


def _until(predicate, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def test_lease_routes_only_to_its_node(market: Market) -> None:
    with authorized_channel(market.address, market.key) as channel:
        accounts = account_pb2_grpc.AccountServiceStub(channel)
        lease = accounts.CreateLease(
            account_pb2.CreateLeaseRequest(node_id=market.node_id, hours=1, gpus=1), timeout=30
        ).lease
        assert lease.status == account_pb2.LEASE_STATUS_ACTIVE and lease.held_micro_usd > 0

        final, _ = _generate(channel, _request(lease_id=lease.lease_id))
        assert final.node_id == market.node_id
        assert final.cost_micro_usd == 0  # the lease pays
        [signed] = final.receipts
        assert market_pb2.UsageReceipt.FromString(signed.receipt).lease_id == lease.lease_id

        # The node is leased whole, to one client at a time.
        with pytest.raises(grpc.RpcError) as caught:
            accounts.CreateLease(
                account_pb2.CreateLeaseRequest(node_id=market.node_id, hours=1), timeout=30
            )
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert lease.lease_id in caught.value.details()
        api = inference_pb2_grpc.InferenceServiceStub(channel)
        [listed] = api.ListNodes(inference_pb2.ListNodesRequest(), timeout=30).nodes
        assert listed.leased

        # Serverless traffic never goes to the leased node (here the only node), from the
        # moment CreateLease answered: the refusal names the leases.
        with pytest.raises(grpc.RpcError) as caught:
            _generate(channel, _request())
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
        assert "[constraint: leased]" in caught.value.details()
        for lease_id, code in (("no-such-lease", grpc.StatusCode.NOT_FOUND),):
            with pytest.raises(grpc.RpcError) as caught:
                _generate(channel, _request(lease_id=lease_id))
            assert caught.value.code() == code

        ended = accounts.EndLease(
            account_pb2.EndLeaseRequest(lease_id=lease.lease_id), timeout=30
        ).lease
        assert ended.refunded_micro_usd == ended.held_micro_usd - ended.charged_micro_usd
        with pytest.raises(grpc.RpcError) as caught:
            _generate(channel, _request(lease_id=lease.lease_id))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        def serverless_served() -> bool:
            try:
                return _generate(channel, _request())[0].node_id == market.node_id
            except grpc.RpcError:
                return False

        _until(serverless_served)


# ---------------------------------------------------------------- crashes


def _crash(market: Market, fault: str, request_id: str) -> Service:
    """Run ``request_id`` on a coordinator that exits at ``fault``; restart it after."""
    crashing = market.restart_coordinator(fault)
    with (
        authorized_channel(market.address, market.key) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        _generate(channel, _request(request_id, max_tokens=8))
    assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN)
    assert crashing.process.wait(timeout=30) == FAULT_EXIT_CODE
    return market.restart_coordinator()


@pytest.mark.timeout(900)  # two or three coordinator restarts, each waiting for the node
def test_crash_after_relay_settles_exactly_once(market: Market) -> None:
    store = market.store()
    try:
        client = store.account("test-client").id
        before = _posted_when_idle(store, client)
        request_id = f"crash-{secrets.token_hex(4)}"
        restarted = _crash(market, "exit-after-relay", request_id)
        assert restarted.ready["recovery"]["replayed"] == 1
        row = _wait_settled(store, request_id)
        assert row["cost_micro_usd"] > 0
        assert _posted(store, client) == before - row["cost_micro_usd"]
        assert store.account(client).pending_debits_micro_usd == 0
        assert len(store.receipts(request_id)) == 1
        assert not [h for h in store.open_holds() if h["request_id"] == request_id]
        # Another restart replays nothing and charges nothing again.
        again = market.restart_coordinator()
        assert again.ready["recovery"]["replayed"] == 0
        assert _posted(store, client) == before - row["cost_micro_usd"]
    finally:
        store.close()
    assert market.cli("receipts", "verify", request_id)["ok"] is True


@pytest.mark.timeout(900)
def test_crash_before_settle_releases_the_hold(market: Market) -> None:
    store = market.store()
    try:
        client = store.account("test-client").id
        before = _posted_when_idle(store, client)
        request_id = f"lost-{secrets.token_hex(4)}"
        restarted = _crash(market, "exit-before-settle", request_id)
        assert restarted.ready["recovery"]["released"] >= 1
        assert store.settlement(request_id) is None
        _until(lambda: store.account(client).pending_debits_micro_usd == 0)
        assert _posted(store, client) == before
    finally:
        store.close()


def test_ledger_verifies_at_the_end(market: Market) -> None:
    with authorized_channel(market.address, market.key) as channel:
        final, _ = _generate(channel, _request())  # the restarted coordinator still bills
    assert final.cost_micro_usd > 0
    time.sleep(0.5)  # let the last settlement commit
    report = market.cli("ledger", "verify")
    assert report["ok"] is True, report
