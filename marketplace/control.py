"""What a node and its coordinator agree on beyond the proto: metadata and limits.

``NodeControlService.Heartbeat`` carries the node's id and session token as metadata
(``NODE_ID_METADATA``, ``SESSION_METADATA``, from RegisterResponse). A coordinator's
calls to a node's worker (``NodeWorkerService.Generate`` and ``Session``) carry
``NODE_ID_METADATA`` too: the node id of the offer that named the worker's address, so a
worker serving another node refuses them (an offer cannot list another provider's
worker). A heartbeat carries at most ``LATE_RECEIPTS_PER_HEARTBEAT`` late receipts: the
node's agent sends no more, and the coordinator refuses a heartbeat with more.
"""

from __future__ import annotations

NODE_ID_METADATA = "x-mercato-node-id"
SESSION_METADATA = "x-mercato-session"
LATE_RECEIPTS_PER_HEARTBEAT = 64
