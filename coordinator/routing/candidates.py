"""Candidate lookup: the eligible nodes of a request, without touching unrelated nodes.

Only the price indexes of the request's model (one per allowed region, or the model's
all-region index) are read, and price caps are bisected into prefixes of those sorted
lists, so the cost does not grow with nodes of other models or regions. Within them:

- ``only_nodes`` set: those nodes are looked up by id and checked (exact).
- price mode: the exact cheapest ``price_pool_size`` eligible nodes by expected cost
  (input_tokens x input price + max_tokens x output price). First from each index's
  precomputed price skyband (about a hundred rows whatever the bucket size), which is
  provably enough unless too many cheap nodes are busy, excluded or failing; then, if it
  is not, with Fagin's threshold algorithm over the two price-sorted lists (it stops once
  no unseen node can be cheaper). Then a uniform sample of other nodes within the
  near-best cost margin, so power-of-two-choices has more than the same few equally
  cheap nodes to spread over.
- other modes: if the prefixes hold at most ``sample_size`` nodes, all are checked
  (exact); otherwise ``sample_size`` positions are drawn uniformly without replacement
  (sampled: the pick is the best of a random sample, expected in the top
  1/(sample_size+1) of the eligible nodes, not necessarily the very best). If the draw
  yields fewer than two eligible nodes, a second, larger draw follows, and if that finds
  none, every node of the prefixes is checked, so "no eligible node" is always exact.
"""

from __future__ import annotations

import random
from array import array
from bisect import bisect_right, insort
from collections.abc import Iterable

from coordinator.routing.config import RoutingConfig
from coordinator.routing.constraints import Eligibility
from coordinator.routing.node_view import NodeView
from coordinator.routing.request import RouteRequest
from coordinator.routing.snapshot import SKYBAND_DEPTH, MarketSnapshot, PriceIndex

__all__ = ["Gathered", "gather"]

# (view, input price, output price) of an eligible node for the request's model.
Row = tuple[NodeView, int, int]
_IndexRow = tuple[int, int, int, int]


class Gathered:
    """Eligible candidates found for a request, and whether the search was exhaustive."""

    __slots__ = ("exact", "rows")

    def __init__(self, rows: list[Row], exact: bool) -> None:
        self.rows = rows
        # True when every eligible node was considered (no sampling involved).
        self.exact = exact


def gather(
    snapshot: MarketSnapshot,
    request: RouteRequest,
    eligibility: Eligibility,
    rng: random.Random,
    config: RoutingConfig,
    *,
    cheapest: bool,
    near_best_slack: float,
) -> Gathered:
    """Eligible candidates of ``request``; ``cheapest`` selects the price-mode search."""
    prefs = request.preferences
    if prefs.only_nodes:
        return _named_nodes(snapshot, request, eligibility)
    if prefs.regions:
        indexes = [snapshot.index_for(request.model, region) for region in sorted(prefs.regions)]
        indexes = [index for index in indexes if len(index)]
    else:
        index = snapshot.index_for(request.model)
        indexes = [index] if len(index) else []
    if not indexes:
        return Gathered([], True)
    if cheapest:
        return _cheapest(snapshot, request, eligibility, rng, config, indexes, near_best_slack)
    prefixes = [
        index.prefix(
            prefs.max_price_input_micro_usd_per_mtok, prefs.max_price_output_micro_usd_per_mtok
        )
        for index in indexes
    ]
    return _sampled(snapshot, eligibility, rng, config.sample_size, prefixes)


def _named_nodes(
    snapshot: MarketSnapshot, request: RouteRequest, eligibility: Eligibility
) -> Gathered:
    regions = request.preferences.regions
    rows: list[Row] = []
    for node_id in sorted(request.preferences.only_nodes):
        view = snapshot.get(node_id)
        if view is None or (regions and view.listing.region not in regions):
            continue
        terms = view.listing.terms_for(request.model)
        if terms is None:
            continue
        price_input = terms.price_input_micro_usd_per_mtok
        price_output = terms.price_output_micro_usd_per_mtok
        if eligibility.admits(view, price_input, price_output, terms.context_length):
            rows.append((view, price_input, price_output))
    return Gathered(rows, True)


def _admit(
    snapshot: MarketSnapshot, eligibility: Eligibility, rows: Iterable[_IndexRow]
) -> list[Row]:
    """The eligible ones among index rows (the hot loop: everything inlined)."""
    base, overlay = snapshot.tables()
    get = overlay.get
    skip = eligibility.skip
    only = eligibility.only
    check_ids = bool(skip or only)
    cap_input = eligibility.max_price_input
    cap_output = eligibility.max_price_output
    min_context = eligibility.min_context_length
    now_s = eligibility.now_s
    found: list[Row] = []
    for slot, price_input, price_output, context_length in rows:
        if price_input > cap_input or price_output > cap_output or context_length < min_context:
            continue
        view = get(slot) or base[slot]
        assert view is not None
        if (
            view.occupancy >= view.max_concurrency
            or view.probe_in_flight
            or now_s < view.breaker_open_until_s
        ):
            continue
        if check_ids:
            node_id = view.node_id
            if node_id in skip or (only and node_id not in only):
                continue
        found.append((view, price_input, price_output))
    return found


def _draw(rng: random.Random, total: int, count: int, drawn: set[int]) -> list[int]:
    """``count`` uniform draws in [0, total), minus repeats and those in ``drawn``
    (the new ones are added to it). A repeat costs one candidate, not a redraw."""
    draw = rng.random
    positions = [
        p for p in dict.fromkeys([int(draw() * total) for _ in range(count)]) if p not in drawn
    ]
    drawn.update(positions)
    return positions


def _sampled(
    snapshot: MarketSnapshot,
    eligibility: Eligibility,
    rng: random.Random,
    sample_size: int,
    prefixes: list[tuple[tuple[_IndexRow, ...], int]],
    *,
    scan_if_empty: bool = True,
) -> Gathered:
    total = sum(length for _, length in prefixes)
    if total <= sample_size:
        every = [row for rows, length in prefixes for row in rows[:length]]
        return Gathered(_admit(snapshot, eligibility, every), True)
    starts: list[int] = []
    running = 0
    for _, length in prefixes:
        starts.append(running)
        running += length
    found: list[Row] = []
    drawn: set[int] = set()
    for round_size in (sample_size, 2 * sample_size):
        positions = _draw(rng, total, round_size, drawn)
        if len(prefixes) == 1:
            rows = prefixes[0][0]
            picked = [rows[p] for p in positions]
        else:
            picked = []
            for position in positions:
                which = bisect_right(starts, position) - 1
                picked.append(prefixes[which][0][position - starts[which]])
        found.extend(_admit(snapshot, eligibility, picked))
        if len(found) >= 2 or len(drawn) >= total:
            break
    if not found and scan_if_empty:
        every = [row for rows, length in prefixes for row in rows[:length]]
        return Gathered(_admit(snapshot, eligibility, every), True)
    return Gathered(found, len(drawn) >= total)


def _cheapest(
    snapshot: MarketSnapshot,
    request: RouteRequest,
    eligibility: Eligibility,
    rng: random.Random,
    config: RoutingConfig,
    indexes: list[PriceIndex],
    near_best_slack: float,
) -> Gathered:
    weight_input = request.input_tokens
    weight_output = request.max_tokens
    pool_size = config.price_pool_size
    prefs = request.preferences
    cap_input = prefs.max_price_input_micro_usd_per_mtok
    cap_output = prefs.max_price_output_micro_usd_per_mtok
    best = _cheapest_in_skyband(snapshot, request, eligibility, pool_size, indexes)
    if best is None:
        best = _cheapest_by_threshold(snapshot, request, eligibility, pool_size, indexes)
    rows: list[Row] = [(view, p_in, p_out) for _, _, view, p_in, p_out in best]
    margin_cost = best[0][0] * (1.0 + near_best_slack) if best else 0.0
    if len(best) < pool_size or best[-1][0] > margin_cost:
        # Every eligible node within the near-best margin is already in the pool.
        return Gathered(rows, True)
    # The pool is full of nodes about as cheap as the cheapest: there may be more. Top it
    # up with a uniform sample of the nodes whose prices allow a cost within the margin.
    limit_output = int(margin_cost // weight_output)
    if cap_output is not None:
        limit_output = min(limit_output, cap_output)
    limit_input = cap_input
    if weight_input:
        limit_input = int(margin_cost // weight_input)
        if cap_input is not None:
            limit_input = min(limit_input, cap_input)
    prefixes = [index.prefix(limit_input, limit_output) for index in indexes]
    seen = {view.slot for view, _, _ in rows}
    extra = _sampled(
        snapshot, eligibility, rng, config.sample_size, prefixes, scan_if_empty=False
    ).rows
    for view, price_input, price_output in extra:
        if (
            view.slot not in seen
            and weight_input * price_input + weight_output * price_output <= margin_cost
        ):
            seen.add(view.slot)
            rows.append((view, price_input, price_output))
    return Gathered(rows, True)


# (cost, node id, view, input price, output price)
_Priced = tuple[int, str, NodeView, int, int]


def _cheapest_in_skyband(
    snapshot: MarketSnapshot,
    request: RouteRequest,
    eligibility: Eligibility,
    pool_size: int,
    indexes: list[PriceIndex],
) -> list[_Priced] | None:
    """The exact ``pool_size`` cheapest eligible nodes, from the indexes' skybands alone;
    None when the skybands cannot prove it (then the threshold algorithm runs).

    Proof sketch: a node outside its index's skyband is weakly dominated by at least
    SKYBAND_DEPTH nodes inside it, all under the price caps if it is, all costing no more.
    Walking the skyband rows by cost, if at most SKYBAND_DEPTH - pool_size of the rows
    walked were ineligible for reasons other than the caps, every eligible outside node has
    at least pool_size eligible dominators among the rows taken, so it is not cheaper than
    the pool's last entry.
    """
    tolerance = SKYBAND_DEPTH - pool_size
    if tolerance <= 0:
        return None
    weight_input = request.input_tokens
    weight_output = request.max_tokens
    cap_input = eligibility.max_price_input
    cap_output = eligibility.max_price_output
    if len(indexes) == 1:
        index = indexes[0]
        band = index.skyband
        prices_input, prices_output = index.skyband_prices_input, index.skyband_prices_output
    else:
        band = tuple(row for index in indexes for row in index.skyband)
        prices_input = array("q")
        prices_output = array("q")
        for index in indexes:
            prices_input += index.skyband_prices_input
            prices_output += index.skyband_prices_output
    costs = [
        weight_input * price_input + weight_output * price_output
        for price_input, price_output in zip(prices_input, prices_output, strict=True)
    ]
    best: list[_Priced] = []
    ineligible = 0
    for position in sorted(range(len(costs)), key=costs.__getitem__):
        row = band[position]
        if row[1] > cap_input or row[2] > cap_output:
            continue
        cost = costs[position]
        admitted = _admit(snapshot, eligibility, (row,))
        if not admitted:
            ineligible += 1
            if ineligible > tolerance:
                return None
            continue
        view = admitted[0][0]
        best.append((cost, view.node_id, view, row[1], row[2]))
        if len(best) >= pool_size:
            break
    best.sort(key=_cost_key)
    return best


def _cheapest_by_threshold(
    snapshot: MarketSnapshot,
    request: RouteRequest,
    eligibility: Eligibility,
    pool_size: int,
    indexes: list[PriceIndex],
) -> list[_Priced]:
    """The exact ``pool_size`` cheapest eligible nodes by Fagin's threshold algorithm over
    the two price-sorted lists (stops once no unseen node can be cheaper)."""
    weight_input = request.input_tokens
    weight_output = request.max_tokens
    prefs = request.preferences
    cap_input = prefs.max_price_input_micro_usd_per_mtok
    cap_output = prefs.max_price_output_micro_usd_per_mtok
    best: list[_Priced] = []
    in_pool: set[int] = set()
    rejected: set[int] = set()
    for index in indexes:
        length_output = (
            len(index) if cap_output is None else bisect_right(index.output_prices, cap_output)
        )
        length_input = (
            len(index) if cap_input is None else bisect_right(index.input_prices, cap_input)
        )
        by_output, by_input = index.by_output, index.by_input
        depth = 0
        while depth < length_output and depth < length_input:
            for row in (by_output[depth], by_input[depth]):
                cost = weight_input * row[1] + weight_output * row[2]
                # Only a node that would enter the pool is looked at further (lazy check).
                if len(best) >= pool_size and cost >= best[-1][0]:
                    continue
                slot = row[0]
                if slot in in_pool or slot in rejected:
                    continue
                admitted = _admit(snapshot, eligibility, (row,))
                if not admitted:
                    rejected.add(slot)
                    continue
                view = admitted[0][0]
                in_pool.add(slot)
                insort(best, (cost, view.node_id, view, row[1], row[2]), key=_cost_key)
                if len(best) > pool_size:
                    in_pool.discard(best.pop()[2].slot)
            # No node deeper in both lists can cost less than this.
            threshold = weight_input * by_input[depth][1] + weight_output * by_output[depth][2]
            if len(best) >= pool_size and best[-1][0] <= threshold:
                break
            depth += 1
    return best


def _cost_key(entry: _Priced) -> tuple[int, str]:
    return entry[0], entry[1]
