"""``mercato ledger verify``: recompute the hash chain and every balance from the journal.

Checks, in one pass over the journal in sequence order:

* each entry's ``prev_hash`` is the previous entry's hash and its ``hash`` is recomputed
  from its fields (so no entry was altered, removed, inserted or reordered);
* every post / void / expire resolves a pending transfer that exists and is still open,
  and a post never exceeds its pending amount;
* the balances recomputed from the entries equal the stored balances, all accounts sum
  to zero, and no account that must not overdraw is below zero;
* the journal head names the last entry; the open-holds index equals the pending
  transfers left unresolved; each API key's recorded spend equals the sum of its
  settlements plus what its leases took and did not refund;
* the platform's pass-through accounts hold exactly what is in flight: clearing has
  nothing posted (every charge leaves it in full, as earnings and fee; its pending
  part is the open holds by construction, checked against the index above); the lease
  escrow holds what active leases have prepaid and not yet been charged. Balances recomputed from a double-entry journal always sum
  to zero, so a charge split into earnings and a fee that do not add up would pass
  every check above and show only here.

The report names the first entry that does not match.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, case, func, select

from marketplace.ledger.applier import (
    CLEARING,
    LEASE_ESCROW,
    T_ACCOUNTS,
    T_BALANCES,
    T_HEAD,
    T_HOLDS,
    T_KEY_SPEND,
    T_LEASES,
    T_SETTLEMENTS,
    T_TRANSFERS,
)
from marketplace.ledger.journal import GENESIS_HASH, entry_hash
from marketplace.ledger.models import LeaseStatus, TransferPhase


@dataclass
class AuditReport:
    ok: bool = True
    entries: int = 0
    accounts: int = 0
    first_bad_seq: int | None = None
    first_bad_id: str | None = None
    problems: list[str] = field(default_factory=list)

    def fail(self, problem: str, entry: dict[str, Any] | None = None) -> None:
        self.ok = False
        if entry is not None and self.first_bad_seq is None:
            self.first_bad_seq = entry["seq"]
            self.first_bad_id = entry["id"]
        if len(self.problems) < 50:
            self.problems.append(problem)


def verify_ledger(engine: Engine, *, chunk_rows: int = 10_000) -> AuditReport:
    report = AuditReport()
    sums: dict[str, list[int]] = {}
    pending: dict[str, tuple[str, str, int]] = {}
    prev_hash = GENESIS_HASH
    expected_seq = 1
    with engine.connect() as conn:
        accounts = {
            row.id: bool(row.must_not_overdraw)
            for row in conn.execute(select(T_ACCOUNTS.c.id, T_ACCOUNTS.c.must_not_overdraw))
        }
        report.accounts = len(accounts)
        rows = conn.execution_options(yield_per=chunk_rows).execute(
            select(T_TRANSFERS).order_by(T_TRANSFERS.c.seq)
        )
        for row in rows:
            entry = dict(row._mapping)
            report.entries += 1
            seq = entry["seq"]
            if seq != expected_seq:
                report.fail(f"entry {seq} ({entry['id']}): expected sequence {expected_seq}", entry)
            expected_seq = seq + 1
            if bytes(entry["prev_hash"]) != prev_hash:
                report.fail(
                    f"entry {seq} ({entry['id']}): prev_hash does not match entry {seq - 1}", entry
                )
            recomputed = entry_hash(bytes(entry["prev_hash"]), entry)
            if recomputed != bytes(entry["hash"]):
                report.fail(
                    f"entry {seq} ({entry['id']}): hash does not match its fields (altered)", entry
                )
            prev_hash = bytes(entry["hash"])
            _apply(entry, sums, pending, accounts, report)
        head = conn.execute(select(T_HEAD.c.seq, T_HEAD.c.hash).where(T_HEAD.c.id == 1)).one()
        if head.seq != expected_seq - 1 or bytes(head.hash) != prev_hash:
            report.fail(
                f"journal head says entry {head.seq} but the journal ends at {expected_seq - 1} "
                "(or its hash differs)"
            )
        stored = {
            row.account_id: [
                row.debits_posted,
                row.credits_posted,
                row.debits_pending,
                row.credits_pending,
            ]
            for row in conn.execute(select(T_BALANCES))
        }
        holds = {row.transfer_id for row in conn.execute(select(T_HOLDS.c.transfer_id))}
        settled_by_key = {
            row[0]: int(row[1])
            for row in conn.execute(
                select(T_SETTLEMENTS.c.api_key_id, func.sum(T_SETTLEMENTS.c.cost_micro_usd))
                .where(T_SETTLEMENTS.c.api_key_id.is_not(None))
                .group_by(T_SETTLEMENTS.c.api_key_id)
            )
        }
        # A lease counts toward its key what it took and did not give back: the whole
        # prepaid price while active, what was charged once it ended.
        for row in conn.execute(
            select(
                T_LEASES.c.api_key_id,
                func.sum(
                    case(
                        (T_LEASES.c.status == LeaseStatus.ACTIVE.value, T_LEASES.c.total_micro_usd),
                        else_=T_LEASES.c.charged_micro_usd,
                    )
                ),
            )
            .where(T_LEASES.c.api_key_id.is_not(None))
            .group_by(T_LEASES.c.api_key_id)
        ):
            settled_by_key[row[0]] = settled_by_key.get(row[0], 0) + int(row[1])
        key_spend = {
            row.api_key_id: row.spent_micro_usd for row in conn.execute(select(T_KEY_SPEND))
        }
        prepaid_unspent = conn.execute(
            select(
                func.coalesce(
                    func.sum(T_LEASES.c.total_micro_usd - T_LEASES.c.charged_micro_usd), 0
                )
            ).where(T_LEASES.c.status == LeaseStatus.ACTIVE.value)
        ).scalar_one()
    for account_id in sorted(set(stored) | set(sums)):
        want = sums.get(account_id, [0, 0, 0, 0])
        have = stored.get(account_id, [0, 0, 0, 0])
        if want != have:
            report.fail(
                f"account {account_id}: stored balance {have} != recomputed {want} "
                "(debits posted, credits posted, debits pending, credits pending)"
            )
        if accounts.get(account_id) and want[0] + want[2] > want[1]:
            report.fail(f"account {account_id} is overdrawn: {want}")
    total_posted = sum(s[1] - s[0] for s in sums.values())
    total_pending = sum(s[3] - s[2] for s in sums.values())
    if total_posted or total_pending:
        report.fail(f"balances do not sum to zero: posted {total_posted}, pending {total_pending}")
    _check_pass_through(sums, int(prepaid_unspent), report)
    for key_id in sorted(set(settled_by_key) | set(key_spend)):
        want_spent = settled_by_key.get(key_id, 0)
        have_spent = key_spend.get(key_id, 0)
        if want_spent != have_spent:
            report.fail(
                f"api key {key_id}: recorded spend {have_spent} != its settlements' and "
                f"leases' {want_spent} (micro-USD)"
            )
    if holds != set(pending):
        report.fail(
            f"open holds index differs from the journal: {len(holds - set(pending))} stale, "
            f"{len(set(pending) - holds)} missing"
        )
    return report


def _check_pass_through(
    sums: dict[str, list[int]],
    prepaid_unspent: int,
    report: AuditReport,
) -> None:
    """Clearing and the lease escrow only pass money through: what they hold must be
    what is in flight, to the micro-unit."""
    debits, credits, _, _ = sums.get(CLEARING, [0, 0, 0, 0])
    if credits != debits:
        report.fail(
            f"account {CLEARING} keeps {credits - debits} micro-USD posted: a charge was not "
            "passed on in full as earnings and fee"
        )
    debits, credits, _, _ = sums.get(LEASE_ESCROW, [0, 0, 0, 0])
    if credits - debits != prepaid_unspent:
        report.fail(
            f"account {LEASE_ESCROW} holds {credits - debits} micro-USD but active leases have "
            f"{prepaid_unspent} prepaid and not yet charged"
        )


def _apply(
    entry: dict[str, Any],
    sums: dict[str, list[int]],
    pending: dict[str, tuple[str, str, int]],
    accounts: dict[str, bool],
    report: AuditReport,
) -> None:
    debit_id, credit_id = entry["debit_account_id"], entry["credit_account_id"]
    for account_id in (debit_id, credit_id):
        if account_id not in accounts:
            report.fail(
                f"entry {entry['seq']} ({entry['id']}): unknown account {account_id}", entry
            )
    debit = sums.setdefault(debit_id, [0, 0, 0, 0])
    credit = sums.setdefault(credit_id, [0, 0, 0, 0])
    amount = entry["amount"]
    phase = entry["phase"]
    if amount <= 0:
        report.fail(f"entry {entry['seq']} ({entry['id']}): amount {amount} is not positive", entry)
    if phase == TransferPhase.SINGLE.value:
        debit[0] += amount
        credit[1] += amount
    elif phase == TransferPhase.PENDING.value:
        debit[2] += amount
        credit[3] += amount
        pending[entry["id"]] = (debit_id, credit_id, amount)
    else:
        resolved = pending.pop(entry["pending_id"] or "", None)
        if resolved is None or resolved[:2] != (debit_id, credit_id):
            report.fail(
                f"entry {entry['seq']} ({entry['id']}): resolves {entry['pending_id']!r}, "
                "which is not an open pending transfer between the same accounts",
                entry,
            )
            return
        held = resolved[2]
        debit[2] -= held
        credit[3] -= held
        if phase == TransferPhase.POST.value:
            if amount > held:
                report.fail(
                    f"entry {entry['seq']} ({entry['id']}): posts {amount} of a {held} hold", entry
                )
            debit[0] += amount
            credit[1] += amount
