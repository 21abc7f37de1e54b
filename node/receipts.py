"""Usage receipts: what the node produced for one request, signed by the node's key.

The coordinator verifies the signature over the exact bytes in ``SignedReceipt.receipt``
and countersigns them; settlement bills from them.
"""

from __future__ import annotations

from mercato.v1 import market_pb2

from marketplace.identity import Identity

RECEIPT_DOMAIN = "mercato.v1.UsageReceipt"


def sign_receipt(identity: Identity, receipt: market_pb2.UsageReceipt) -> market_pb2.SignedReceipt:
    """The receipt's bytes with the node's signature (not yet countersigned)."""
    payload = receipt.SerializeToString(deterministic=True)
    return market_pb2.SignedReceipt(
        receipt=payload,
        node_public_key=identity.public_key,
        node_signature=identity.sign(RECEIPT_DOMAIN, payload),
    )
