"""Identifiers the ledger accepts, and how it makes new ones.

Ids are 1..128 characters of ``[A-Za-z0-9._:#-]`` (request ids, transfer ids, lease ids,
account ids). Transfer ids the ledger derives itself are ``<kind>:<request id>`` and the
like, so a retry of the same operation always produces the same id (idempotence).
"""

from __future__ import annotations

import re
import secrets

from marketplace.ledger.errors import InvalidIdentifier

ID_PATTERN = re.compile(r"^[A-Za-z0-9._:#-]{1,128}$")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")


def check_id(value: str, what: str = "id") -> str:
    """``value`` if it is a valid id, else InvalidIdentifier naming ``what``."""
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise InvalidIdentifier(
            f"{what} must be 1..128 characters of A-Z a-z 0-9 . _ : # -, got {value!r}"
        )
    return value


def check_name(value: str, what: str = "name") -> str:
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise InvalidIdentifier(
            f"{what} must be 1..64 characters of A-Z a-z 0-9 . _ @ -, got {value!r}"
        )
    return value


def new_id(prefix: str) -> str:
    """A fresh random id such as ``acct_3f9a0c1b7e2d4a56``."""
    return f"{prefix}_{secrets.token_hex(8)}"
