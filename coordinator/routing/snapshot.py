"""An immutable snapshot of the market, indexed for routing.

Layout (built by :class:`~coordinator.routing.Market`, read by :func:`route`):

- a node table: a base list of views by slot plus a small overlay of views replaced
  since the base was last compacted (so publishing a snapshot after a heartbeat or a
  dispatch copies only the overlay, not 100k views);
- one :class:`PriceIndex` per model and per (model, region), holding the slots of the
  nodes serving that model there, sorted by output price and by input price. Membership
  and prices change only when offers change, so heartbeats never touch the indexes, and
  a request only reads the buckets of its own model (and regions).
"""

from __future__ import annotations

from array import array
from bisect import bisect_right, insort
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from coordinator.routing.node_view import NodeView

__all__ = ["SKYBAND_DEPTH", "MarketSnapshot", "PriceIndex"]

# Depth of the price skyband kept per index (see PriceIndex.skyband).
SKYBAND_DEPTH = 16


@dataclass(frozen=True, slots=True)
class PriceIndex:
    """Nodes serving one model (in one region, or anywhere), sorted two ways.

    ``by_output`` lists (slot, input price, output price, context length) rows sorted by
    output price, then input price, then node id; ``by_input`` the same rows sorted by input
    price first. ``output_prices`` / ``input_prices`` are the sort keys, for bisecting a
    price cap into a prefix.
    """

    by_output: tuple[tuple[int, int, int, int], ...]
    output_prices: tuple[int, ...]
    by_input: tuple[tuple[int, int, int, int], ...]
    input_prices: tuple[int, ...]
    # The SKYBAND_DEPTH-skyband: rows weakly dominated (both prices <=, earlier in
    # (input, output, node id) order) by fewer than SKYBAND_DEPTH other rows. Any row
    # outside it has at least SKYBAND_DEPTH rows inside it that cost no more under every
    # non-negative mix of input and output tokens; price mode searches it first.
    skyband: tuple[tuple[int, int, int, int], ...] = ()
    # The skyband's input and output prices as packed arrays (cache-friendly to scan).
    skyband_prices_input: array[int] = field(default_factory=lambda: array("q"))
    skyband_prices_output: array[int] = field(default_factory=lambda: array("q"))

    @classmethod
    def build(cls, rows: list[tuple[str, int, int, int, int]]) -> PriceIndex:
        """From (node id, slot, input price, output price, context length) rows."""
        by_output = sorted(rows, key=lambda r: (r[3], r[2], r[0]))
        by_input = sorted(rows, key=lambda r: (r[2], r[3], r[0]))
        band: list[tuple[int, int, int, int]] = []
        outputs_seen: list[int] = []
        for row in by_input:
            if bisect_right(outputs_seen, row[3]) < SKYBAND_DEPTH:
                band.append(row[1:])
            insort(outputs_seen, row[3])
        return cls(
            by_output=tuple(r[1:] for r in by_output),
            output_prices=tuple(r[3] for r in by_output),
            by_input=tuple(r[1:] for r in by_input),
            input_prices=tuple(r[2] for r in by_input),
            skyband=tuple(band),
            skyband_prices_input=array("q", (row[1] for row in band)),
            skyband_prices_output=array("q", (row[2] for row in band)),
        )

    def __len__(self) -> int:
        return len(self.by_output)

    def prefix(
        self, max_price_input: int | None, max_price_output: int | None
    ) -> tuple[tuple[tuple[int, int, int, int], ...], int]:
        """The shorter of the two sorted lists' prefixes that respect the price caps.

        Returns (rows, length): every node under both caps is among ``rows[:length]``
        (the other cap still has to be checked row by row).
        """
        length_output = (
            len(self.by_output)
            if max_price_output is None
            else bisect_right(self.output_prices, max_price_output)
        )
        length_input = (
            len(self.by_input)
            if max_price_input is None
            else bisect_right(self.input_prices, max_price_input)
        )
        if length_input < length_output:
            return self.by_input, length_input
        return self.by_output, length_output


_EMPTY_INDEX = PriceIndex((), (), (), ())


class MarketSnapshot:
    """Every live node at one moment, indexed by model and by (model, region). Immutable.

    Build it with :meth:`Market.snapshot <coordinator.routing.Market.snapshot>`; tests may
    also use :meth:`from_views`.
    """

    __slots__ = (
        "_base",
        "_by_model",
        "_by_model_region",
        "_overlay",
        "_regions_by_model",
        "_size",
        "_slot_by_id",
        "taken_at_s",
        "version",
    )

    def __init__(
        self,
        *,
        version: int,
        taken_at_s: float,
        base: list[NodeView | None],
        overlay: Mapping[int, NodeView],
        slot_by_id: Mapping[str, int],
        by_model: Mapping[str, PriceIndex],
        by_model_region: Mapping[tuple[str, str], PriceIndex],
        regions_by_model: Mapping[str, tuple[str, ...]],
    ) -> None:
        # Every container handed in is owned by this snapshot from now on (the market
        # copies on write); nothing here is mutated after construction.
        self.version = version
        # When the snapshot was taken, on the market's (monotonic) clock, seconds.
        self.taken_at_s = taken_at_s
        self._base = base
        self._overlay = overlay
        self._slot_by_id = slot_by_id
        self._by_model = by_model
        self._by_model_region = by_model_region
        self._regions_by_model = regions_by_model
        self._size = len(slot_by_id)

    @classmethod
    def from_views(
        cls, views: list[NodeView], *, taken_at_s: float = 0.0, version: int = 0
    ) -> MarketSnapshot:
        """A snapshot of exactly these views (their ``slot`` must be 0..n-1 in order)."""
        for position, view in enumerate(views):
            if view.slot != position:
                raise ValueError(f"views[{position}].slot is {view.slot}, expected {position}")
        slot_by_id = {view.node_id: view.slot for view in views}
        if len(slot_by_id) != len(views):
            raise ValueError("views: a node id appears twice")
        by_model, by_model_region, regions_by_model = build_indexes(list(views))
        return cls(
            version=version,
            taken_at_s=taken_at_s,
            base=list(views),
            overlay={},
            slot_by_id=slot_by_id,
            by_model=by_model,
            by_model_region=by_model_region,
            regions_by_model=regions_by_model,
        )

    def __len__(self) -> int:
        """Number of live nodes."""
        return self._size

    def view(self, slot: int) -> NodeView:
        """The view in ``slot`` (a slot taken from this snapshot's indexes)."""
        found = self._overlay.get(slot)
        if found is None:
            found = self._base[slot]
            assert found is not None, f"slot {slot} is empty in this snapshot"
        return found

    def tables(self) -> tuple[list[NodeView | None], Mapping[int, NodeView]]:
        """The node table as (base by slot, overlay by slot): a view is
        ``overlay.get(slot) or base[slot]``. For hot loops in this package; read only."""
        return self._base, self._overlay

    def get(self, node_id: str) -> NodeView | None:
        """The view of ``node_id``, or None if it is not in the market."""
        slot = self._slot_by_id.get(node_id)
        return None if slot is None else self.view(slot)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._slot_by_id

    def __iter__(self) -> Iterator[NodeView]:
        """Every view, in node id order."""
        for node_id in sorted(self._slot_by_id):
            yield self.view(self._slot_by_id[node_id])

    @property
    def nodes(self) -> tuple[NodeView, ...]:
        """Every view, in node id order (O(n): for listings, not for routing)."""
        return tuple(self)

    def models(self) -> tuple[str, ...]:
        """Models served by at least one node, sorted."""
        return tuple(sorted(self._by_model))

    def regions_for(self, model: str) -> tuple[str, ...]:
        """Regions where ``model`` is served, sorted."""
        return self._regions_by_model.get(model, ())

    def index_for(self, model: str, region: str | None = None) -> PriceIndex:
        """The price index of ``model`` anywhere (region None) or in one region."""
        if region is None:
            return self._by_model.get(model, _EMPTY_INDEX)
        return self._by_model_region.get((model, region), _EMPTY_INDEX)


IndexMaps = tuple[
    dict[str, PriceIndex], dict[tuple[str, str], PriceIndex], dict[str, tuple[str, ...]]
]


def build_indexes(views: list[NodeView | None]) -> IndexMaps:
    """Price indexes of every model and (model, region) over ``views`` (None = free slot)."""
    by_model_rows: dict[str, list[tuple[str, int, int, int, int]]] = {}
    by_model_region_rows: dict[tuple[str, str], list[tuple[str, int, int, int, int]]] = {}
    for view in views:
        if view is None:
            continue
        listing = view.listing
        for terms in listing.models:
            row = (
                listing.node_id,
                view.slot,
                terms.price_input_micro_usd_per_mtok,
                terms.price_output_micro_usd_per_mtok,
                terms.context_length,
            )
            by_model_rows.setdefault(terms.model, []).append(row)
            by_model_region_rows.setdefault((terms.model, listing.region), []).append(row)
    by_model = {model: PriceIndex.build(rows) for model, rows in by_model_rows.items()}
    by_model_region = {key: PriceIndex.build(rows) for key, rows in by_model_region_rows.items()}
    return by_model, by_model_region, regions_of(by_model_region)


def regions_of(by_model_region: Mapping[tuple[str, str], PriceIndex]) -> dict[str, tuple[str, ...]]:
    """Sorted regions per model."""
    regions: dict[str, list[str]] = {}
    for model, region in by_model_region:
        regions.setdefault(model, []).append(region)
    return {model: tuple(sorted(found)) for model, found in regions.items()}
