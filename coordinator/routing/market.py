"""The mutable market routing reads snapshots of: listings, load, measurements, breakers.

One :class:`Market` lives in the coordinator's event loop (it is not thread-safe). The
server feeds it:

- ``upsert_node(listing)`` on a verified registration, ``remove_node`` when a node leaves
  or goes silent (or call ``expire_silent``); a node that comes back gets its
  measurements and breaker back (``MarketConfig.departed_remembered``);
- ``update_load(node_id, LoadReport)`` on each heartbeat, ``record_rtt`` with the
  heartbeat's round trip as the coordinator timed it;
- ``dispatch_started`` / ``record_first_token`` / ``record_decode`` /
  ``dispatch_finished(outcome)`` around every attempt on a node;

and calls ``snapshot()`` before routing. Publishing is cheap: views changed since the
last compaction sit in a copy-on-write overlay, the base table is copied only when the
overlay grows past a threshold or membership changes, and only the price indexes of the
(model, region) buckets whose membership or prices changed are rebuilt.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from coordinator.routing.circuit_breaker import BreakerPolicy, BreakerState, CircuitBreaker
from coordinator.routing.measurements import NodeMeasurements, NodeStats
from coordinator.routing.node_view import LoadReport, NodeListing, NodeView
from coordinator.routing.snapshot import MarketSnapshot, PriceIndex, regions_of

__all__ = ["DispatchOutcome", "Market", "MarketConfig"]


class DispatchOutcome(enum.Enum):
    """How one attempt on a node ended, as far as the node's health is concerned."""

    # The node streamed the request to its end.
    SUCCESS = "success"
    # The node failed it: an error, a broken stream, a timeout, a bad receipt.
    FAILURE = "failure"
    # It ended without a verdict on the node (the client cancelled or went away).
    ABANDONED = "abandoned"


@dataclass(frozen=True, slots=True)
class MarketConfig:
    """Tuning of the market's statistics and publishing."""

    # When a node's breaker opens and for how long.
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    # Half-life of RTT, TTFT and TPOT statistics, seconds.
    latency_half_life_s: float = 60.0
    # Half-life of the success/failure record, seconds.
    reliability_half_life_s: float = 600.0
    # The overlay of changed views is folded into the base table once it holds more than
    # max(overlay_compaction_min, live nodes / overlay_compaction_divisor) views.
    overlay_compaction_min: int = 256
    overlay_compaction_divisor: int = 32
    # Measurements and breakers of removed nodes kept (least recently removed forgotten
    # first), so a node that reconnects after a blip keeps its history and cannot shed
    # an open breaker by re-registering.
    departed_remembered: int = 10_000

    def __post_init__(self) -> None:
        if not (self.latency_half_life_s > 0 and self.reliability_half_life_s > 0):
            raise ValueError("latency_half_life_s and reliability_half_life_s: must be > 0")
        if self.overlay_compaction_min < 1 or self.overlay_compaction_divisor < 1:
            raise ValueError("overlay_compaction_min and overlay_compaction_divisor: must be >= 1")
        if self.departed_remembered < 0:
            raise ValueError("departed_remembered: must be >= 0")


class _NodeState:
    """Everything mutable the market knows about one node."""

    __slots__ = (
        "breaker",
        "in_flight",
        "in_flight_at_report",
        "last_seen_s",
        "listing",
        "load",
        "measurements",
        "slot",
        "stats",
    )

    def __init__(self, listing: NodeListing, slot: int, config: MarketConfig, now_s: float):
        self.listing = listing
        self.slot = slot
        self.load = LoadReport()
        self.in_flight = 0
        self.in_flight_at_report = 0
        self.measurements = NodeMeasurements(
            config.latency_half_life_s, config.reliability_half_life_s
        )
        self.breaker = CircuitBreaker(config.breaker)
        self.last_seen_s = now_s
        # The summary of ``measurements`` as of their last observation (None: to be
        # made). Every view carries it, and most views follow a change of load or of
        # requests in flight, not of measurements.
        self.stats: NodeStats | None = None

    def measured(self) -> None:
        """An observation was added to ``measurements`` (or they were replaced)."""
        self.stats = None

    def _stats(self) -> NodeStats:
        stats = self.stats
        if stats is None:
            stats = self.stats = self.measurements.summary()
        return stats

    def view(self) -> NodeView:
        load = self.load
        reported = load.running_requests + load.waiting_requests
        if load.coordinator_requests is None:
            # Ours at the report taken as what we had in flight when it arrived: requests
            # of ours that finished between the node's sample and its arrival stay
            # counted until the next heartbeat.
            others = reported - self.in_flight_at_report
        else:
            # The node says which of its calls are ours; ours now we count exactly.
            others = reported - load.coordinator_requests
        occupancy = self.in_flight + max(0, others)
        return NodeView(
            listing=self.listing,
            slot=self.slot,
            load=self.load,
            in_flight=self.in_flight,
            occupancy=occupancy,
            stats=self._stats(),
            breaker_open_until_s=self.breaker.open_until_s,
            probe_in_flight=self.breaker.probe_in_flight,
        )


def _judge(
    measurements: NodeMeasurements,
    breaker: CircuitBreaker,
    outcome: DispatchOutcome,
    now_s: float,
) -> bool:
    """Apply an attempt's outcome to a node's breaker and record; whether the record
    changed."""
    if outcome is DispatchOutcome.SUCCESS:
        breaker.on_success(now_s)
        measurements.outcomes.observe(1.0, now_s)
        return True
    if outcome is DispatchOutcome.FAILURE:
        breaker.on_failure(now_s)
        measurements.outcomes.observe(0.0, now_s)
        return True
    breaker.on_abandoned()
    return False


def _bucket_keys(listing: NodeListing) -> list[tuple[str, str | None]]:
    keys: list[tuple[str, str | None]] = []
    for terms in listing.models:
        keys.append((terms.model, None))
        keys.append((terms.model, listing.region))
    return keys


class Market:
    """The live market; publishes immutable :class:`MarketSnapshot` s for routing."""

    def __init__(
        self, config: MarketConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._config = config or MarketConfig()
        self._clock = clock
        self._nodes: dict[str, _NodeState] = {}
        # Bucket key (model, region or None) -> node ids in it.
        self._members: dict[tuple[str, str | None], set[str]] = {}
        self._dirty_buckets: set[tuple[str, str | None]] = set()
        # Published structures: shared with snapshots, replaced (never mutated) once shared.
        self._base: list[NodeView | None] = []
        self._overlay: dict[int, NodeView] = {}
        self._overlay_shared = False
        self._slot_by_id: dict[str, int] = {}
        self._slot_by_id_shared = False
        self._by_model: dict[str, PriceIndex] = {}
        self._by_model_region: dict[tuple[str, str], PriceIndex] = {}
        self._regions_by_model: dict[str, tuple[str, ...]] = {}
        self._free_slots: list[int] = []
        self._pending_free_slots: list[int] = []
        self._removed_slots: list[int] = []
        self._next_slot = 0
        self._version = 0
        self._changed = True
        # node id -> (measurements, breaker) of removed nodes, oldest first.
        self._departed: dict[str, tuple[NodeMeasurements, CircuitBreaker]] = {}

    # ----------------------------------------------------------------- membership

    def upsert_node(self, listing: NodeListing) -> None:
        """Add a node, or replace its listing (keeping its load, statistics and breaker)."""
        now_s = self._clock()
        state = self._nodes.get(listing.node_id)
        if state is None:
            slot = self._free_slots.pop() if self._free_slots else self._take_new_slot()
            state = _NodeState(listing, slot, self._config, now_s)
            departed = self._departed.pop(listing.node_id, None)
            if departed is not None:
                state.measurements, state.breaker = departed
                state.measured()
            self._nodes[listing.node_id] = state
            self._set_slot_by_id(listing.node_id, slot)
            self._join_buckets(listing)
        else:
            if state.listing != listing:
                self._leave_buckets(state.listing)
                state.listing = listing
                self._join_buckets(listing)
            state.last_seen_s = now_s
        self._write(state)

    def remove_node(self, node_id: str) -> bool:
        """Take a node out of the market; False if it was not in it."""
        state = self._nodes.pop(node_id, None)
        if state is None:
            return False
        self._leave_buckets(state.listing)
        if self._config.departed_remembered:
            self._departed[node_id] = (state.measurements, state.breaker)
            if len(self._departed) > self._config.departed_remembered:
                del self._departed[next(iter(self._departed))]
        if self._slot_by_id_shared:
            self._slot_by_id = dict(self._slot_by_id)
            self._slot_by_id_shared = False
        del self._slot_by_id[node_id]
        self._own_overlay()
        self._overlay.pop(state.slot, None)
        self._removed_slots.append(state.slot)
        self._changed = True
        return True

    def expire_silent(self, liveness_timeout_s: float) -> list[str]:
        """Remove nodes not heard from for ``liveness_timeout_s``; their ids, sorted.

        Scans every node: call it about once per liveness period, not per request.
        """
        deadline_s = self._clock() - liveness_timeout_s
        silent = sorted(n for n, s in self._nodes.items() if s.last_seen_s < deadline_s)
        for node_id in silent:
            self.remove_node(node_id)
        return silent

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def listing(self, node_id: str) -> NodeListing | None:
        """The current listing of ``node_id``, or None."""
        state = self._nodes.get(node_id)
        return None if state is None else state.listing

    def measurements(self, node_id: str) -> NodeMeasurements | None:
        """The live statistics of ``node_id`` (read them, do not feed them), or None."""
        state = self._nodes.get(node_id)
        return None if state is None else state.measurements

    def breaker_state(self, node_id: str) -> BreakerState | None:
        """The breaker state of ``node_id`` now, or None if it is not in the market."""
        state = self._nodes.get(node_id)
        return None if state is None else state.breaker.state(self._clock())

    # ------------------------------------------------------------- live updates

    def update_load(self, node_id: str, load: LoadReport) -> bool:
        """A heartbeat's load; also counts as a sign of life. False for an unknown node."""
        state = self._nodes.get(node_id)
        if state is None:
            return False
        state.load = load
        state.in_flight_at_report = state.in_flight
        state.last_seen_s = self._clock()
        self._write(state)
        return True

    def record_rtt(self, node_id: str, rtt_s: float) -> bool:
        """A network round trip the coordinator timed (e.g. heartbeat to its answer)."""
        state = self._nodes.get(node_id)
        if state is None or not rtt_s >= 0:
            return False
        state.measurements.rtt.observe(rtt_s, self._clock())
        state.measured()
        self._write(state)
        return True

    def record_first_token(self, node_id: str, ttft_s: float) -> bool:
        """Time from sending WorkerGenerate to the first token arriving, seconds."""
        state = self._nodes.get(node_id)
        if state is None or not ttft_s >= 0:
            return False
        state.measurements.ttft.observe(ttft_s, self._clock())
        state.measured()
        self._write(state)
        return True

    def record_decode(self, node_id: str, output_tokens: int, decode_s: float) -> bool:
        """``output_tokens`` arrived over ``decode_s`` seconds after the first one.

        Records the time per output token, decode_s / (output_tokens - 1); ignored for
        fewer than two tokens.
        """
        state = self._nodes.get(node_id)
        if state is None or output_tokens < 2 or not decode_s >= 0:
            return False
        state.measurements.tpot.observe(decode_s / (output_tokens - 1), self._clock())
        state.measured()
        self._write(state)
        return True

    def dispatch_started(self, node_id: str) -> bool:
        """The coordinator sent a request to the node (counts in flight; may be the probe)."""
        state = self._nodes.get(node_id)
        if state is None:
            return False
        state.in_flight += 1
        state.breaker.on_dispatch(self._clock())
        self._write(state)
        return True

    def dispatch_finished(self, node_id: str, outcome: DispatchOutcome) -> bool:
        """An attempt on the node ended; updates in-flight, reliability and the breaker.

        A node that left while the attempt ran still gets its verdict, on the breaker and
        record it gets back if it returns: had the attempt been its half-open probe, the
        probe would otherwise stay out forever and the node never be routed to again.
        """
        now_s = self._clock()
        state = self._nodes.get(node_id)
        if state is None:
            departed = self._departed.get(node_id)
            if departed is None:
                return False
            _judge(*departed, outcome, now_s)
            return True
        state.in_flight = max(0, state.in_flight - 1)
        if _judge(state.measurements, state.breaker, outcome, now_s):
            state.measured()
        self._write(state)
        return True

    # ------------------------------------------------------------------ publishing

    def snapshot(self) -> MarketSnapshot:
        """An immutable snapshot of the market now (cheap when little changed)."""
        now_s = self._clock()
        if self._changed:
            self._version += 1
            threshold = max(
                self._config.overlay_compaction_min,
                len(self._nodes) // self._config.overlay_compaction_divisor,
            )
            if self._dirty_buckets or self._removed_slots or len(self._overlay) > threshold:
                self._compact()
            if self._dirty_buckets:
                self._rebuild_dirty_buckets()
            self._changed = False
        self._overlay_shared = True
        self._slot_by_id_shared = True
        return MarketSnapshot(
            version=self._version,
            taken_at_s=now_s,
            base=self._base,
            overlay=self._overlay,
            slot_by_id=self._slot_by_id,
            by_model=self._by_model,
            by_model_region=self._by_model_region,
            regions_by_model=self._regions_by_model,
        )

    # --------------------------------------------------------------------- internals

    def _take_new_slot(self) -> int:
        slot = self._next_slot
        self._next_slot += 1
        return slot

    def _set_slot_by_id(self, node_id: str, slot: int) -> None:
        if self._slot_by_id_shared:
            self._slot_by_id = dict(self._slot_by_id)
            self._slot_by_id_shared = False
        self._slot_by_id[node_id] = slot

    def _own_overlay(self) -> None:
        if self._overlay_shared:
            self._overlay = dict(self._overlay)
            self._overlay_shared = False

    def _write(self, state: _NodeState) -> None:
        self._own_overlay()
        self._overlay[state.slot] = state.view()
        self._changed = True

    def _join_buckets(self, listing: NodeListing) -> None:
        for key in _bucket_keys(listing):
            self._members.setdefault(key, set()).add(listing.node_id)
            self._dirty_buckets.add(key)

    def _leave_buckets(self, listing: NodeListing) -> None:
        for key in _bucket_keys(listing):
            members = self._members.get(key)
            if members is not None:
                members.discard(listing.node_id)
                if not members:
                    del self._members[key]
            self._dirty_buckets.add(key)

    def _compact(self) -> None:
        base: list[NodeView | None] = list(self._base)
        if len(base) < self._next_slot:
            base.extend([None] * (self._next_slot - len(base)))
        for slot in self._removed_slots:
            base[slot] = None
        for slot, view in self._overlay.items():
            base[slot] = view
        self._base = base
        self._overlay = {}
        self._overlay_shared = False
        # A removed node's slot is reused only after it left the published base.
        self._free_slots.extend(self._removed_slots)
        self._removed_slots = []

    def _rebuild_dirty_buckets(self) -> None:
        by_model = dict(self._by_model)
        by_model_region = dict(self._by_model_region)
        for key in self._dirty_buckets:
            model, region = key
            members = self._members.get(key)
            index = self._index_of(model, members) if members else None
            if region is None:
                if index is None:
                    by_model.pop(model, None)
                else:
                    by_model[model] = index
            elif index is None:
                by_model_region.pop((model, region), None)
            else:
                by_model_region[(model, region)] = index
        self._by_model = by_model
        self._by_model_region = by_model_region
        self._regions_by_model = regions_of(by_model_region)
        self._dirty_buckets = set()

    def _index_of(self, model: str, members: Iterable[str]) -> PriceIndex:
        rows: list[tuple[str, int, int, int, int]] = []
        for node_id in members:
            state = self._nodes[node_id]
            terms = state.listing.terms_for(model)
            assert terms is not None
            rows.append(
                (
                    node_id,
                    state.slot,
                    terms.price_input_micro_usd_per_mtok,
                    terms.price_output_micro_usd_per_mtok,
                    terms.context_length,
                )
            )
        return PriceIndex.build(rows)
