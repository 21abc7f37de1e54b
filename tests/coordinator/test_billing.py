"""coordinator.billing with a real ledger (SQLite in tmp): keys, the hold rule,
settlement of good, forged, miscounted and missing receipts, leases."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import grpc
import grpc.aio
import pytest
from mercato.v1 import (
    account_pb2,
    account_pb2_grpc,
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    market_pb2,
)

from coordinator.billing import (
    Billing,
    BillingRefused,
    api_key_from_metadata,
    hold_prices,
    input_tokens_max,
    ledger_settings,
)
from coordinator.server import Coordinator
from coordinator.settings import CoordinatorSettings
from coordinator.validation import ValidRequest, validate_request
from marketplace.identity import Identity
from marketplace.ledger import (
    Ledger,
    LedgerSettings,
    Unauthenticated,
    sign_receipt,
    verify_ledger,
    verify_offline,
)
from marketplace.ledger.models import AccountKind
from marketplace.ledger.store import LedgerStore

from . import fakes
from .conftest import billed_coordinator_and_node, fast_settings, funded_client_key

MODEL = "SmolLM2-135M-Instruct"
PRICE_IN = 100_000
PRICE_OUT = 200_000
FEE_BPS = 1_000
NODE = Identity.from_seed(b"n" * 32)
OTHER_NODE = Identity.from_seed(b"o" * 32)
COORDINATOR = Identity.from_seed(b"c" * 32)


@dataclass
class Part:
    """A relayed segment as the relay's SegmentOutcome carries it."""

    node_id: str
    worker_request_id: str
    segment_index: int = 0
    price_input_micro_usd_per_mtok: int = PRICE_IN
    price_output_micro_usd_per_mtok: int = PRICE_OUT
    resumed_tokens: int = 0
    input_tokens: int = 20
    output_tokens: int = 10
    receipt: market_pb2.SignedReceipt | None = None
    completed: bool = True  # False: cut off before the node's final


class FakeRegistry:
    def __init__(self) -> None:
        self.live: set[str] = set()

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.live

    def snapshot(self) -> SimpleNamespace:
        return SimpleNamespace(nodes=[SimpleNamespace(node_id=n) for n in sorted(self.live)])


class Context:
    def __init__(self, key: str | None) -> None:
        self._metadata = (("authorization", f"Bearer {key}"),) if key else ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


def receipt(
    part: Part, node: Identity = NODE, lease_id: str = "", **changes: int
) -> market_pb2.SignedReceipt:
    usage = market_pb2.UsageReceipt(
        request_id=part.worker_request_id,
        node_id=node.node_id,
        model=MODEL,
        input_tokens=part.input_tokens,
        output_tokens=part.output_tokens,
        price_input_micro_usd_per_mtok=part.price_input_micro_usd_per_mtok,
        price_output_micro_usd_per_mtok=part.price_output_micro_usd_per_mtok,
        segment_index=part.segment_index,
        lease_id=lease_id,
    )
    for name, value in changes.items():
        setattr(usage, name, value)
    return sign_receipt(usage, node)


@dataclass
class Setup:
    billing: Billing
    ledger: Ledger
    registry: FakeRegistry
    settings: CoordinatorSettings
    key: str
    account_id: str


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    settings = CoordinatorSettings(home=tmp_path, port=0, lease_node_grace_s=0)
    ledger = Ledger(
        LedgerSettings(
            database_url=f"sqlite:///{tmp_path / 'ledger.db'}",
            intent_log_dir=tmp_path / "intents",
            hold_sweep_interval_s=3600,
            platform_fee_bps=FEE_BPS,
        ),
        coordinator=Identity.from_seed(b"c" * 32),
    )
    registry = FakeRegistry()
    billing = Billing(settings, Identity.from_seed(b"c" * 32), registry, ledger=ledger)  # type: ignore[arg-type]
    await billing.start()
    store = ledger.store
    account = store.create_account(AccountKind.CLIENT, "alice")
    store.deposit(account.id, 1_000_000, "fund-alice")
    issued = store.issue_key(account.id, "k")
    yield Setup(billing, ledger, registry, settings, issued.secret_key, account.id)
    await billing.close()


def valid(settings: CoordinatorSettings, **fields: object) -> ValidRequest:
    values: dict[str, object] = {"sampling": common_pb2.SamplingParams(max_tokens=16), **fields}
    request = inference_pb2.GenerateRequest(
        model=MODEL,
        chat=common_pb2.ChatInput(
            messages=[common_pb2.ChatMessage(role="user", content="Say hi, in ünicode.")]
        ),
        **values,  # type: ignore[arg-type]
    )
    return validate_request(request, settings)


def candidate(price_in: int = PRICE_IN, price_out: int = PRICE_OUT) -> SimpleNamespace:
    terms = SimpleNamespace(
        price_input_micro_usd_per_mtok=price_in, price_output_micro_usd_per_mtok=price_out
    )
    return SimpleNamespace(terms_for=lambda model: terms if model == MODEL else None)


async def available(setup: Setup, account: str | None = None) -> int:
    await setup.ledger.flush()
    return (await setup.ledger.balance(account or setup.account_id)).available_micro_usd


# ---------------------------------------------------------------- pure rules


def test_bearer_key_from_metadata() -> None:
    assert api_key_from_metadata([("x", "y"), ("authorization", "Bearer mk_a_b")]) == "mk_a_b"
    assert api_key_from_metadata([("authorization", "bearer  mk_a_b ")]) == "mk_a_b"
    with pytest.raises(Unauthenticated, match="missing API key"):
        api_key_from_metadata([])
    with pytest.raises(Unauthenticated, match="Bearer"):
        api_key_from_metadata([("authorization", "Basic abc")])


def test_input_bound_counts_bytes_and_overheads() -> None:
    settings = CoordinatorSettings(template_overhead_tokens_max=100, message_overhead_tokens_max=7)
    request = valid(settings)
    text = "Say hi, in ünicode."
    assert input_tokens_max(request.worker_request, settings) == (
        100 + 7 + len(b"user") + len(text.encode())
    )
    assert len(text.encode()) == len(text) + 1  # the bound counts bytes, not characters
    prompt = validate_request(
        inference_pb2.GenerateRequest(model=MODEL, prompt="€uro"), settings
    ).worker_request
    assert input_tokens_max(prompt, settings) == 100 + len("€uro".encode())


def test_hold_prices_are_the_highest_among_candidates() -> None:
    candidates = [candidate(10, 500), candidate(30, 200), SimpleNamespace(terms_for=lambda m: None)]
    assert hold_prices(candidates, MODEL) == (30, 500)
    assert hold_prices([], MODEL) == (0, 0)


def test_ledger_settings_default_to_sqlite_in_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MERCATO_DATABASE_URL", raising=False)
    monkeypatch.delenv("MERCATO_LEDGER_DATABASE_URL", raising=False)
    identity = Identity.from_seed(b"c" * 32)
    settings = ledger_settings(CoordinatorSettings(home=tmp_path), identity)
    assert settings.database_url == f"sqlite:///{tmp_path / 'mercato.db'}"
    assert settings.intent_log_dir == tmp_path / "coordinator" / "ledger-intents"
    assert settings.owner == identity.node_id
    url = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    monkeypatch.setenv("MERCATO_DATABASE_URL", url)
    assert ledger_settings(CoordinatorSettings(home=tmp_path), identity).database_url == url


# ---------------------------------------------------------------- keys


async def test_authenticate_missing_invalid_revoked(setup: Setup) -> None:
    principal = await setup.billing.authenticate(Context(setup.key))  # type: ignore[arg-type]
    assert principal.account_id == setup.account_id
    for key in (None, "mk_0123456789abcdef_" + "A" * 43, "not-a-key"):
        with pytest.raises(BillingRefused) as caught:
            await setup.billing.authenticate(Context(key))  # type: ignore[arg-type]
        assert caught.value.status_code == grpc.StatusCode.UNAUTHENTICATED
        assert not key or key not in str(caught.value)  # the key is never echoed
    await setup.ledger.revoke_key(principal.key_id)
    with pytest.raises(BillingRefused) as caught:
        await setup.billing.authenticate(Context(setup.key))  # type: ignore[arg-type]
    assert caught.value.status_code == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in str(caught.value)


async def test_provider_key_may_not_generate(setup: Setup) -> None:
    store = setup.ledger.store
    provider = store.create_account(AccountKind.PROVIDER, "gpu-1", node_id=NODE.node_id)
    key = store.issue_key(provider.id, "p").secret_key
    principal = await setup.billing.authenticate(Context(key))  # type: ignore[arg-type]
    with pytest.raises(BillingRefused) as caught:
        await setup.billing.admit(principal, valid(setup.settings), [candidate()])
    assert caught.value.status_code == grpc.StatusCode.PERMISSION_DENIED


# ---------------------------------------------------------------- holds and settlement


async def test_hold_is_the_maximum_cost(setup: Setup) -> None:
    principal = await setup.billing.authenticate(Context(setup.key))  # type: ignore[arg-type]
    request = valid(setup.settings)
    admission = await setup.billing.admit(
        principal, request, [candidate(), candidate(PRICE_IN * 2, PRICE_OUT)]
    )
    bound = input_tokens_max(request.worker_request, setup.settings)
    expected = math.ceil((bound * PRICE_IN * 2 + 16 * PRICE_OUT) / 1_000_000)
    assert admission.hold_micro_usd == expected
    assert await available(setup) == 1_000_000 - expected
    setup.billing.release(admission)
    assert await available(setup) == 1_000_000


async def test_insufficient_balance_names_need_and_have(setup: Setup) -> None:
    principal = await setup.billing.authenticate(Context(setup.key))  # type: ignore[arg-type]
    request = valid(setup.settings, sampling=common_pb2.SamplingParams(max_tokens=32_000))
    with pytest.raises(BillingRefused) as caught:
        await setup.billing.admit(principal, request, [candidate(PRICE_IN, 100_000_000)])
    assert caught.value.status_code == grpc.StatusCode.FAILED_PRECONDITION
    assert "insufficient balance: need " in str(caught.value)
    assert "have 1000000" in str(caught.value)


async def test_settle_charges_the_coordinators_count(setup: Setup) -> None:
    principal = await setup.billing.authenticate(Context(setup.key))  # type: ignore[arg-type]
    request = valid(setup.settings)
    admission = await setup.billing.admit(principal, request, [candidate()])
    part = Part(NODE.node_id, request.worker_request.request_id)
    part.receipt = receipt(part)
    charge = await setup.billing.settle(admission, [part])
    cost = math.ceil((20 * PRICE_IN + 10 * PRICE_OUT) / 1_000_000)
    assert charge.cost_micro_usd == cost
    assert len(charge.receipts) == 1 and charge.receipts[0].coordinator_signature
    assert await available(setup) == 1_000_000 - cost
    fee = cost * FEE_BPS // 10_000
    assert (await setup.ledger.balance(NODE.node_id)).posted_micro_usd == cost - fee


@pytest.mark.parametrize(
    "tamper",
    ["forged", "more_output", "input_over_bound", "missing"],
)
async def test_bad_or_missing_receipt_is_not_billed(setup: Setup, tamper: str) -> None:
    principal = await setup.billing.authenticate(Context(setup.key))  # type: ignore[arg-type]
    request = valid(setup.settings)
    admission = await setup.billing.admit(principal, request, [candidate()])
    part = Part(NODE.node_id, request.worker_request.request_id)
    if tamper == "forged":
        part.receipt = receipt(part)
        part.receipt.node_signature = bytes(64)
    elif tamper == "more_output":
        part.receipt = receipt(part, output_tokens=part.output_tokens + 5)
    elif tamper == "input_over_bound":
        part.input_tokens = admission.input_tokens_max + 1  # the node's claim
        part.receipt = receipt(part)
    charge = await setup.billing.settle(admission, [part])
    assert charge.cost_micro_usd == 0 and charge.receipts == []
    assert await available(setup) == 1_000_000  # hold released, nothing charged
    if tamper != "missing":
        assert charge.refused_segments == 1
        rejected = setup.ledger.store.rejections(request.request_id)
        assert len(rejected) == 1 and rejected[0]["node_id"] == NODE.node_id


async def test_only_the_valid_segment_is_billed(setup: Setup) -> None:
    principal = await setup.billing.authenticate(Context(setup.key))  # type: ignore[arg-type]
    request = valid(setup.settings)
    admission = await setup.billing.admit(principal, request, [candidate()])
    rid = request.worker_request.request_id
    first = Part(OTHER_NODE.node_id, rid, output_tokens=4)
    first.receipt = receipt(first, node=OTHER_NODE, output_tokens=40)  # miscounted
    second = Part(NODE.node_id, f"{rid}:1", segment_index=1, resumed_tokens=4, input_tokens=24)
    second.receipt = receipt(second)
    charge = await setup.billing.settle(admission, [first, second])
    cost = math.ceil((24 * PRICE_IN + 10 * PRICE_OUT) / 1_000_000)
    assert charge.cost_micro_usd == cost and charge.refused_segments == 1
    assert await available(setup) == 1_000_000 - cost


# ---------------------------------------------------------------- leases


async def test_lease_routing_and_refund_when_its_node_leaves(setup: Setup) -> None:
    billing, ledger = setup.billing, setup.ledger
    principal = await billing.authenticate(Context(setup.key))  # type: ignore[arg-type]
    setup.registry.live = {NODE.node_id, OTHER_NODE.node_id}
    lease = await ledger.create_lease(
        principal, NODE.node_id, gpus=1, price_micro_usd_per_gpu_hour=100_000, hours=2
    )
    await billing.refresh_leases()

    leased = await billing.constrain(principal, valid(setup.settings, lease_id=lease.lease_id))
    assert list(leased.routing.only_nodes) == [NODE.node_id]
    serverless = await billing.constrain(principal, valid(setup.settings))
    assert serverless.leased_nodes == {NODE.node_id}

    # Under the lease: no hold, zero per-token charge, receipts countersigned.
    admission = await billing.admit(principal, leased, [candidate()])
    assert admission.hold_micro_usd == 0
    part = Part(NODE.node_id, leased.worker_request.request_id)
    part.receipt = receipt(part, lease_id=lease.lease_id)
    charge = await billing.settle(admission, [part])
    assert charge.cost_micro_usd == 0 and len(charge.receipts) == 1

    # Another account's lease is answered as one that does not exist.
    for lease_id, someone_else in (("no-such-lease", False), (lease.lease_id, True)):
        store = ledger.store
        if someone_else:
            bob = store.create_account(AccountKind.CLIENT, "bob")
            key = store.issue_key(bob.id, "b").secret_key
            caller = await billing.authenticate(Context(key))  # type: ignore[arg-type]
        else:
            caller = principal
        with pytest.raises(BillingRefused) as caught:
            await billing.constrain(caller, valid(setup.settings, lease_id=lease_id))
        assert caught.value.status_code == grpc.StatusCode.NOT_FOUND
        assert str(caught.value) == f"lease {lease_id!r} does not exist"

    # The node leaves the market: its lease ends with a refund; it takes traffic again.
    setup.registry.live = {OTHER_NODE.node_id}
    await billing.refresh_leases()
    ended = await ledger.lease(lease.lease_id)
    assert ended is not None and ended.status == "failed"
    assert ended.refunded_micro_usd == ended.total_micro_usd - ended.charged_micro_usd > 0
    with pytest.raises(BillingRefused) as caught:
        await billing.constrain(principal, valid(setup.settings, lease_id=lease.lease_id))
    assert caught.value.status_code == grpc.StatusCode.FAILED_PRECONDITION
    assert not (await billing.constrain(principal, valid(setup.settings))).leased_nodes


async def test_a_lease_seen_first_in_a_request_keeps_serverless_traffic_off_its_node(
    setup: Setup,
) -> None:
    """A lease this coordinator has not read yet (made through another coordinator, or
    before the last refresh): its first request marks the node leased at once, so the
    serverless request right after it avoids the node without waiting for a refresh."""
    billing, ledger = setup.billing, setup.ledger
    principal = await billing.authenticate(Context(setup.key))  # type: ignore[arg-type]
    setup.registry.live = {NODE.node_id, OTHER_NODE.node_id}
    await billing.refresh_leases()  # nothing leased yet
    lease = await ledger.create_lease(
        principal, NODE.node_id, gpus=1, price_micro_usd_per_gpu_hour=100_000, hours=2
    )
    before = await billing.constrain(principal, valid(setup.settings))
    assert not before.leased_nodes  # not known here yet
    await billing.constrain(principal, valid(setup.settings, lease_id=lease.lease_id))
    after = await billing.constrain(principal, valid(setup.settings))
    assert after.leased_nodes == {NODE.node_id}


# ---------------------------------------------------------------- late receipts


def cut_part(request: ValidRequest, output_tokens: int = 6) -> Part:
    """A segment cut off before its node's final (client cancel, deadline): no receipt,
    no input count from the node, the output tokens the coordinator relayed."""
    return Part(
        NODE.node_id,
        request.worker_request.request_id,
        input_tokens=0,
        output_tokens=output_tokens,
        completed=False,
    )


def late_receipt(part: Part, node: Identity = NODE, **changes: int) -> market_pb2.SignedReceipt:
    """The node's receipt for a cut-off part: its own prompt count (20) and output count."""
    return receipt(
        part, node, **{"input_tokens": 20, "output_tokens": part.output_tokens, **changes}
    )


async def settled(setup: Setup, request_id: str, timeout_s: float = 5.0) -> dict:
    return await settled_in(setup.ledger, request_id, timeout_s)


async def settled_in(ledger: Ledger, request_id: str, timeout_s: float = 5.0) -> dict:
    """The settlement row of ``request_id`` once ``ledger`` has written it."""
    deadline = time.monotonic() + timeout_s
    while True:
        await ledger.flush()
        row = ledger.store.settlement(request_id)
        if row is not None:
            return row
        assert time.monotonic() < deadline, f"request {request_id} was never settled"
        await asyncio.sleep(0.02)


async def rejections(setup: Setup, request_id: str) -> list[dict]:
    await setup.ledger.flush()
    return setup.ledger.store.rejections(request_id)


async def admitted(setup: Setup) -> tuple[ValidRequest, object]:
    principal = await setup.billing.authenticate(Context(setup.key))  # type: ignore[arg-type]
    request = valid(setup.settings)  # max_tokens 16
    return request, await setup.billing.admit(principal, request, [candidate()])


async def test_cancelled_request_is_charged_the_relayed_tokens_on_the_late_receipt(
    setup: Setup,
) -> None:
    billing = setup.billing
    setup.registry.live = {NODE.node_id}
    request, admission = await admitted(setup)
    part = cut_part(request, output_tokens=6)
    settling = asyncio.create_task(billing.settle(admission, [part], late_wait_s=10))  # type: ignore[arg-type]
    await asyncio.sleep(0.1)
    assert not settling.done()  # waiting for the node's late receipt
    # The node wrote 8 tokens; 2 were in flight when the call was cut.
    billing.accept_late_receipt(NODE.node_id, late_receipt(part, output_tokens=8))
    async with asyncio.timeout(5):
        charge = await settling

    cost = math.ceil((20 * PRICE_IN + 6 * PRICE_OUT) / 1_000_000)
    assert charge.cost_micro_usd == cost and charge.late_segments == 1
    [signed] = charge.receipts
    usage = verify_offline(signed, [COORDINATOR.public_key])  # node-signed, countersigned
    assert (usage.node_id, usage.output_tokens) == (NODE.node_id, 8)
    row = await settled(setup, request.request_id)
    assert (row["cost_micro_usd"], row["output_tokens"]) == (cost, 6)  # the relayed count
    assert await available(setup) == 1_000_000 - cost
    fee = cost * FEE_BPS // 10_000
    assert (await setup.ledger.balance(NODE.node_id)).posted_micro_usd == cost - fee
    assert await rejections(setup, request.request_id) == []
    assert verify_ledger(setup.ledger.store.engine).ok


async def test_background_settlement_takes_a_receipt_that_came_before_it(setup: Setup) -> None:
    billing = setup.billing
    setup.registry.live = {NODE.node_id}
    request, admission = await admitted(setup)
    part = cut_part(request, output_tokens=3)
    billing.accept_late_receipt(NODE.node_id, late_receipt(part))  # before the relay ended
    started = time.monotonic()
    billing.settle_in_background(admission, [part])  # type: ignore[arg-type]
    row = await settled(setup, request.request_id)
    assert time.monotonic() - started < setup.settings.late_receipt_wait_s  # no wait
    assert row["cost_micro_usd"] == math.ceil((20 * PRICE_IN + 3 * PRICE_OUT) / 1_000_000)


async def test_late_receipt_after_the_settlement_is_refused_and_recorded(setup: Setup) -> None:
    billing = setup.billing
    setup.registry.live = {NODE.node_id}
    request, admission = await admitted(setup)
    part = cut_part(request)
    first = late_receipt(part)
    billing.accept_late_receipt(NODE.node_id, first)
    charge = await billing.settle(admission, [part], late_wait_s=1)  # type: ignore[arg-type]
    assert charge.cost_micro_usd > 0
    after = await available(setup)

    billing.accept_late_receipt(NODE.node_id, first)  # the same receipt again: no news
    assert await rejections(setup, request.request_id) == []
    billing.accept_late_receipt(NODE.node_id, late_receipt(part, output_tokens=9))
    [rejected] = await rejections(setup, request.request_id)
    assert rejected["reason"] == "unmatched_receipt" and rejected["node_id"] == NODE.node_id
    assert "settled or released" in rejected["detail"]
    assert await available(setup) == after  # nothing charged again


@pytest.mark.parametrize("forgery", ["bad_signature", "sent_by_another_node", "garbage"])
async def test_forged_late_receipt_is_refused_and_recorded(setup: Setup, forgery: str) -> None:
    billing = setup.billing
    setup.registry.live = {NODE.node_id, OTHER_NODE.node_id}
    request, admission = await admitted(setup)
    part = cut_part(request)
    signed = late_receipt(part)
    if forgery == "bad_signature":
        signed.node_signature = bytes(64)
    elif forgery == "sent_by_another_node":  # OTHER_NODE's own receipt for NODE's segment
        signed = late_receipt(part, node=OTHER_NODE)
    else:
        signed = market_pb2.SignedReceipt(receipt=b"\xff\xff", node_public_key=NODE.public_key)
    billing.accept_late_receipt(
        OTHER_NODE.node_id if forgery == "sent_by_another_node" else NODE.node_id, signed
    )
    if forgery == "sent_by_another_node":  # stashed under OTHER_NODE, refused at settlement
        assert await rejections(setup, request.request_id) == []
    charge = await billing.settle(admission, [part], late_wait_s=0.2)  # type: ignore[arg-type]
    assert charge.cost_micro_usd == 0 and charge.unreceipted_segments == 1
    assert await available(setup) == 1_000_000  # hold released, nothing charged
    recorded = await rejections(setup, "" if forgery == "garbage" else request.request_id)
    reasons = {row["reason"] for row in recorded}
    expected = {
        "bad_signature": "forged_receipt",
        "sent_by_another_node": "unmatched_receipt",
        "garbage": "malformed_receipt",
    }[forgery]
    assert reasons == {expected}


async def test_receipt_naming_another_node_than_its_sender_is_forged(setup: Setup) -> None:
    setup.registry.live = {NODE.node_id}
    request, _ = await admitted(setup)
    signed = late_receipt(cut_part(request))  # NODE's valid receipt, relayed by OTHER_NODE
    setup.billing.accept_late_receipt(OTHER_NODE.node_id, signed)
    [rejected] = await rejections(setup, request.request_id)
    assert rejected["reason"] == "forged_receipt" and rejected["node_id"] == OTHER_NODE.node_id


@pytest.mark.parametrize("live", [True, False])
async def test_no_late_receipt_releases_the_hold_after_the_grace(setup: Setup, live: bool) -> None:
    setup.registry.live = {NODE.node_id} if live else set()
    request, admission = await admitted(setup)
    started = time.monotonic()
    charge = await setup.billing.settle(admission, [cut_part(request)], late_wait_s=0.3)  # type: ignore[arg-type]
    waited_s = time.monotonic() - started
    assert charge.cost_micro_usd == 0 and charge.unreceipted_segments == 1
    assert await available(setup) == 1_000_000
    assert setup.ledger.store.settlement(request.request_id) is None
    if live:
        assert waited_s >= 0.3  # a live node gets the grace
    else:
        assert waited_s < 0.3  # a dead node sends nothing: no wait


@pytest.mark.parametrize(
    ("node_count", "refused"),
    [(5, True), (6, False), (16, False), (17, True)],  # relayed 6, asked for 16
)
async def test_late_count_below_relayed_or_above_asked_is_refused(
    setup: Setup, node_count: int, refused: bool
) -> None:
    setup.registry.live = {NODE.node_id}
    request, admission = await admitted(setup)
    part = cut_part(request, output_tokens=6)
    setup.billing.accept_late_receipt(NODE.node_id, late_receipt(part, output_tokens=node_count))
    charge = await setup.billing.settle(admission, [part], late_wait_s=1)  # type: ignore[arg-type]
    recorded = await rejections(setup, request.request_id)
    if refused:
        assert charge.cost_micro_usd == 0 and charge.refused_segments == 1
        assert [row["reason"] for row in recorded] == ["miscounted_receipt"]
        assert await available(setup) == 1_000_000
    else:
        cost = math.ceil((20 * PRICE_IN + 6 * PRICE_OUT) / 1_000_000)
        assert charge.cost_micro_usd == cost and recorded == []


async def test_late_copy_of_a_final_receipt_is_ignored(setup: Setup) -> None:
    """A node cut off while writing its final sends the receipt late too."""
    setup.registry.live = {NODE.node_id}
    request, admission = await admitted(setup)
    part = Part(NODE.node_id, request.worker_request.request_id)
    part.receipt = receipt(part)
    await setup.billing.settle(admission, [part])  # type: ignore[arg-type]
    setup.billing.accept_late_receipt(NODE.node_id, part.receipt)
    assert await rejections(setup, request.request_id) == []


async def test_client_cancel_mid_stream_pays_for_the_relayed_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole coordinator (billing on, SQLite) and a fake node that sends the receipt of
    its cut-off call on its heartbeat stream, as a real node does."""
    async with billed_coordinator_and_node(tmp_path, monkeypatch) as (coordinator, node):
        node.send_late_receipts = True
        node.worker.behaviour = fakes.Behaviour(deltas=[f" t{i}" for i in range(40)], delay_s=0.05)
        assert coordinator.billing is not None
        ledger = coordinator.billing.ledger
        issued = funded_client_key(ledger.store, "carol")
        key, account_id = issued.secret_key, issued.key.account_id
        request = inference_pb2.GenerateRequest(
            request_id="cut-1",
            model=fakes.MODEL,
            prompt="Count.",
            sampling=common_pb2.SamplingParams(max_tokens=64),
        )
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            call = inference_pb2_grpc.InferenceServiceStub(channel).Generate(
                request, metadata=(("authorization", f"Bearer {key}"),), timeout=30
            )
            received = 0
            async for response in call:
                assert response.WhichOneof("chunk") == "delta"
                received += 1
                if received == 3:
                    break
            call.cancel()

        row = await settled_in(ledger, "cut-1", timeout_s=10)
        relayed = row["output_tokens"]
        assert received <= relayed < 40  # cut off mid-stream
        cost = math.ceil((7 * node.price_input + relayed * node.price_output) / 1_000_000)
        assert row["cost_micro_usd"] == cost > 0
        [signed] = ledger.store.receipts("cut-1")
        usage = verify_offline(signed, [coordinator.identity.public_key])
        assert usage.node_id == node.node_id and usage.output_tokens >= relayed
        await ledger.flush()
        fee = cost * ledger.settings.platform_fee_bps // 10_000
        assert ledger.store.account(account_id).posted_micro_usd == 1_000_000 - cost
        assert ledger.store.account(account_id).pending_debits_micro_usd == 0
        assert ledger.store.account(node.node_id).posted_micro_usd == cost - fee
        assert ledger.store.rejections("cut-1") == []


async def test_a_node_whose_engine_fails_mid_stream_is_paid_on_the_receipt_it_sends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its engine breaks after 2 tokens: the error carries its receipt for them, a second
    node finishes the answer, and both are paid for what each produced."""
    async with billed_coordinator_and_node(tmp_path, monkeypatch) as (coordinator, first):
        second = fakes.FakeNode(coordinator.address, price_input=150_000, price_output=300_000)
        await second.start()
        try:
            for node in (first, second):
                node.worker.final_receipt = node.signed_usage
            first.worker.behaviour = fakes.Behaviour(
                deltas=["a", "b", "c", "d", "e"], fail_after=2, fail_with_receipt=True
            )
            # It counts one prompt token more (another template): each segment is billed
            # on its own node's count.
            second.worker.behaviour = fakes.Behaviour(
                deltas=["C", "D", "E"], first_token_id=2000, input_tokens=8
            )
            assert coordinator.billing is not None
            ledger = coordinator.billing.ledger
            issued = funded_client_key(ledger.store, "erin")
            request = inference_pb2.GenerateRequest(
                request_id="engine-broke",
                model=fakes.MODEL,
                prompt="Spell it.",
                sampling=common_pb2.SamplingParams(max_tokens=5),
                routing=inference_pb2.RoutingPreferences(sort=inference_pb2.SORT_MODE_PRICE),
            )
            async with grpc.aio.insecure_channel(coordinator.address) as channel:
                responses = [
                    response
                    async for response in inference_pb2_grpc.InferenceServiceStub(channel).Generate(
                        request,
                        metadata=(("authorization", f"Bearer {issued.secret_key}"),),
                        timeout=30,
                    )
                ]
            assert "".join(r.delta.text for r in responses if r.HasField("delta")) == "abCDE"
            final = responses[-1].final
            assert [(s.node_id, s.output_tokens) for s in final.segments] == [
                (first.node_id, 2),
                (second.node_id, 3),
            ]
            row = await settled_in(ledger, "engine-broke")
            first_cost = (7 * first.price_input + 2 * first.price_output) / 1_000_000
            second_cost = (10 * second.price_input + 3 * second.price_output) / 1_000_000
            assert row["output_tokens"] == 5
            assert row["cost_micro_usd"] == math.ceil(first_cost) + math.ceil(second_cost)
            receipts = ledger.store.receipts("engine-broke")
            signers = {
                verify_offline(r, [coordinator.identity.public_key]).node_id for r in receipts
            }
            assert signers == {first.node_id, second.node_id}
            await ledger.flush()
            assert ledger.store.account(first.node_id).posted_micro_usd > 0
            assert ledger.store.rejections("engine-broke") == []
        finally:
            await second.stop()


async def test_a_client_hanging_up_during_the_settlement_still_pays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream is complete and its settlement under way when the client cancels (the
    ledger is slow to answer: here a gate). The settlement runs to its end in a task of
    its own; before, the cancellation ended it before the ledger had it, and the request
    was free and its node unpaid until the hold expired."""
    async with billed_coordinator_and_node(tmp_path, monkeypatch) as (coordinator, node):
        assert coordinator.billing is not None
        node.worker.final_receipt = node.signed_usage
        ledger = coordinator.billing.ledger
        issued = funded_client_key(ledger.store, "dave")
        gate, entered = asyncio.Event(), asyncio.Event()
        settle = ledger.settle

        async def slow_settle(*args, **kwargs):  # type: ignore[no-untyped-def]
            entered.set()
            await gate.wait()
            return await settle(*args, **kwargs)

        monkeypatch.setattr(ledger, "settle", slow_settle)
        request = inference_pb2.GenerateRequest(
            request_id="hung-up",
            model=fakes.MODEL,
            prompt="Hi.",
            sampling=common_pb2.SamplingParams(max_tokens=3),
        )
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            call = inference_pb2_grpc.InferenceServiceStub(channel).Generate(
                request, metadata=(("authorization", f"Bearer {issued.secret_key}"),), timeout=30
            )
            async with asyncio.timeout(10):
                await entered.wait()
            call.cancel()
            await asyncio.sleep(0.3)  # the cancellation reaches the handler
        gate.set()
        row = await settled_in(ledger, "hung-up", timeout_s=10)
        assert row["output_tokens"] == 3 and row["cost_micro_usd"] > 0


async def test_calls_without_a_valid_key_are_unauthenticated_and_reach_no_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the gRPC API with billing on: Generate, ListModels and ListNodes without a
    key, with an unknown key or with a revoked key are UNAUTHENTICATED, and no Generate
    reaches a node."""
    async with billed_coordinator_and_node(tmp_path, monkeypatch) as (coordinator, node):
        assert coordinator.billing is not None
        issued = funded_client_key(coordinator.billing.ledger.store, "dave")
        await coordinator.billing.ledger.revoke_key(issued.key.id)
        request = inference_pb2.GenerateRequest(model=fakes.MODEL, prompt="hi")
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            for metadata in (
                (),
                (("authorization", "Bearer mk_0123456789abcdef_" + "A" * 43),),
                (("authorization", f"Bearer {issued.secret_key}"),),
            ):
                calls = (
                    lambda m=metadata: stub.Generate(request, metadata=m, timeout=10).read(),
                    lambda m=metadata: stub.ListModels(
                        inference_pb2.ListModelsRequest(), metadata=m, timeout=10
                    ),
                    lambda m=metadata: stub.ListNodes(
                        inference_pb2.ListNodesRequest(), metadata=m, timeout=10
                    ),
                )
                for call in calls:
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await call()
                    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        assert node.worker.requests == []


async def test_a_request_id_pays_for_one_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the gRPC API with billing on, a client-chosen request id serves one request:
    a twin sent while it runs, a retry after it was settled, and a retry after the
    coordinator restarted (its memory gone) are ALREADY_EXISTS and reach no node; so is
    a request under a lease that reuses the id. Before, each was served, and the twin or
    the retry was never charged (its settlement answered the first one's)."""
    used = "client-id-1"

    async def generate(
        api: inference_pb2_grpc.InferenceServiceStub, auth: object, **fields: object
    ) -> inference_pb2.GenerateFinal | grpc.aio.AioRpcError:
        request = inference_pb2.GenerateRequest(
            model=fakes.MODEL, prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=4)
        )
        for name, value in fields.items():
            setattr(request, name, value)
        try:
            answers = [r async for r in api.Generate(request, metadata=auth, timeout=10)]
        except grpc.aio.AioRpcError as exc:
            return exc
        return answers[-1].final

    def refused(answer: object) -> bool:
        return (
            isinstance(answer, grpc.aio.AioRpcError)
            and answer.code() == grpc.StatusCode.ALREADY_EXISTS
            and f"request id {used!r}" in (answer.details() or "")
            and "is used once" in (answer.details() or "")
        )

    async with billed_coordinator_and_node(tmp_path, monkeypatch) as (coordinator, node):
        assert coordinator.billing is not None
        store = coordinator.billing.ledger.store
        issued = funded_client_key(store, "frank")
        account_id = issued.key.account_id
        auth = (("authorization", f"Bearer {issued.secret_key}"),)
        node.worker.final_receipt = node.signed_usage
        node.worker.behaviour.delay_s = 0.05  # the twins overlap
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            api = inference_pb2_grpc.InferenceServiceStub(channel)
            first, twin = await asyncio.gather(
                generate(api, auth, request_id=used), generate(api, auth, request_id=used)
            )
            served = [a for a in (first, twin) if isinstance(a, inference_pb2.GenerateFinal)]
            assert len(served) == 1 and served[0].cost_micro_usd > 0
            assert sum(refused(a) for a in (first, twin)) == 1
            assert refused(await generate(api, auth, request_id=used))
        await coordinator.billing.ledger.flush()
        charged = 1_000_000 - store.account(account_id).available_micro_usd
        assert charged == served[0].cost_micro_usd
        assert len(node.worker.requests) == 1
    async with billed_coordinator_and_node(tmp_path, monkeypatch) as (coordinator, node):
        assert coordinator.billing is not None
        store = coordinator.billing.ledger.store
        store.deposit(account_id, 1_000_000, "for-a-lease")
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            api = inference_pb2_grpc.InferenceServiceStub(channel)
            assert refused(await generate(api, auth, request_id=used))
            lease = (
                await account_pb2_grpc.AccountServiceStub(channel).CreateLease(
                    account_pb2.CreateLeaseRequest(node_id=node.identity.node_id, hours=1),
                    metadata=auth,
                )
            ).lease
            assert refused(await generate(api, auth, request_id=used, lease_id=lease.lease_id))
            assert node.worker.requests == []
            fresh = await generate(api, auth, request_id="client-id-2", lease_id=lease.lease_id)
            assert isinstance(fresh, inference_pb2.GenerateFinal), fresh
        await coordinator.billing.ledger.flush()
        assert store.account(account_id).available_micro_usd == 2_000_000 - charged - 1_000_000


async def stopped_then_refused(
    api: inference_pb2_grpc.InferenceServiceStub,
    request: inference_pb2.GenerateRequest,
    auth: tuple[tuple[str, str], ...],
    node: fakes.FakeNode,
    code: grpc.StatusCode,
    words: str,
) -> None:
    """Three requests, each answered ``code`` with ``words`` in its message: the first
    is admitted from the coordinator's memory and cut off at the node (whose 200 tokens
    would take 4 s) when the ledger refuses its hold; the next two reach no node."""
    node.worker.behaviour = fakes.Behaviour(deltas=["x"] * 200, delay_s=0.02)
    reached = len(node.worker.requests)
    for attempt in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in api.Generate(request, metadata=auth, timeout=10):
                pass
        assert caught.value.code() == code, attempt
        assert words in (caught.value.details() or ""), attempt
    assert node.worker.cancelled.is_set()  # the first was cut off, not served to the end
    assert len(node.worker.requests) == reached + 1  # the later ones reached no node


async def test_a_hold_the_ledger_refuses_stops_its_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the gRPC API: the client's balance is spent behind this coordinator's back
    (as another coordinator of the same ledger would). The next request is admitted from
    this coordinator's memory, the ledger's writer refuses its hold, and the request is
    stopped with FAILED_PRECONDITION while its node is still generating; the requests
    after it are refused before reaching a node. Before, every such request was served to
    the end and charged nothing (its settlement had no hold to charge against)."""
    async with billed_coordinator_and_node(tmp_path, monkeypatch) as (coordinator, node):
        assert coordinator.billing is not None
        ledger = coordinator.billing.ledger
        store = ledger.store
        issued = funded_client_key(store, "gina")
        account_id = issued.key.account_id
        auth = (("authorization", f"Bearer {issued.secret_key}"),)
        node.worker.final_receipt = node.signed_usage
        request = inference_pb2.GenerateRequest(
            model=fakes.MODEL, prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=200)
        )
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            api = inference_pb2_grpc.InferenceServiceStub(channel)
            served = [r async for r in api.Generate(request, metadata=auth, timeout=10)]
            assert served[-1].final.cost_micro_usd > 0  # this coordinator knows the balance
            await ledger.flush()
            left = store.account(account_id).available_micro_usd
            store.correct("spent-elsewhere", account_id, "platform.fees", left)
            await stopped_then_refused(
                api, request, auth, node, grpc.StatusCode.FAILED_PRECONDITION, "insufficient"
            )
        await ledger.flush()
        assert store.account(account_id).available_micro_usd == 0
        assert verify_ledger(store.engine).ok


async def test_a_spend_limit_taken_through_another_coordinator_stops_the_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the gRPC API: another coordinator of the same ledger (a second Ledger,
    another owner) holds almost all of a key's spend limit. This coordinator still
    admits the key's next request from memory; the writer refuses its hold, and the
    request is stopped with RESOURCE_EXHAUSTED while its node is still generating. The
    requests after it are refused before reaching a node. Before, each coordinator
    counted only its own holds, and this one served the key past its limit."""
    async with billed_coordinator_and_node(tmp_path, monkeypatch) as (coordinator, node):
        assert coordinator.billing is not None
        ledger = coordinator.billing.ledger
        store = ledger.store
        account_id = funded_client_key(store, "hana").key.account_id
        issued = store.issue_key(account_id, "capped", spend_limit_micro_usd=20_000)
        auth = (("authorization", f"Bearer {issued.secret_key}"),)
        node.worker.final_receipt = node.signed_usage
        request = inference_pb2.GenerateRequest(
            model=fakes.MODEL, prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=200)
        )
        elsewhere = Ledger(ledger.settings.model_copy(update={"owner": "elsewhere"}))
        await elsewhere.start(sweep=False)
        try:
            async with grpc.aio.insecure_channel(coordinator.address) as channel:
                api = inference_pb2_grpc.InferenceServiceStub(channel)
                served = [r async for r in api.Generate(request, metadata=auth, timeout=10)]
                spent = served[-1].final.cost_micro_usd
                assert spent > 0  # this coordinator has read the key's spend
                principal = await elsewhere.authenticate(issued.secret_key)
                await (await elsewhere.place_hold("there", principal, 20_000 - spent - 1)).durable
                await stopped_then_refused(
                    api, request, auth, node, grpc.StatusCode.RESOURCE_EXHAUSTED, "spend limit"
                )
        finally:
            await elsewhere.close()
        await ledger.flush()
        assert verify_ledger(store.engine).ok


async def test_a_new_lease_takes_its_node_out_of_serverless_routing_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the gRPC API: once CreateLease answers, ListNodes marks the node leased and
    serverless requests no longer go to it, without waiting for the coordinator's lease
    refresh (an hour here); once EndLease answers, both are back."""
    async with billed_coordinator_and_node(
        tmp_path, monkeypatch, lease_refresh_interval_s=3600
    ) as (coordinator, node):
        assert coordinator.billing is not None
        issued = funded_client_key(coordinator.billing.ledger.store, "erin")
        coordinator.billing.ledger.store.deposit(issued.key.account_id, 1_000_000, "more")
        auth = (("authorization", f"Bearer {issued.secret_key}"),)
        serverless = inference_pb2.GenerateRequest(
            model=fakes.MODEL, prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=4)
        )
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            api = inference_pb2_grpc.InferenceServiceStub(channel)
            accounts = account_pb2_grpc.AccountServiceStub(channel)

            async def leased() -> bool:
                nodes = (await api.ListNodes(inference_pb2.ListNodesRequest(), metadata=auth)).nodes
                assert [n.node_id for n in nodes] == [node.identity.node_id]
                return nodes[0].leased

            assert not await leased()
            lease = (
                await accounts.CreateLease(
                    account_pb2.CreateLeaseRequest(node_id=node.identity.node_id, hours=1),
                    metadata=auth,
                )
            ).lease
            assert await leased()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await api.Generate(serverless, metadata=auth, timeout=10).read()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            # Named as a lease, not as the client's own ignore_nodes (which it never set).
            assert "are leased" in (caught.value.details() or "")
            assert "ignore_nodes" not in (caught.value.details() or "")
            under_lease = inference_pb2.GenerateRequest()
            under_lease.CopyFrom(serverless)
            under_lease.lease_id = lease.lease_id
            answers = [r async for r in api.Generate(under_lease, metadata=auth, timeout=10)]
            assert answers[-1].final.node_id == node.identity.node_id
            await accounts.EndLease(
                account_pb2.EndLeaseRequest(lease_id=lease.lease_id), metadata=auth
            )
            assert not await leased()
            answers = [r async for r in api.Generate(serverless, metadata=auth, timeout=10)]
            assert answers[-1].WhichOneof("chunk") == "final"


@contextlib.contextmanager
def _reopened_ledger(home: Path) -> Iterator[LedgerStore]:
    """The coordinator's SQLite ledger in ``home``, opened afresh (after it stopped)."""
    store = LedgerStore.open(LedgerSettings(database_url=f"sqlite:///{home / 'mercato.db'}"))
    try:
        yield store
    finally:
        store.close()


async def test_shutdown_finishes_or_bills_streams_in_flight_and_refuses_new_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Coordinator.stop(grace) with two billed streams open: the one that ends within the
    grace gets its final and is charged; the one still streaming at the end of the grace
    is cut off with UNAVAILABLE, and charged for what its client received from its node's
    late receipt (the heartbeat streams outlive the cut); a request during the grace is
    refused UNAVAILABLE; no hold is left open and the journal verifies when the database
    is opened afresh."""
    async with billed_coordinator_and_node(tmp_path, monkeypatch) as (coordinator, node):
        node.worker.behaviour = fakes.Behaviour(deltas=[f" t{i}" for i in range(60)], delay_s=0.05)
        node.worker.final_receipt = node.signed_usage
        node.send_late_receipts = True
        assert coordinator.billing is not None
        store = coordinator.billing.ledger.store
        issued = funded_client_key(store, "erin")
        metadata = (("authorization", f"Bearer {issued.secret_key}"),)

        def request(request_id: str, max_tokens: int) -> inference_pb2.GenerateRequest:
            return inference_pb2.GenerateRequest(
                request_id=request_id,
                model=fakes.MODEL,
                prompt="Count.",
                sampling=common_pb2.SamplingParams(max_tokens=max_tokens),
            )

        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            short = stub.Generate(request("short", 12), metadata=metadata, timeout=30)
            long = stub.Generate(request("long", 60), metadata=metadata, timeout=30)
            first_short, first_long = await short.read(), await long.read()
            assert first_short.HasField("delta") and first_long.HasField("delta")
            stopping = asyncio.ensure_future(coordinator.stop(grace_s=1.5))
            await asyncio.sleep(0.1)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(request("late", 4), metadata=metadata, timeout=5).read()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in refused.value.details()

            short_rest = []
            while (response := await short.read()) is not grpc.aio.EOF:
                short_rest.append(response)
            assert short_rest[-1].HasField("final")
            assert short_rest[-1].final.cost_micro_usd > 0
            long_deltas, long_errors = 1, []
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                while (response := await long.read()) is not grpc.aio.EOF:
                    if response.HasField("error"):
                        long_errors.append(response.error.message)
                    else:
                        long_deltas += 1
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in cut.value.details()
            assert len(long_errors) == 1 and "shutting down" in long_errors[0]
            assert 1 < long_deltas < 60
            async with asyncio.timeout(30):
                await stopping

    with _reopened_ledger(tmp_path) as reopened:
        charged = reopened.settlement("short")
        assert (
            charged is not None and charged["cost_micro_usd"] == short_rest[-1].final.cost_micro_usd
        )
        assert reopened.settlement("late") is None
        assert reopened.open_holds() == [], "a hold was left open by the shutdown"
        cut_off = reopened.settlement("long")
        assert cut_off is not None, "the cut-off request was not charged"
        assert cut_off["output_tokens"] == long_deltas
        assert cut_off["cost_micro_usd"] == math.ceil(
            (7 * node.price_input + long_deltas * node.price_output) / 1_000_000
        )
        report = verify_ledger(reopened.engine)
        assert report.ok, report.problems
        assert reopened.account(issued.key.account_id).posted_micro_usd == (
            1_000_000 - charged["cost_micro_usd"] - cut_off["cost_micro_usd"]
        )


async def test_stop_without_grace_still_bills_the_cut_off_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stop(grace_s=0): the open stream is cut at once, and its settlement still gets its
    node's late receipt before the server (and with it the heartbeat stream) goes."""
    async with billed_coordinator_and_node(tmp_path, monkeypatch) as (coordinator, node):
        node.worker.behaviour = fakes.Behaviour(deltas=[f" t{i}" for i in range(60)], delay_s=0.05)
        node.send_late_receipts = True
        assert coordinator.billing is not None
        issued = funded_client_key(coordinator.billing.ledger.store, "fred")
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            call = inference_pb2_grpc.InferenceServiceStub(channel).Generate(
                inference_pb2.GenerateRequest(
                    request_id="cut-at-once",
                    model=fakes.MODEL,
                    prompt="Count.",
                    sampling=common_pb2.SamplingParams(max_tokens=60),
                ),
                metadata=(("authorization", f"Bearer {issued.secret_key}"),),
                timeout=30,
            )
            deltas = 0
            while deltas < 3:
                response = await call.read()
                assert response.HasField("delta")
                deltas += 1
            stopping = asyncio.ensure_future(coordinator.stop(grace_s=0))
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                while (response := await call.read()) is not grpc.aio.EOF:
                    deltas += response.HasField("delta")
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
            async with asyncio.timeout(30):
                await stopping
    with _reopened_ledger(tmp_path) as reopened:
        row = reopened.settlement("cut-at-once")
        assert row is not None and row["output_tokens"] == deltas
        assert reopened.open_holds() == []
        assert verify_ledger(reopened.engine).ok


async def test_a_taken_port_is_refused_before_the_ledger_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second coordinator on a port in use says so, and never opens its ledger (no
    recovery run, no writer left behind by a start that could not serve)."""
    async with billed_coordinator_and_node(tmp_path / "first", monkeypatch) as (first, _node):
        second = Coordinator(
            fast_settings(tmp_path / "second", billing_enabled=True, port=first.port)
        )
        with pytest.raises(OSError, match=r"cannot listen on .*is the port in use\?"):
            await second.start()
        assert second.billing is not None and second.billing.recovery is None
        assert second.billing.ledger._store is None  # never opened
