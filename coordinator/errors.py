"""Errors of the coordinator and the gRPC status each one becomes at the boundary.

::

    CoordinatorError                 INTERNAL            a bug or an unexpected fault
    ├── RequestInvalid               INVALID_ARGUMENT    a request field is wrong; names the field
    ├── ModelNotFound                NOT_FOUND           no node has ever offered the model
    ├── LeaseNotFound                NOT_FOUND           the lease does not exist
    ├── NoNodeAvailable              UNAVAILABLE         nothing can serve it now; retry later
    ├── NodeFailed                   UNAVAILABLE         the serving node failed (after retries)
    │   └── NodeRejected             (node's code)       every node refused with the same code
    ├── DeadlineExceeded             DEADLINE_EXCEEDED   the client's deadline passed
    ├── OfferInvalid                 INVALID_ARGUMENT    a node's offer breaks a rule; names it
    │   └── OfferSignatureInvalid    UNAUTHENTICATED     the offer's signature does not verify
    ├── HeartbeatInvalid             INVALID_ARGUMENT    a heartbeat field breaks a rule
    ├── CapacityExhausted            RESOURCE_EXHAUSTED  the registry is full
    └── SessionInvalid               UNAUTHENTICATED     unknown node id or wrong session token

Code raises these; servicers turn them into a status with :func:`abort_with`. Messages
are for a person: they say what was wrong and what to change. They never carry secrets.
"""

from __future__ import annotations

from typing import NoReturn

import grpc
import grpc.aio


class CoordinatorError(Exception):
    """Base of every coordinator error; unexpected ones map to INTERNAL."""

    status_code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class RequestInvalid(CoordinatorError):
    """A field of a client's request is invalid; the message starts with the field."""

    status_code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(CoordinatorError):
    """The model was never offered by any node this coordinator knows."""

    status_code = grpc.StatusCode.NOT_FOUND


class LeaseNotFound(CoordinatorError):
    """The dedicated lease named by the request does not exist."""

    status_code = grpc.StatusCode.NOT_FOUND


class NoNodeAvailable(CoordinatorError):
    """The model is known but no live node that meets the request can serve it now."""

    status_code = grpc.StatusCode.UNAVAILABLE


class NodeFailed(CoordinatorError):
    """The node serving the request failed, and no other node could take over."""

    status_code = grpc.StatusCode.UNAVAILABLE


class NodeRejected(NodeFailed):
    """Every node tried refused the request with the same status (e.g. INVALID_ARGUMENT)."""

    def __init__(self, message: str, status_code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.status_code = status_code


class DeadlineExceeded(CoordinatorError):
    """The client's deadline passed before the work finished."""

    status_code = grpc.StatusCode.DEADLINE_EXCEEDED


class OfferInvalid(CoordinatorError):
    """A node's signed offer breaks a rule; the message names the field."""

    status_code = grpc.StatusCode.INVALID_ARGUMENT


class OfferSignatureInvalid(OfferInvalid):
    """The offer's signature is not its node key's signature over the offer bytes."""

    status_code = grpc.StatusCode.UNAUTHENTICATED


class HeartbeatInvalid(CoordinatorError):
    """A heartbeat breaks a rule (sequence not increasing, load out of range)."""

    status_code = grpc.StatusCode.INVALID_ARGUMENT


class CapacityExhausted(CoordinatorError):
    """The registry holds as many nodes as it may."""

    status_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ShuttingDown(CoordinatorError):
    """The coordinator is stopping: it takes no new request, and cuts off the ones still
    streaming when its shutdown grace is over."""

    status_code = grpc.StatusCode.UNAVAILABLE


class SessionInvalid(CoordinatorError):
    """A heartbeat stream presented an unknown node id or a wrong session token."""

    status_code = grpc.StatusCode.UNAUTHENTICATED


async def abort_with(context: grpc.aio.ServicerContext, error: CoordinatorError) -> NoReturn:
    """End the call with ``error``'s status code and message (raises, never returns)."""
    await context.abort(error.status_code, str(error))
    raise AssertionError("context.abort returned")  # pragma: no cover
