"""The node's offer to the market: built from its settings and hardware, then signed.

The signature covers the exact serialized bytes carried in ``SignedOffer.offer``; a
verifier parses those bytes and never a re-encoding.
"""

from __future__ import annotations

import time

from mercato.v1 import market_pb2

from marketplace.identity import Identity
from node.hardware import HardwareInfo
from node.settings import NodeSettings

OFFER_DOMAIN = "mercato.v1.NodeOffer"


def build_offer(
    settings: NodeSettings,
    *,
    public_key: bytes,
    worker_address: str,
    hardware: HardwareInfo,
    context_length: int,
    sequence: int,
    issued_at_unix_ms: int | None = None,
) -> market_pb2.NodeOffer:
    """The offer of a node serving ``settings.model`` at the configured prices."""
    return market_pb2.NodeOffer(
        node_public_key=public_key,
        worker_address=worker_address,
        models=[
            market_pb2.ModelOffer(
                model=settings.model,
                price_input_micro_usd_per_mtok=settings.price_input_micro_usd_per_mtok,
                price_output_micro_usd_per_mtok=settings.price_output_micro_usd_per_mtok,
                context_length=context_length,
            )
        ],
        region=settings.region,
        hardware=hardware.to_proto(),
        max_concurrency=settings.max_concurrency,
        price_micro_usd_per_gpu_hour=settings.price_micro_usd_per_gpu_hour,
        issued_at_unix_ms=int(time.time() * 1000)
        if issued_at_unix_ms is None
        else issued_at_unix_ms,
        sequence=sequence,
    )


def sign_offer(identity: Identity, offer: market_pb2.NodeOffer) -> market_pb2.SignedOffer:
    """The offer's bytes with the node's signature over them."""
    if offer.node_public_key != identity.public_key:
        raise ValueError("the offer names another key than the identity signing it")
    payload = offer.SerializeToString(deterministic=True)
    return market_pb2.SignedOffer(offer=payload, signature=identity.sign(OFFER_DOMAIN, payload))
