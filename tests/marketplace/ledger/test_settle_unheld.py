"""Settling a request whose hold no longer holds (expired, refused, or forgotten),
after one of its receipts is refused: the other segments are still charged."""

from __future__ import annotations

import asyncio

import pytest

from marketplace.identity import Identity
from marketplace.ledger import Ledger, LedgerStore, verify_ledger
from marketplace.ledger.errors import BadReceipt, ForgedReceipt, IdConflict, MiscountedReceipt
from tests.marketplace.ledger.conftest import make_client, receipt_for


async def _expired_hold(ledger: Ledger, payer: object, request_id: str, amount: int) -> None:
    """Place a hold and let the sweeper expire it (the request keeps running)."""
    await (await ledger.place_hold(request_id, payer, amount, expires_in_s=0.001)).durable  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert await ledger.expire_holds() == 1


@pytest.mark.parametrize("attack", ["forged", "miscounted"])
async def test_a_refused_receipt_does_not_make_the_retry_of_an_expired_hold_free(
    ledger: Ledger, store: LedgerStore, attack: str
) -> None:
    """Billing drops a refused segment and settles the rest again (with the account id).
    Before, the first attempt forgot the expired hold before checking the receipts, so
    the retry found no hold and charged every valid segment 0: the client paid nothing,
    the provider was not paid, and the key's spend was not recorded."""
    good, bad = Identity.from_seed(b"g" * 32), Identity.from_seed(b"b" * 32)
    client = make_client(store, deposit=10_000)
    key = store.issue_key(client, "capped", spend_limit_micro_usd=5_000)
    principal = await ledger.authenticate(key.secret_key)
    await _expired_hold(ledger, principal, "long", 5_000)
    s_good, r_good = receipt_for(good, "long#0", 1000, 1000)  # costs 400
    s_bad, r_bad = receipt_for(bad, "long#1", 1000, 1000, segment_index=1)
    if attack == "forged":
        s_bad.node_signature = Identity.from_seed(b"x" * 32).sign(
            "mercato.v1.UsageReceipt", s_bad.receipt
        )
        expected: type[BadReceipt] = ForgedReceipt
    else:
        _, r_bad = receipt_for(bad, "long#1", 1000, 999, segment_index=1)
        expected = MiscountedReceipt
    with pytest.raises(expected):
        await ledger.settle("long", [s_good, s_bad], [r_good, r_bad], account_id=client)
    outcome = await ledger.settle("long", [s_good], [r_good], account_id=client)
    assert outcome.record.cost_micro_usd == 400
    assert (await outcome.durable).cost_micro_usd == 400
    assert store.account(client).available_micro_usd == 10_000 - 400
    assert store.account(good.node_id).available_micro_usd == 360  # 400 less the 10% fee
    assert store.key_spent_micro_usd(key.key.id) == 400
    assert verify_ledger(store.engine).ok


async def test_a_refused_hold_is_still_charged_after_a_refused_receipt(
    ledger: Ledger, store: LedgerStore, node: Identity
) -> None:
    """The same for a hold the writer refused (a request id used before): the valid
    segment is charged up to the refused hold and the balance there is."""
    client = make_client(store, deposit=10_000)
    await (await ledger.place_hold("used", client, 1_000)).durable
    await ledger.release_hold("used")
    hold = await ledger.place_hold("used", client, 5_000, fresh_id=True)  # writer refuses
    with pytest.raises(IdConflict):  # the id was used: the writer refuses the hold
        await hold.durable
    s_good, r_good = receipt_for(node, "used#0", 1000, 1000)  # costs 400
    _, r_bad = receipt_for(node, "used#1", 10, 10, segment_index=1)
    s_bad, _ = receipt_for(node, "used#1", 10, 11, segment_index=1)
    with pytest.raises(MiscountedReceipt):
        await ledger.settle("used", [s_good, s_bad], [r_good, r_bad], account_id=client)
    outcome = await ledger.settle("used", [s_good], [r_good], account_id=client)
    assert outcome.record.cost_micro_usd == 400
    assert store.account(node.node_id).available_micro_usd == 360
    assert store.account(client).available_micro_usd == 10_000 - 400


async def test_a_forgotten_hold_is_charged_what_its_receipts_cost_not_nothing(
    ledger: Ledger, store: LedgerStore, node: Identity
) -> None:
    """A hold that expired and was then pushed out of the ledger's memory (by many
    others): settling with the account id charges what the receipts cost, up to the
    balance there is (the writer's charge path), instead of 0."""
    client = make_client(store, deposit=10_000)
    await _expired_hold(ledger, client, "old", 5_000)
    ledger._unheld.clear()  # as if evicted
    await (await ledger.place_hold("other", client, 9_700)).durable  # 300 left
    signed, relayed = receipt_for(node, "old#0", 1000, 1000)  # costs 400; 300 are there
    outcome = await ledger.settle("old", [signed], [relayed], account_id=client)
    assert outcome.record.cost_micro_usd == 300
    assert (await outcome.durable).cost_micro_usd == 300
    assert store.account(client).available_micro_usd == 0
    assert store.account(node.node_id).available_micro_usd == 270
    assert verify_ledger(store.engine).ok


async def test_a_request_that_held_nothing_costs_nothing(
    ledger: Ledger, store: LedgerStore, node: Identity
) -> None:
    """A lease request holds nothing and its segments cost 0: settled at once, free."""
    client = make_client(store, deposit=1_000)
    signed, relayed = receipt_for(node, "leased#0", 1000, 1000)
    outcome = await ledger.settle(
        "leased", [signed], [relayed], account_id=client, lease_id="lease-1"
    )
    assert outcome.record.cost_micro_usd == 0
    assert not outcome.durable.done()  # answered without waiting for the commit
    await outcome.durable
    assert store.account(client).available_micro_usd == 1_000
