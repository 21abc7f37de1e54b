from __future__ import annotations

import math

import pytest

from coordinator.routing import (
    BreakerPolicy,
    BreakerState,
    DispatchOutcome,
    InvalidListingError,
    LoadReport,
    Market,
    MarketConfig,
    ModelTerms,
    NodeListing,
)

from .market_fakes import FakeClock, listing


def test_snapshot_indexes_by_model_and_region() -> None:
    market = Market(clock=FakeClock())
    market.upsert_node(listing("a", region="eu-west", model="m1"))
    market.upsert_node(listing("b", region="us-east", model="m1"))
    market.upsert_node(
        listing("c", region="eu-west", model="m2", extra_models=(ModelTerms("m1", 1, 2, 100),))
    )
    snapshot = market.snapshot()
    assert snapshot.models() == ("m1", "m2")
    assert snapshot.regions_for("m1") == ("eu-west", "us-east")
    assert len(snapshot.index_for("m1")) == 3
    assert len(snapshot.index_for("m1", "eu-west")) == 2
    assert len(snapshot.index_for("m2", "us-east")) == 0
    assert {v.node_id for v in snapshot} == {"a", "b", "c"}


def test_old_snapshots_never_change() -> None:
    clock = FakeClock()
    market = Market(clock=clock)
    market.upsert_node(listing("a"))
    before = market.snapshot()
    market.update_load("a", LoadReport(running_requests=3))
    market.dispatch_started("a")
    market.upsert_node(listing("b"))
    market.remove_node("a")
    after = market.snapshot()
    view = before.get("a")
    assert view is not None and view.occupancy == 0 and view.in_flight == 0
    assert "b" not in before
    assert "a" not in after and "b" in after
    assert len(after.index_for("m")) == 1


def test_compaction_keeps_every_view_current() -> None:
    market = Market(
        MarketConfig(overlay_compaction_min=1, overlay_compaction_divisor=1), clock=FakeClock()
    )
    for n in range(10):
        market.upsert_node(listing(f"n{n}"))
    market.snapshot()
    for n in range(10):
        market.update_load(f"n{n}", LoadReport(running_requests=n % 4))
    snapshot = market.snapshot()
    assert [snapshot.get(f"n{n}").occupancy for n in range(10)] == [n % 4 for n in range(10)]  # type: ignore[union-attr]


def test_slot_of_a_removed_node_is_reused_safely() -> None:
    market = Market(clock=FakeClock())
    market.upsert_node(listing("a"))
    market.upsert_node(listing("b", price_output=999))
    first = market.snapshot()
    market.remove_node("a")
    market.snapshot()
    market.upsert_node(listing("c", price_output=1))
    snapshot = market.snapshot()
    assert {v.node_id for v in snapshot} == {"b", "c"}
    assert first.get("a") is not None
    rows = snapshot.index_for("m").by_output
    assert [snapshot.view(slot).node_id for slot, *_ in rows] == ["c", "b"]


def test_relisting_changes_prices_and_keeps_statistics() -> None:
    market = Market(clock=FakeClock())
    market.upsert_node(listing("a", price_output=500, region="eu-west"))
    market.record_first_token("a", 0.3)
    market.upsert_node(listing("a", price_output=100, region="us-east"))
    snapshot = market.snapshot()
    assert snapshot.index_for("m").output_prices == (100,)
    assert len(snapshot.index_for("m", "eu-west")) == 0
    view = snapshot.get("a")
    assert view is not None and view.ttft_s == pytest.approx(0.3)


def test_occupancy_adds_own_dispatches_since_the_last_heartbeat() -> None:
    market = Market(clock=FakeClock())
    market.upsert_node(listing("a", max_concurrency=10))
    market.dispatch_started("a")
    market.update_load("a", LoadReport(running_requests=4, waiting_requests=1))  # 1 ours, 4 others
    market.dispatch_started("a")
    market.dispatch_started("a")
    view = market.snapshot().get("a")
    assert view is not None and view.in_flight == 3 and view.occupancy == 7
    market.dispatch_finished("a", DispatchOutcome.SUCCESS)
    market.dispatch_finished("a", DispatchOutcome.SUCCESS)
    market.dispatch_finished("a", DispatchOutcome.SUCCESS)
    view = market.snapshot().get("a")
    # The heartbeat counted one of ours (now done) among its 5: the other 4 remain.
    assert view is not None and view.in_flight == 0 and view.occupancy == 4


def test_a_report_that_names_our_calls_never_keeps_finished_ones_of_ours() -> None:
    """The node samples its load with all 4 slots ours; one finishes before the report
    arrives. Counted the old way the finished one stays until the next heartbeat and the
    node looks full; with the node saying which calls are ours it does not."""
    old, new = Market(clock=FakeClock()), Market(clock=FakeClock())
    for market in (old, new):
        market.upsert_node(listing("a", max_concurrency=4))
        for _ in range(4):
            market.dispatch_started("a")
        market.dispatch_finished("a", DispatchOutcome.SUCCESS)  # after the node's sample
    old.update_load("a", LoadReport(running_requests=4))
    new.update_load("a", LoadReport(running_requests=4, coordinator_requests=4))
    old_view, new_view = old.snapshot().get("a"), new.snapshot().get("a")
    assert old_view is not None and old_view.occupancy == 4 and not old_view.has_capacity()
    assert new_view is not None and new_view.occupancy == 3 and new_view.has_capacity()


def test_the_load_that_is_not_ours_still_counts() -> None:
    market = Market(clock=FakeClock())
    market.upsert_node(listing("a", max_concurrency=10))
    market.dispatch_started("a")
    market.dispatch_started("a")
    # 6 on the node, 2 of them ours: 4 from elsewhere.
    market.update_load(
        "a", LoadReport(running_requests=5, waiting_requests=1, coordinator_requests=2)
    )
    market.dispatch_started("a")
    view = market.snapshot().get("a")
    assert view is not None and view.in_flight == 3 and view.occupancy == 7
    for _ in range(3):
        market.dispatch_finished("a", DispatchOutcome.SUCCESS)
    view = market.snapshot().get("a")
    assert view is not None and view.occupancy == 4
    # A node claiming more of ours than it runs gets no credit below our own count.
    market.update_load("a", LoadReport(running_requests=1, coordinator_requests=9))
    market.dispatch_started("a")
    view = market.snapshot().get("a")
    assert view is not None and view.occupancy == 1


def test_measurements_come_from_recorded_observations() -> None:
    market = Market(clock=FakeClock())
    market.upsert_node(listing("a"))
    market.record_rtt("a", 0.02)
    market.record_first_token("a", 0.2)
    market.record_decode("a", 101, 2.0)
    assert not market.record_decode("a", 1, 0.5), "one token says nothing about decode speed"
    assert not market.record_rtt("ghost", 0.1)
    view = market.snapshot().get("a")
    assert view is not None
    assert (view.rtt_s, view.ttft_s, view.tpot_s) == pytest.approx((0.02, 0.2, 0.02))


def test_failures_open_the_breaker_and_success_closes_it() -> None:
    clock = FakeClock()
    market = Market(
        MarketConfig(breaker=BreakerPolicy(failure_threshold=2, backoff_base_s=5.0)), clock=clock
    )
    market.upsert_node(listing("a"))
    for _ in range(2):
        market.dispatch_started("a")
        market.dispatch_finished("a", DispatchOutcome.FAILURE)
    assert market.breaker_state("a") is BreakerState.OPEN
    view = market.snapshot().get("a")
    assert view is not None and not view.breaker_allows(clock.now_s)
    assert view.reliability < 1.0
    clock.advance(5.0)
    assert market.breaker_state("a") is BreakerState.HALF_OPEN
    market.dispatch_started("a")
    probing = market.snapshot().get("a")
    assert (
        probing is not None and probing.probe_in_flight and not probing.breaker_allows(clock.now_s)
    )
    market.dispatch_finished("a", DispatchOutcome.SUCCESS)
    assert market.breaker_state("a") is BreakerState.CLOSED
    healed = market.snapshot().get("a")
    assert healed is not None and healed.breaker_open_until_s == -math.inf


def test_abandoned_dispatch_is_no_verdict() -> None:
    market = Market(MarketConfig(breaker=BreakerPolicy(failure_threshold=1)), clock=FakeClock())
    market.upsert_node(listing("a"))
    market.dispatch_started("a")
    market.dispatch_finished("a", DispatchOutcome.ABANDONED)
    assert market.breaker_state("a") is BreakerState.CLOSED
    view = market.snapshot().get("a")
    assert view is not None and view.reliability == 1.0


@pytest.mark.parametrize(
    ("probe_ends", "state_on_return"),
    [
        (DispatchOutcome.FAILURE, BreakerState.OPEN),
        (DispatchOutcome.SUCCESS, BreakerState.CLOSED),
        (DispatchOutcome.ABANDONED, BreakerState.HALF_OPEN),
    ],
)
def test_a_probe_that_ends_while_its_node_is_away_still_decides(
    probe_ends: DispatchOutcome, state_on_return: BreakerState
) -> None:
    """The half-open probe is out when the node leaves (restart, drain); its verdict
    must reach the breaker the node gets back, or the probe stays out for good."""
    clock = FakeClock()
    market = Market(
        MarketConfig(breaker=BreakerPolicy(failure_threshold=1, backoff_base_s=5.0)), clock=clock
    )
    market.upsert_node(listing("a"))
    market.dispatch_started("a")
    market.dispatch_finished("a", DispatchOutcome.FAILURE)
    clock.advance(5.0)
    market.dispatch_started("a")  # the probe
    market.remove_node("a")
    assert market.dispatch_finished("a", probe_ends)
    market.upsert_node(listing("a"))
    assert market.breaker_state("a") is state_on_return
    clock.advance(3600.0)  # any backoff is long over
    view = market.snapshot().get("a")
    assert view is not None and not view.probe_in_flight
    assert view.breaker_allows(clock.now_s)


def test_expire_silent_removes_nodes_without_heartbeats() -> None:
    clock = FakeClock()
    market = Market(clock=clock)
    market.upsert_node(listing("a"))
    market.upsert_node(listing("b"))
    clock.advance(5.0)
    market.update_load("b", LoadReport())
    clock.advance(5.0)
    assert market.expire_silent(liveness_timeout_s=8.0) == ["a"]
    assert "a" not in market.snapshot() and len(market) == 1


def test_unknown_nodes_are_ignored_not_raised() -> None:
    market = Market(clock=FakeClock())
    assert not market.update_load("x", LoadReport())
    assert not market.dispatch_started("x")
    assert not market.dispatch_finished("x", DispatchOutcome.FAILURE)
    assert not market.remove_node("x")
    assert market.breaker_state("x") is None


def test_listing_rejects_bad_fields() -> None:
    with pytest.raises(InvalidListingError, match="region"):
        listing("a", region="EU West")
    with pytest.raises(InvalidListingError, match="max_concurrency"):
        listing("a", max_concurrency=0)
    with pytest.raises(InvalidListingError, match="price_output"):
        listing("a", price_output=-1)
    with pytest.raises(InvalidListingError, match="twice"):
        NodeListing("a", "eu", (ModelTerms("m", 1, 1, 10), ModelTerms("m", 1, 1, 10)), 1)


def test_listing_from_proto_offer() -> None:
    from mercato.v1 import market_pb2

    offer = market_pb2.NodeOffer(
        worker_address="10.0.0.1:7000",
        region="eu-west",
        max_concurrency=8,
        price_micro_usd_per_gpu_hour=1_500_000,
        hardware=market_pb2.Hardware(
            accelerator=market_pb2.ACCELERATOR_KIND_NVIDIA_GPU,
            gpus=[market_pb2.Gpu(name="H100"), market_pb2.Gpu(name="H100")],
        ),
        models=[
            market_pb2.ModelOffer(
                model="m",
                price_input_micro_usd_per_mtok=10,
                price_output_micro_usd_per_mtok=20,
                context_length=2048,
            )
        ],
    )
    made = NodeListing.from_offer(offer, node_id="12D3KooWabc")
    assert made.node_id == "12D3KooWabc" and made.gpu_count == 2
    assert made.models == (ModelTerms("m", 10, 20, 2048),)
    assert made.accelerator == market_pb2.ACCELERATOR_KIND_NVIDIA_GPU
