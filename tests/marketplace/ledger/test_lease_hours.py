"""A lease's length is bounded: 1..LEASE_HOURS_MAX hours (366 days)."""

from __future__ import annotations

import grpc
import pytest

from marketplace.identity import Identity
from marketplace.ledger import Ledger, LedgerStore, NodeLeased, verify_ledger
from marketplace.ledger.errors import InvalidLeaseHours
from marketplace.ledger.ledger import LEASE_HOURS_MAX
from tests.marketplace.ledger.conftest import make_client, row_counts


@pytest.mark.parametrize("hours", [0, -1, LEASE_HOURS_MAX + 1, 2**32 - 1, True, 1.5])
async def test_a_lease_of_no_hours_or_too_many_is_refused_and_writes_nothing(
    ledger: Ledger, store: LedgerStore, node: Identity, hours: object
) -> None:
    """Before, any positive hours was taken: a cheap node leased for 2**32-1 hours ends
    after the year 9999, and every later lease of that node failed in the writer (the
    end cannot be formatted), failing its whole batch."""
    client = make_client(store, deposit=10**10)
    before = row_counts(store)
    with pytest.raises(InvalidLeaseHours, match=f"from 1 to {LEASE_HOURS_MAX}") as info:
        await ledger.create_lease(
            client,
            node.node_id,
            gpus=1,
            price_micro_usd_per_gpu_hour=1,
            hours=hours,  # type: ignore[arg-type]
        )
    assert info.value.grpc_status == grpc.StatusCode.INVALID_ARGUMENT
    await ledger.flush()
    assert row_counts(store) == before
    assert store.leases() == []


async def test_the_longest_lease_is_made_and_a_second_on_its_node_says_until_when(
    ledger: Ledger, store: LedgerStore, node: Identity
) -> None:
    client = make_client(store, deposit=10**10)
    lease = await ledger.create_lease(
        client, node.node_id, gpus=1, price_micro_usd_per_gpu_hour=1, hours=LEASE_HOURS_MAX
    )
    assert lease.periods_total == LEASE_HOURS_MAX
    assert lease.ends_at_unix_ms - lease.started_at_unix_ms == LEASE_HOURS_MAX * 3_600_000
    with pytest.raises(NodeLeased, match="until"):
        await ledger.create_lease(
            client, node.node_id, gpus=1, price_micro_usd_per_gpu_hour=1, hours=1
        )
    assert verify_ledger(store.engine).ok
