"""The live registry of nodes: who is in the market now, with what offer and load.

A node enters with a verified SignedOffer (:func:`coordinator.offers.verify_offer`) and
gets a session token; it stays while its heartbeat stream is open and it is never silent
for longer than ``liveness_timeout_ms`` (a reaper task checks). A node whose stream ends
(a killed process resets its connection) is dropped at once. Each live node has one
reused grpc.aio channel to its worker, closed when the node is dropped.

The registry feeds the routing :class:`~coordinator.routing.Market`, the one source of
truth for routing (:attr:`NodeRegistry.market`): a registration upserts the node's
listing, a heartbeat updates its load, a timed ping records its round trip, a drop
removes it. The relay records every attempt on the market itself (dispatch started,
first token, decode, finished). Routing reads :meth:`NodeRegistry.snapshot`, the
market's immutable snapshot. The registry keeps what routing does not need: sessions,
the verified offers (ListNodes shows them), worker channels, liveness and the models
ever offered (to tell an unknown model from one that is down).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc.aio
from mercato.v1 import market_pb2, node_pb2

from coordinator.errors import CapacityExhausted, HeartbeatInvalid, OfferInvalid, SessionInvalid
from coordinator.offers import VerifiedOffer, verify_offer
from coordinator.routing import LoadReport, Market, MarketSnapshot, NodeListing
from coordinator.settings import CoordinatorSettings
from coordinator.worker_session import WorkerLink
from marketplace.aio import cancel_and_wait
from marketplace.control import NODE_ID_METADATA
from marketplace.dispatch import DISPATCH_METADATA, dispatch_tag

log = logging.getLogger(__name__)

KV_CACHE_PERMILLE_MAX = 1000
# Bounds on what is remembered of nodes that left (anyone can make new node keys).
KNOWN_MODELS_MAX = 10_000
SEQUENCES_REMEMBERED_PER_NODE_SLOT = 4
# Options of the channel to each node's worker: large enough for any delta or final.
_WORKER_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.enable_retries", 0),
)


@dataclass(frozen=True, slots=True)
class Registration:
    """What a node gets back when its offer is accepted."""

    node_id: str
    session_token: str


def _same_token(expected: str, presented: str) -> bool:
    """Constant-time comparison (bytes: compare_digest refuses non-ASCII str)."""
    return hmac.compare_digest(expected.encode(), presented.encode())


class _Entry:
    """Mutable state of one live node; only the registry touches it."""

    __slots__ = (
        "last_seen_monotonic_s",
        "link",
        "offer",
        "session_token",
    )

    def __init__(
        self, offer: VerifiedOffer, session_token: str, channel: grpc.aio.Channel, now_s: float
    ) -> None:
        self.offer = offer
        self.session_token = session_token
        self.last_seen_monotonic_s = now_s
        # Every worker call carries the dispatch tag, so the node can say which are ours,
        # and the node id of this offer, so a worker that is another node's refuses it
        # (an offer may name any address; see marketplace.control).
        self.link = WorkerLink(
            channel,
            (
                (DISPATCH_METADATA, dispatch_tag(session_token)),
                (NODE_ID_METADATA, offer.node_id),
            ),
        )

    @property
    def channel(self) -> grpc.aio.Channel:
        return self.link.channel

    def __repr__(self) -> str:  # never show the session token
        return f"_Entry(node_id={self.offer.node_id!r})"


class NodeRegistry:
    """Live nodes, their offers, loads, sessions and worker channels."""

    def __init__(
        self,
        settings: CoordinatorSettings,
        *,
        wall_clock_unix_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        monotonic_s: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._monotonic_s = monotonic_s
        self._wall_clock_unix_ms = wall_clock_unix_ms
        self._entries: dict[str, _Entry] = {}
        # Highest offer sequence accepted per node id, kept after a node is dropped so an
        # old signed offer cannot be replayed.
        self._last_sequence: dict[str, int] = {}
        self._known_models: set[str] = set()
        # Routing's view of the market; shares the registry's monotonic clock.
        self.market = Market(settings.market_config(), clock=monotonic_s)
        self._closing_channels: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None

    # --- joining and leaving -------------------------------------------------------

    def register(self, signed: market_pb2.SignedOffer) -> Registration:
        """Verify ``signed`` and (re)admit its node; raises OfferInvalid/CapacityExhausted."""
        offer = verify_offer(
            signed,
            now_unix_ms=self._wall_clock_unix_ms(),
            max_age_s=self._settings.offer_max_age_s,
        )
        return self.admit(offer)

    def admit(self, offer: VerifiedOffer) -> Registration:
        """Admit an already verified offer (a new session for a known node replaces the old)."""
        node_id = offer.node_id
        last = self._last_sequence.get(node_id)
        if last is not None and offer.sequence <= last:
            raise OfferInvalid(
                f"sequence: {offer.sequence} is not above {last}, the last accepted from this "
                "node; sign a new offer with a higher sequence (e.g. Unix milliseconds)"
            )
        previous = self._entries.get(node_id)
        if previous is None and len(self._entries) >= self._settings.max_nodes:
            raise CapacityExhausted(
                f"this coordinator holds its limit of {self._settings.max_nodes} nodes; "
                "try another coordinator or later"
            )
        listing = NodeListing.from_offer(offer)
        self._remember_sequence(node_id, offer.sequence)
        if previous is not None:
            previous.link.retire()  # its open generations finish; new ones carry the new tag
        if previous is not None and previous.offer.worker_address == offer.worker_address:
            channel = previous.channel
        else:
            if previous is not None:
                self._close_channel_later(previous.channel)
            channel = grpc.aio.insecure_channel(
                offer.worker_address, options=_WORKER_CHANNEL_OPTIONS
            )
        token = secrets.token_urlsafe(32)
        self._entries[node_id] = _Entry(offer, token, channel, self._monotonic_s())
        if len(self._known_models) < KNOWN_MODELS_MAX:
            self._known_models.update(terms.model for terms in offer.models)
        # Keeps load, measurements and breaker of a node that re-registers.
        self.market.upsert_node(listing)
        log.info(
            "node %s registered: region=%s worker=%s models=%s",
            node_id,
            offer.region,
            offer.worker_address,
            ",".join(t.model for t in offer.models),
        )
        return Registration(node_id=node_id, session_token=token)

    def _remember_sequence(self, node_id: str, sequence: int) -> None:
        last_sequence = self._last_sequence
        last_sequence.pop(node_id, None)
        last_sequence[node_id] = sequence  # newest last
        limit = SEQUENCES_REMEMBERED_PER_NODE_SLOT * self._settings.max_nodes
        if len(last_sequence) > limit:
            # Forget the longest-unseen ids that are not live (keys are generated freely).
            for old in [k for k in last_sequence if k not in self._entries][
                : len(last_sequence) - limit
            ]:
                del last_sequence[old]

    def drop(self, node_id: str, reason: str) -> bool:
        """Remove a node now; its channel closes after a grace period. False if absent."""
        entry = self._entries.pop(node_id, None)
        if entry is None:
            return False
        entry.link.retire()
        self._close_channel_later(entry.channel)
        self.market.remove_node(node_id)
        log.info("node %s dropped: %s", node_id, reason)
        return True

    def end_session(self, node_id: str, session_token: str, reason: str) -> None:
        """The heartbeat stream of this session ended: drop the node unless it has
        registered again since (a newer session owns it then)."""
        entry = self._entries.get(node_id)
        if entry is not None and _same_token(entry.session_token, session_token):
            self.drop(node_id, reason)

    # --- sessions and heartbeats ---------------------------------------------------

    def authenticate(self, node_id: str, session_token: str) -> None:
        """Raise SessionInvalid unless ``session_token`` is the node's current session."""
        entry = self._entries.get(node_id)
        if entry is None:
            raise SessionInvalid(
                f"node {node_id[:64]!r} is not registered (or was dropped); call Register again"
            )
        if not _same_token(entry.session_token, session_token):
            raise SessionInvalid(
                "x-mercato-session does not match this node's current registration; "
                "use the session_token of the latest RegisterResponse"
            )

    def record_heartbeat(self, node_id: str, session_token: str, load: node_pb2.NodeLoad) -> None:
        """Note a heartbeat: the node is alive, with this load."""
        self.authenticate(node_id, session_token)
        if load.kv_cache_usage_permille > KV_CACHE_PERMILLE_MAX:
            raise HeartbeatInvalid(
                f"load.kv_cache_usage_permille: {load.kv_cache_usage_permille} is above "
                f"{KV_CACHE_PERMILLE_MAX}"
            )
        self._entries[node_id].last_seen_monotonic_s = self._monotonic_s()
        self.market.update_load(node_id, LoadReport.from_proto(load))

    def withdraw(self, node_id: str, session_token: str) -> None:
        """The node is stopping (its heartbeat says ``draining``): routing sends it nothing
        new from now on. It stays registered until its heartbeat stream ends, so its open
        requests run on and its late receipts are still taken."""
        self.authenticate(node_id, session_token)
        if self.market.remove_node(node_id):
            log.info("node %s is draining: no new request goes to it", node_id)

    def record_pong(self, node_id: str, session_token: str, rtt_s: float | None) -> None:
        """A pong on the node's heartbeat stream: a sign of life, and the round trip of
        the ping it answers as the coordinator timed it (None: not one we sent)."""
        self.authenticate(node_id, session_token)
        self._entries[node_id].last_seen_monotonic_s = self._monotonic_s()
        if rtt_s is not None:
            self.market.record_rtt(node_id, rtt_s)

    def reap(self) -> list[str]:
        """Drop every node silent for longer than the liveness timeout; their ids."""
        now = self._monotonic_s()
        limit_s = self._settings.liveness_timeout_ms / 1000
        silent = [
            node_id
            for node_id, entry in self._entries.items()
            if now - entry.last_seen_monotonic_s > limit_s
        ]
        for node_id in silent:
            self.drop(node_id, f"silent for more than {self._settings.liveness_timeout_ms} ms")
        return silent

    # --- requests --------------------------------------------------------------------

    def worker(self, node_id: str) -> WorkerLink | None:
        """A live node's link to its worker (channel, the metadata every call to it
        carries: its session's dispatch tag, :mod:`marketplace.dispatch`, and its node
        id, which the worker checks; the session stream requests go on); None if it is
        gone."""
        entry = self._entries.get(node_id)
        return None if entry is None else entry.link

    def offer(self, node_id: str) -> VerifiedOffer | None:
        """The verified offer of a live node, or None if it is gone."""
        entry = self._entries.get(node_id)
        return None if entry is None else entry.offer

    # --- reading -------------------------------------------------------------------

    def snapshot(self) -> MarketSnapshot:
        """The live market now, as routing sees it (immutable; cheap when unchanged)."""
        return self.market.snapshot()

    @property
    def known_models(self) -> frozenset[str]:
        """Every model an accepted offer ever named, live or not (bounded)."""
        return frozenset(self._known_models)

    def is_known_model(self, model: str) -> bool:
        return model in self._known_models

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._entries

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the reaper task (needs a running loop)."""
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(
                self._reap_forever(), name="mercato-registry-reaper"
            )

    async def close(self) -> None:
        """Stop the reaper, drop every node and close every channel."""
        if self._reaper is not None:
            await cancel_and_wait(self._reaper)
            self._reaper = None
        for node_id in list(self._entries):
            self.drop(node_id, "coordinator shutting down")
        closing = list(self._closing_channels)
        for task in closing:
            task.cancel()
        await asyncio.gather(*closing, return_exceptions=True)

    async def _reap_forever(self) -> None:
        period_s = min(self._settings.liveness_timeout_ms / 4, 500) / 1000
        while True:
            await asyncio.sleep(period_s)
            self.reap()

    def _close_channel_later(self, channel: grpc.aio.Channel) -> None:
        grace_s = self._settings.liveness_timeout_ms / 1000

        async def close() -> None:
            try:
                await channel.close(grace=grace_s)
            except asyncio.CancelledError:
                await channel.close(grace=None)
                raise

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (pure unit tests): nothing was ever connected
        task = loop.create_task(close(), name="mercato-close-worker-channel")
        self._closing_channels.add(task)
        task.add_done_callback(self._closing_channels.discard)
