"""Usage receipts: check a node's receipt against what the coordinator relayed,
countersign it, and verify a countersigned receipt offline.

The node signs ``"mercato.v1.UsageReceipt\\x00" + receipt`` where ``receipt`` is the
exact serialized UsageReceipt; the coordinator signs ``"mercato.v1.Countersign\\x00" +
receipt + node_signature``. Verifiers parse the stored bytes and never re-encode them.

The coordinator never bills a number the node merely claims: every field that sets the
price (request id, node, model, token counts, prices, segment, lease) must equal what the
coordinator relayed and counted itself, or the receipt is refused.

One variant: a segment the coordinator cut off (client cancel, deadline) has no final,
so its receipt comes late, on the node's heartbeat stream (``HeartbeatRequest.
late_receipts``). The node counts what it wrote to the stream, and tokens in flight when
the call was cut never reached the coordinator, so the receipt's output count may exceed
the relayed count (up to what the node was asked for), never fall short of it. Such a
segment sets ``RelayedSegment.output_tokens_max``; the bill is still the relayed count.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from mercato.v1 import market_pb2

from marketplace.identity import Identity, IdentityError, node_id_from_public_key, verify
from marketplace.ledger.errors import (
    ForgedReceipt,
    MalformedReceipt,
    MiscountedReceipt,
)
from marketplace.ledger.money import token_cost_micro_usd

RECEIPT_DOMAIN = "mercato.v1.UsageReceipt"
COUNTERSIGN_DOMAIN = "mercato.v1.Countersign"


@dataclass(frozen=True)
class RelayedSegment:
    """What the coordinator itself saw of one node's part of a request."""

    worker_request_id: str  # the request id the coordinator gave the node
    node_id: str
    model: str
    input_tokens: int  # counted by the coordinator
    output_tokens: int  # counted by the coordinator
    price_input_micro_usd_per_mtok: int  # the matched offer's prices
    price_output_micro_usd_per_mtok: int
    segment_index: int = 0
    lease_id: str = ""
    # None: the node's stream ended with its final, so the receipt counts exactly
    # output_tokens. Set: the coordinator cut the stream off and the receipt came late;
    # the node's count may lie in [output_tokens, output_tokens_max] (tokens in flight
    # when the call was cut); output_tokens is billed either way.
    output_tokens_max: int | None = None

    @property
    def cut_off(self) -> bool:
        """Whether the coordinator cut this segment off before the node's final."""
        return self.output_tokens_max is not None

    @property
    def cost_micro_usd(self) -> int:
        return token_cost_micro_usd(
            self.input_tokens,
            self.output_tokens,
            self.price_input_micro_usd_per_mtok,
            self.price_output_micro_usd_per_mtok,
        )


def parse_receipt(signed: market_pb2.SignedReceipt) -> market_pb2.UsageReceipt:
    usage = market_pb2.UsageReceipt()
    try:
        usage.ParseFromString(signed.receipt)
    except DecodeError as exc:
        raise MalformedReceipt(f"receipt bytes do not parse as a UsageReceipt: {exc}") from exc
    if not usage.request_id or not usage.node_id:
        raise MalformedReceipt("receipt has no request_id or node_id")
    return usage


def check_node_signature(signed: market_pb2.SignedReceipt) -> market_pb2.UsageReceipt:
    """The parsed receipt if the node's key and signature hold, else Forged/Malformed."""
    usage = parse_receipt(signed)
    try:
        key_node_id = node_id_from_public_key(signed.node_public_key)
    except IdentityError as exc:
        raise ForgedReceipt(f"receipt carries an unusable node public key: {exc}") from exc
    if key_node_id != usage.node_id:
        raise ForgedReceipt(
            f"receipt names node {usage.node_id} but is signed with the key of {key_node_id}"
        )
    if not verify(signed.node_public_key, RECEIPT_DOMAIN, signed.receipt, signed.node_signature):
        raise ForgedReceipt(
            f"node signature on the receipt for {usage.request_id} does not verify "
            "(forged or altered receipt)"
        )
    return usage


def check_receipt(
    signed: market_pb2.SignedReceipt, relayed: RelayedSegment
) -> market_pb2.UsageReceipt:
    """Verify the node's signature and that the receipt says what was relayed: every
    field exactly, except the output count of a cut-off segment (see the module doc)."""
    usage = check_node_signature(signed)
    expected = {
        "request_id": relayed.worker_request_id,
        "node_id": relayed.node_id,
        "model": relayed.model,
        "input_tokens": relayed.input_tokens,
        "output_tokens": relayed.output_tokens,
        "price_input_micro_usd_per_mtok": relayed.price_input_micro_usd_per_mtok,
        "price_output_micro_usd_per_mtok": relayed.price_output_micro_usd_per_mtok,
        "segment_index": relayed.segment_index,
        "lease_id": relayed.lease_id,
    }
    if relayed.cut_off:
        del expected["output_tokens"]
        _check_cut_off_output(usage, relayed)
    for field, want in expected.items():
        got = getattr(usage, field)
        if got != want:
            raise MiscountedReceipt(
                f"receipt {field} is {got!r} but the coordinator relayed {want!r} "
                f"(request {relayed.worker_request_id}, node {relayed.node_id})"
            )
    return usage


def _check_cut_off_output(usage: market_pb2.UsageReceipt, relayed: RelayedSegment) -> None:
    """A late receipt's output count: at least what the coordinator relayed (a node cannot
    have written fewer tokens than were received), at most what the node was asked for."""
    got, relayed_tokens = usage.output_tokens, relayed.output_tokens
    ceiling = relayed.output_tokens_max
    assert ceiling is not None
    if got < relayed_tokens:
        raise MiscountedReceipt(
            f"late receipt output_tokens is {got} but the coordinator relayed "
            f"{relayed_tokens}: a node cannot have sent fewer tokens than were received "
            f"(request {relayed.worker_request_id}, node {relayed.node_id})"
        )
    if got > ceiling:
        raise MiscountedReceipt(
            f"late receipt output_tokens is {got}, more than the {ceiling} the node was "
            f"asked for (request {relayed.worker_request_id}, node {relayed.node_id})"
        )


def same_receipt(a: market_pb2.SignedReceipt, b: market_pb2.SignedReceipt) -> bool:
    """Whether two signed receipts are the same node-signed receipt (the same bytes and
    node signature; countersignatures aside)."""
    return a.receipt == b.receipt and a.node_signature == b.node_signature


def countersign(
    signed: market_pb2.SignedReceipt, coordinator: Identity
) -> market_pb2.SignedReceipt:
    """A copy of ``signed`` with the coordinator's countersignature."""
    out = market_pb2.SignedReceipt()
    out.CopyFrom(signed)
    out.coordinator_public_key = coordinator.public_key
    out.coordinator_signature = coordinator.sign(
        COUNTERSIGN_DOMAIN, signed.receipt + signed.node_signature
    )
    return out


def verify_offline(
    signed: market_pb2.SignedReceipt,
    trusted_coordinator_keys: Iterable[bytes] | None = None,
) -> market_pb2.UsageReceipt:
    """Check a countersigned receipt with nothing but the public keys.

    Raises ForgedReceipt (or MalformedReceipt) when the node's signature, the
    coordinator's countersignature, or (when given) the coordinator's key does not hold.
    """
    usage = check_node_signature(signed)
    if not signed.coordinator_public_key or not signed.coordinator_signature:
        raise ForgedReceipt(f"receipt for {usage.request_id} is not countersigned")
    if trusted_coordinator_keys is not None and signed.coordinator_public_key not in set(
        trusted_coordinator_keys
    ):
        raise ForgedReceipt(
            f"receipt for {usage.request_id} is countersigned by an untrusted key "
            f"{signed.coordinator_public_key.hex()}"
        )
    if not verify(
        signed.coordinator_public_key,
        COUNTERSIGN_DOMAIN,
        signed.receipt + signed.node_signature,
        signed.coordinator_signature,
    ):
        raise ForgedReceipt(f"countersignature on the receipt for {usage.request_id} fails")
    return usage


def receipt_cost_micro_usd(usage: market_pb2.UsageReceipt) -> int:
    return token_cost_micro_usd(
        usage.input_tokens,
        usage.output_tokens,
        usage.price_input_micro_usd_per_mtok,
        usage.price_output_micro_usd_per_mtok,
    )


def sign_receipt(usage: market_pb2.UsageReceipt, node: Identity) -> market_pb2.SignedReceipt:
    """What a node does: serialize once and sign those bytes (used by nodes and tests)."""
    data = usage.SerializeToString(deterministic=True)
    return market_pb2.SignedReceipt(
        receipt=data,
        node_public_key=node.public_key,
        node_signature=node.sign(RECEIPT_DOMAIN, data),
    )
