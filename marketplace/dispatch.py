"""The dispatch tag: how a node tells which of its open calls its coordinator sent.

A coordinator knows its own requests on a node exactly (it counts them as it dispatches
and finishes them); what it cannot see is the rest of the node's load (direct callers,
calls left from an earlier coordinator session). So it marks every worker call with a
tag derived from the node's session token (metadata ``x-mercato-dispatch``), the node
counts its open calls per tag, and each heartbeat reports how many of its open calls
carry the tag of the session it beats for (``NodeLoad.coordinator_requests``). The
coordinator then adds only the other load to its own count. Without this, a load report
sampled just before some of the coordinator's requests finished kept counting them
until the next heartbeat, and a node at its concurrency limit was refused as full for
up to a heartbeat interval.

The tag is a hash of the session token, so the token itself never travels on the worker
channel; it is not a secret (a forged tag only misreports the caller's own load).
"""

from __future__ import annotations

import hashlib

DISPATCH_METADATA = "x-mercato-dispatch"
_TAG_HEX_CHARS = 16


def dispatch_tag(session_token: str) -> str:
    """The tag of the session with this token: 16 hex characters of its SHA-256."""
    return hashlib.sha256(session_token.encode()).hexdigest()[:_TAG_HEX_CHARS]
