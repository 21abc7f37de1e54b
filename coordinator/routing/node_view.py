"""The immutable per-node picture routing decides on: listing, live load, stats, breaker.

A :class:`NodeListing` is what a verified offer says (models and prices, region,
capacity, hardware); it changes only when the node re-registers. A :class:`NodeView`
adds what changes all the time: the load its heartbeats report, the requests this
coordinator has in flight on it, the coordinator's own measurements and the breaker.
Views are never mutated; the market replaces a node's view when something changes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from coordinator.routing.errors import InvalidListingError
from coordinator.routing.measurements import NEVER_MEASURED, NodeStats

__all__ = ["LoadReport", "ModelTerms", "NodeListing", "NodeView"]

_REGION_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


@dataclass(frozen=True, slots=True)
class ModelTerms:
    """One model a node serves and its serverless prices."""

    # Model name as clients ask for it.
    model: str
    # Input (prompt) price, micro-USD per million tokens.
    price_input_micro_usd_per_mtok: int
    # Output (generated) price, micro-USD per million tokens.
    price_output_micro_usd_per_mtok: int
    # Most tokens (prompt plus output) the model accepts.
    context_length: int


@dataclass(frozen=True, slots=True)
class NodeListing:
    """What a node's verified offer says; field names match ``mercato.v1.NodeOffer``."""

    # The node's id (libp2p peer id derived from its public key).
    node_id: str
    # Region code, e.g. "eu-west".
    region: str
    # Models served, at least one, names unique.
    models: tuple[ModelTerms, ...]
    # Most requests the node runs at once.
    max_concurrency: int
    # host:port of the node's NodeWorkerService.
    worker_address: str = ""
    # Dedicated-lease price, micro-USD per GPU-hour.
    price_micro_usd_per_gpu_hour: int = 0
    # mercato.v1.AcceleratorKind number.
    accelerator: int = 0
    # GPUs on the node (0 for a CPU node).
    gpu_count: int = 0

    def __post_init__(self) -> None:
        if not self.node_id:
            raise InvalidListingError("node_id: must not be empty")
        if not _REGION_PATTERN.match(self.region):
            raise InvalidListingError(
                f"region: {self.region!r} is not a region code (lowercase letters, digits, '-')"
            )
        if not self.models:
            raise InvalidListingError(f"models: node {self.node_id} offers no model")
        names = [terms.model for terms in self.models]
        if len(set(names)) != len(names):
            raise InvalidListingError(f"models: node {self.node_id} lists a model twice")
        for terms in self.models:
            if not terms.model:
                raise InvalidListingError("models: a model name is empty")
            for name in ("price_input_micro_usd_per_mtok", "price_output_micro_usd_per_mtok"):
                value = getattr(terms, name)
                if not isinstance(value, int) or value < 0:
                    raise InvalidListingError(
                        f"models[{terms.model}].{name}: must be an integer >= 0, got {value!r}"
                    )
            if terms.context_length < 1:
                raise InvalidListingError(
                    f"models[{terms.model}].context_length: must be >= 1, "
                    f"got {terms.context_length}"
                )
        if self.max_concurrency < 1:
            raise InvalidListingError(f"max_concurrency: must be >= 1, got {self.max_concurrency}")

    def terms_for(self, model: str) -> ModelTerms | None:
        """The terms for ``model``, or None if the node does not serve it."""
        for terms in self.models:
            if terms.model == model:
                return terms
        return None

    @classmethod
    def from_offer(cls, offer: Any, *, node_id: str | None = None) -> NodeListing:
        """A listing from anything shaped like a verified offer.

        Accepts a ``mercato.v1.NodeOffer`` (then pass ``node_id``, derived from its public
        key) or an object with the same attribute names and a ``node_id`` (such as the
        coordinator's verified-offer type). Verify the signature and bounds first.
        """
        hardware = getattr(offer, "hardware", None)
        if hardware is not None and hasattr(hardware, "accelerator"):
            accelerator = int(hardware.accelerator)
            gpu_count = len(hardware.gpus)
        else:
            accelerator = int(getattr(offer, "accelerator", 0))
            gpu_count = int(getattr(offer, "gpu_count", 0))
        return cls(
            node_id=node_id if node_id is not None else offer.node_id,
            region=offer.region,
            models=tuple(
                ModelTerms(
                    model=m.model,
                    price_input_micro_usd_per_mtok=int(m.price_input_micro_usd_per_mtok),
                    price_output_micro_usd_per_mtok=int(m.price_output_micro_usd_per_mtok),
                    context_length=int(m.context_length),
                )
                for m in offer.models
            ),
            max_concurrency=int(offer.max_concurrency),
            worker_address=offer.worker_address,
            price_micro_usd_per_gpu_hour=int(offer.price_micro_usd_per_gpu_hour),
            accelerator=accelerator,
            gpu_count=gpu_count,
        )


@dataclass(frozen=True, slots=True)
class LoadReport:
    """A node's load as its latest heartbeat reported it (``mercato.v1.NodeLoad``).

    Routing uses these counts as hints for load only; latency and throughput come from
    the coordinator's own measurements.
    """

    # Requests being generated.
    running_requests: int = 0
    # Requests accepted but waiting for the engine.
    waiting_requests: int = 0
    # Share of the KV cache in use, permille.
    kv_cache_usage_permille: int = 0
    # Output tokens per second over the last few seconds (as the node claims).
    output_tokens_per_s: int = 0
    # Of the node's open calls at that moment, how many this coordinator sent (tagged,
    # see marketplace.dispatch); None from a node that does not count them.
    coordinator_requests: int | None = None

    @classmethod
    def from_proto(cls, load: Any) -> LoadReport:
        """From a ``mercato.v1.NodeLoad``."""
        return cls(
            running_requests=int(load.running_requests),
            waiting_requests=int(load.waiting_requests),
            kv_cache_usage_permille=int(load.kv_cache_usage_permille),
            output_tokens_per_s=int(load.output_tokens_per_s),
            coordinator_requests=(
                int(load.coordinator_requests) if load.HasField("coordinator_requests") else None
            ),
        )


_IDLE = LoadReport()


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node at the moment of a snapshot; never mutated."""

    # The node's listing (its verified offer).
    listing: NodeListing
    # Position of the node in the snapshot's node table.
    slot: int
    # Load from the latest heartbeat.
    load: LoadReport = _IDLE
    # Requests this coordinator sent to the node and has not seen end.
    in_flight: int = 0
    # Requests on the node, best estimate: ``in_flight`` plus the heartbeat's running +
    # waiting that are not ours (the node says which are, ``coordinator_requests``; an
    # older node's report counts ours as what was in flight when it arrived).
    occupancy: int = 0
    # The coordinator's measurements.
    stats: NodeStats = NEVER_MEASURED
    # Until when the breaker keeps the node out (monotonic seconds; -inf when closed).
    breaker_open_until_s: float = -math.inf
    # Whether the one half-open probe is out (the node takes nothing else meanwhile).
    probe_in_flight: bool = False
    # Copies of listing and stats fields, flattened so routing's hot loops touch one
    # object per node (memory latency dominates at 100k nodes).
    node_id: str = field(init=False)
    max_concurrency: int = field(init=False)
    rtt_s: float | None = field(init=False)
    ttft_s: float | None = field(init=False)
    tpot_s: float | None = field(init=False)
    reliability: float = field(init=False)

    def __post_init__(self) -> None:
        set_field = object.__setattr__
        set_field(self, "node_id", self.listing.node_id)
        set_field(self, "max_concurrency", self.listing.max_concurrency)
        stats = self.stats
        set_field(self, "rtt_s", stats.rtt_s)
        set_field(self, "ttft_s", stats.ttft_s)
        set_field(self, "tpot_s", stats.tpot_s)
        set_field(self, "reliability", stats.reliability)

    @property
    def region(self) -> str:
        return self.listing.region

    @property
    def utilization(self) -> float:
        """Occupancy over capacity (1.0 = full)."""
        return self.occupancy / self.max_concurrency

    def breaker_allows(self, now_s: float) -> bool:
        """Whether the breaker lets a request through at ``now_s``."""
        return now_s >= self.breaker_open_until_s and not self.probe_in_flight

    def has_capacity(self) -> bool:
        """Whether the node can take one more request."""
        return self.occupancy < self.max_concurrency
