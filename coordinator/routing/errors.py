"""Errors raised by the routing package.

Hierarchy (drawn once, here)::

    RoutingError                      base of everything this package raises
    ├── InvalidListingError           a node listing breaks a rule (ValueError)
    └── InvalidRoutingRequestError    a request descriptor breaks a rule (ValueError)

Routing itself never raises for "nothing can serve this": :func:`route` returns a
decision with no candidates and an :class:`~coordinator.routing.EmptyReason` naming
the constraint that emptied the list; the server turns that into UNAVAILABLE (or
NOT_FOUND for an unknown model). Observations about nodes that are no longer in the
market (a race with a node leaving) are ignored, not raised.
"""

from __future__ import annotations

__all__ = ["InvalidListingError", "InvalidRoutingRequestError", "RoutingError"]


class RoutingError(Exception):
    """Base of the routing package's errors."""


class InvalidListingError(RoutingError, ValueError):
    """A node listing (offer terms) breaks a rule; the message names the field."""


class InvalidRoutingRequestError(RoutingError, ValueError):
    """A routing request descriptor breaks a rule; the message names the field."""
