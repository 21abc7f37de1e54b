"""The auditor: a seeded workload checked reply by reply against an independent model.

The model below knows nothing of the ledger's code: it keeps every account's available
balance with its own arithmetic (ceil of token cost, floor of the fee, capped at the
hold). The workload mixes deposits, requests that complete, resume on a second node
after a node failure, get cancelled, get retried, carry forged or miscounted receipts,
and a coordinator crash between relaying and committing. Every request pays with its
client's API key. After every step the ledger's balances and each key's recorded spend
must equal the model's, the balances must sum to zero, and none may be below zero.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import pytest

from marketplace.identity import Identity
from marketplace.ledger import (
    InsufficientBalance,
    InvalidAmount,
    Ledger,
    LedgerSettings,
    LedgerStore,
    verify_ledger,
)
from marketplace.ledger.errors import ForgedReceipt, MiscountedReceipt
from marketplace.ledger.models import AccountKind
from tests.marketplace.ledger.conftest import kill_ledger, receipt_for

FEE_BPS = 1000
NODES = [Identity.from_seed(bytes([65 + i]) * 32) for i in range(4)]
PRICES = [(50_000, 150_000), (100_000, 300_000), (200_000, 200_000), (10_000, 900_000)]


def model_cost(input_tokens: int, output_tokens: int, price_in: int, price_out: int) -> int:
    total = input_tokens * price_in + output_tokens * price_out
    return total // 1_000_000 + (1 if total % 1_000_000 else 0)


@dataclass
class Model:
    """Expected balances (available micro-USD), kept independently of the ledger."""

    balances: dict[str, int] = field(default_factory=dict)
    spend: dict[str, int] = field(default_factory=dict)  # API key id -> charged so far

    def add(self, account: str, amount: int) -> None:
        self.balances[account] = self.balances.get(account, 0) + amount

    def settle(self, client: str, held: int, parts: list[tuple[str, int]]) -> tuple[int, int]:
        """Charge segment costs in order up to ``held``; returns (cost, fee)."""
        left, cost, fee = held, 0, 0
        for provider, part in parts:
            charge = min(part, left)
            left -= charge
            part_fee = charge * FEE_BPS // 10_000
            self.add(provider, charge - part_fee)
            self.add("platform.fees", part_fee)
            cost += charge
            fee += part_fee
        self.add(client, -cost)
        self.add("platform.clearing", 0)  # requests in flight net to zero
        return cost, fee


async def _check(store: LedgerStore, ledger: Ledger, model: Model, step: int) -> None:
    await ledger.flush()
    accounts = {a.id: a for a in store.accounts()}
    for account_id, expected in model.balances.items():
        if account_id == "platform.deposits":
            continue
        assert accounts[account_id].available_micro_usd == expected, (
            f"step {step}: {account_id} has {accounts[account_id].available_micro_usd}, "
            f"model says {expected}"
        )
    assert sum(a.posted_micro_usd for a in accounts.values()) == 0, f"step {step}: not zero-sum"
    for key_id, expected in model.spend.items():
        recorded = store.key_spent_micro_usd(key_id)
        assert recorded == expected, f"step {step}: key {key_id} spent {recorded}, model {expected}"
    for account in accounts.values():
        if account.id not in ("platform.deposits", "platform.payouts"):
            assert account.available_micro_usd >= 0, f"step {step}: {account.id} below zero"


async def _restart_after_crash(ledger: Ledger, settings: LedgerSettings) -> Ledger:
    """Kill the ledger with one settlement relayed but not committed, start a new one."""
    await kill_ledger(ledger)
    fresh = Ledger(settings, coordinator=ledger.coordinator)
    await fresh.start(sweep=False)
    return fresh


@pytest.mark.parametrize("seed", [7, 2026])
async def test_auditor(settings: LedgerSettings, store: LedgerStore, seed: int) -> None:
    rng = random.Random(seed)
    steps = 120 if "postgresql" in settings.database_url else 200
    model = Model()
    clients = []
    for i in range(3):
        account = store.create_account(AccountKind.CLIENT, f"client-{i}")
        clients.append(account.id)
        model.add(account.id, 0)
    model.add("platform.fees", 0)
    ledger = Ledger(settings, coordinator=Identity.from_seed(b"c" * 32))
    await ledger.start(sweep=False)
    payers = {}  # client account -> the Principal of its API key
    for client in clients:
        payers[client] = await ledger.authenticate(store.issue_key(client).secret_key)
        model.spend[payers[client].key_id] = 0
    requests = 0
    try:
        for step in range(steps):
            action = rng.choices(
                ["deposit", "bad_deposit", "request", "crash"], weights=[20, 3, 75, 2]
            )[0]
            client = rng.choice(clients)
            if action == "deposit":
                amount = rng.randint(1, 20_000)
                result = await ledger.deposit(client, amount, transfer_id=f"dep-{seed}-{step}")
                assert result.created and result.amount == amount
                model.add(client, amount)
                if rng.random() < 0.3:  # a retried deposit with the same id
                    again = await ledger.deposit(client, amount, transfer_id=f"dep-{seed}-{step}")
                    assert not again.created
            elif action == "bad_deposit":
                with pytest.raises(InvalidAmount):
                    await ledger.deposit(client, rng.choice([0, -1, -10_000]))
            elif action == "crash":
                requests += 1
                rid = f"req-{seed}-{requests}"
                node = rng.choice(NODES)
                price_in, price_out = PRICES[NODES.index(node)]
                hold_amount = model_cost(50, 100, price_in, price_out)
                if model.balances[client] < hold_amount:
                    continue
                await (await ledger.place_hold(rid, payers[client], hold_amount)).durable
                model.add(client, -hold_amount)
                signed, relayed = receipt_for(
                    node, f"{rid}#0", 50, 60, price_in=price_in, price_out=price_out
                )
                writer = ledger._writer
                assert writer is not None
                real = writer.submit
                writer.submit = lambda op: asyncio.get_running_loop().create_future()  # type: ignore[method-assign]
                outcome = await ledger.settle(rid, [signed], [relayed])
                writer.submit = real  # type: ignore[method-assign]
                ledger = await _restart_after_crash(ledger, settings)
                await ledger.flush()
                provider_id = store.account(node.node_id).id
                model.balances.setdefault(provider_id, 0)
                model.add(client, hold_amount)  # the model settles from the hold
                expected_cost, _ = model.settle(
                    client, hold_amount, [(provider_id, model_cost(50, 60, price_in, price_out))]
                )
                model.spend[payers[client].key_id] += expected_cost
                assert outcome.record.cost_micro_usd == expected_cost
                assert store.settlement(rid)["cost_micro_usd"] == expected_cost  # type: ignore[index]
            else:
                requests += 1
                rid = f"req-{seed}-{requests}"
                first, second = rng.sample(NODES, 2)
                input_tokens = rng.randint(1, 400)
                max_tokens = rng.randint(1, 300)
                worst_in = max(PRICES[NODES.index(n)][0] for n in (first, second))
                worst_out = max(PRICES[NODES.index(n)][1] for n in (first, second))
                hold_amount = model_cost(input_tokens, max_tokens, worst_in, worst_out)
                available = model.balances[client]
                if available < hold_amount:
                    with pytest.raises(InsufficientBalance) as refused:
                        await ledger.place_hold(rid, payers[client], hold_amount)
                    assert (refused.value.need_micro_usd, refused.value.have_micro_usd) == (
                        hold_amount,
                        available,
                    )
                    continue
                hold = await ledger.place_hold(rid, payers[client], hold_amount)
                assert hold.amount_micro_usd == hold_amount
                model.add(client, -hold_amount)
                fate = rng.choices(
                    ["complete", "resume", "cancel", "forged", "miscounted"],
                    weights=[55, 15, 15, 8, 7],
                )[0]
                if fate == "cancel":
                    released = await ledger.release_hold(rid)
                    assert released.released_micro_usd == hold_amount
                    model.add(client, hold_amount)
                elif fate in ("forged", "miscounted"):
                    signed, relayed = receipt_for(first, f"{rid}#0", input_tokens, max_tokens)
                    if fate == "forged":
                        signed.node_signature = second.sign(
                            "mercato.v1.UsageReceipt", signed.receipt
                        )
                    else:
                        _, relayed = receipt_for(
                            first, f"{rid}#0", input_tokens, max(0, max_tokens - 1)
                        )
                    with pytest.raises(ForgedReceipt if fate == "forged" else MiscountedReceipt):
                        await ledger.settle(rid, [signed], [relayed])
                    await ledger.release_hold(rid)
                    model.add(client, hold_amount)
                else:
                    output_tokens = rng.randint(0, max_tokens)
                    nodes = [first] if fate == "complete" else [first, second]
                    split = rng.randint(0, output_tokens) if fate == "resume" else output_tokens
                    counts = [(input_tokens, split)]
                    if fate == "resume":  # the second node re-reads the prompt plus output so far
                        counts.append((input_tokens + split, output_tokens - split))
                    receipts, relayed_all, parts = [], [], []
                    for index, (node, (n_in, n_out)) in enumerate(zip(nodes, counts, strict=True)):
                        price_in, price_out = PRICES[NODES.index(node)]
                        signed, relayed = receipt_for(
                            node,
                            f"{rid}#{index}",
                            n_in,
                            n_out,
                            price_in=price_in,
                            price_out=price_out,
                            segment_index=index,
                        )
                        receipts.append(signed)
                        relayed_all.append(relayed)
                        parts.append((node, model_cost(n_in, n_out, price_in, price_out)))
                    model.add(client, hold_amount)  # the model settles from the hold
                    outcome = await ledger.settle(rid, receipts, relayed_all)
                    durable = await outcome.durable
                    provider_parts = []
                    for node, part in parts:
                        provider_id = store.account(node.node_id).id
                        model.balances.setdefault(provider_id, 0)
                        provider_parts.append((provider_id, part))
                    expected_cost, expected_fee = model.settle(client, hold_amount, provider_parts)
                    model.spend[payers[client].key_id] += expected_cost
                    assert (durable.cost_micro_usd, durable.fee_micro_usd) == (
                        expected_cost,
                        expected_fee,
                    )
                    assert outcome.record == durable
                    if rng.random() < 0.2:  # a retry of the same settlement
                        again = await ledger.settle(rid, receipts, relayed_all)
                        assert again.record.cost_micro_usd == expected_cost
            await _check(store, ledger, model, step)
            if step % 25 == 24:
                report = verify_ledger(store.engine)
                assert report.ok, report.problems
    finally:
        await ledger.close()
    report = verify_ledger(store.engine)
    assert report.ok, report.problems
