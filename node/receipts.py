"""Usage receipts: what the node produced for one request, signed by the node's key.

The coordinator verifies the signature over the exact bytes in ``SignedReceipt.receipt``
and countersigns them; settlement bills from them.

A receipt normally travels in the worker call's ``WorkerFinal``. A call the coordinator
cuts off after output went out (its client cancelled, or the deadline passed) has no
final, so the worker hands that receipt to a :class:`ReceiptOutbox`, and the agent sends
it on the heartbeat stream (``HeartbeatRequest.late_receipts``) at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Iterable

from mercato.v1 import market_pb2

from marketplace.identity import Identity

logger = logging.getLogger(__name__)

RECEIPT_DOMAIN = "mercato.v1.UsageReceipt"
OUTBOX_RECEIPTS_MAX = 4096


def sign_receipt(identity: Identity, receipt: market_pb2.UsageReceipt) -> market_pb2.SignedReceipt:
    """The receipt's bytes with the node's signature (not yet countersigned)."""
    payload = receipt.SerializeToString(deterministic=True)
    return market_pb2.SignedReceipt(
        receipt=payload,
        node_public_key=identity.public_key,
        node_signature=identity.sign(RECEIPT_DOMAIN, payload),
    )


class ReceiptOutbox:
    """Late receipts waiting for the heartbeat stream, oldest first.

    ``put`` never blocks (the worker calls it while its handler is being cancelled); the
    box is bounded, and when full the oldest receipt is dropped, with a warning. The
    agent takes receipts for a heartbeat and puts back those the coordinator did not
    acknowledge before their stream ended, so a receipt is lost only when the box
    overflows or is closed (the node stops: the coordinator connection is gone for good).
    """

    def __init__(self, max_receipts: int = OUTBOX_RECEIPTS_MAX) -> None:
        self._receipts: collections.deque[market_pb2.SignedReceipt] = collections.deque()
        self._max_receipts = max_receipts
        self._ready = asyncio.Event()
        self._closed = False
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._receipts)

    def put(self, signed: market_pb2.SignedReceipt) -> None:
        """Queue a receipt for the next heartbeat."""
        if self._closed:
            self._drop(1, "the node is stopping")
            return
        self._receipts.append(signed)
        self._trim()
        self._ready.set()

    def take(self, limit: int) -> list[market_pb2.SignedReceipt]:
        """Up to ``limit`` receipts, oldest first, removed from the box."""
        taken = [self._receipts.popleft() for _ in range(min(limit, len(self._receipts)))]
        if not self._receipts:
            self._ready.clear()
        return taken

    def put_back(self, receipts: Iterable[market_pb2.SignedReceipt]) -> None:
        """Return receipts that were taken but not acknowledged, ahead of newer ones."""
        receipts = list(receipts)
        if not receipts:
            return
        if self._closed:
            self._drop(len(receipts), "the node is stopping")
            return
        self._receipts.extendleft(reversed(receipts))
        self._trim()
        self._ready.set()

    async def wait(self) -> None:
        """Return once the box holds a receipt."""
        await self._ready.wait()

    def close(self, reason: str) -> None:
        """Drop what is left (logged with ``reason``) and every receipt put later."""
        self._closed = True
        if self._receipts:
            count = len(self._receipts)
            self._receipts.clear()
            self._ready.clear()
            self._drop(count, reason)

    def _trim(self) -> None:
        overflow = len(self._receipts) - self._max_receipts
        if overflow > 0:
            for _ in range(overflow):
                self._receipts.popleft()
            self._drop(overflow, f"more than {self._max_receipts} were waiting")

    def _drop(self, count: int, reason: str) -> None:
        self.dropped += count
        logger.warning(
            "dropped %d late usage receipt(s) not delivered to the coordinator (%s): that "
            "cut-off work is not billed",
            count,
            reason,
        )
