"""Errors of the node daemon and the gRPC status each one becomes at the boundary.

::

    NodeError                      INTERNAL            a bug or an unexpected fault
    ├── RequestInvalid             INVALID_ARGUMENT    a request field is wrong; names the field
    │   └── ContextTooLong         OUT_OF_RANGE        prompt + max_tokens exceed this node's context
    ├── ModelNotServed             NOT_FOUND           the node does not offer that model
    ├── CapacityExhausted          RESOURCE_EXHAUSTED  max_concurrency requests already in flight
    ├── ModelStoreError            (start-up)          the model cannot be found or converted
    └── EngineError                UNAVAILABLE         the engine cannot serve
        ├── EngineStartError       (start-up)          the engine failed or timed out at start
        └── EngineDeadError        UNAVAILABLE         the engine died; the node must restart

The worker turns these into a status with :func:`status_of`. Messages are for a person:
they say what was wrong and what to change, and never carry secrets.
"""

from __future__ import annotations

import grpc


class NodeError(Exception):
    """Base of every node error; unexpected ones map to INTERNAL."""

    status_code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class RequestInvalid(NodeError):
    """A field of a generation request is invalid; the message starts with the field."""

    status_code = grpc.StatusCode.INVALID_ARGUMENT


class ContextTooLong(RequestInvalid):
    """The prompt plus max_tokens exceed this node's context length. OUT_OF_RANGE, not
    INVALID_ARGUMENT: the limit is this node's (its engine's ``max_model_len``), and the
    coordinator may try a node with a longer context."""

    status_code = grpc.StatusCode.OUT_OF_RANGE


class ModelNotServed(NodeError):
    """The request names a model this node does not offer."""

    status_code = grpc.StatusCode.NOT_FOUND


class CapacityExhausted(NodeError):
    """The node already runs ``max_concurrency`` requests."""

    status_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ShuttingDown(NodeError):
    """The node is stopping and takes no new request."""

    status_code = grpc.StatusCode.UNAVAILABLE


class ModelStoreError(NodeError):
    """The model is not packaged, not on disk, or its conversion failed."""


class EngineError(NodeError):
    """The inference engine cannot serve the request."""

    status_code = grpc.StatusCode.UNAVAILABLE


class EngineStartError(EngineError):
    """The engine failed to start, or did not finish starting within the time allowed."""


class EngineDeadError(EngineError):
    """The engine died while running; the node stops serving and must be restarted."""


def status_of(error: BaseException) -> grpc.StatusCode:
    """The gRPC status an error becomes at the boundary (INTERNAL for anything unknown)."""
    if isinstance(error, NodeError):
        return error.status_code
    return grpc.StatusCode.INTERNAL
