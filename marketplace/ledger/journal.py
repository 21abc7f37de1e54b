"""The hash chain of the journal.

Entry ``n`` stores ``prev_hash`` (entry ``n-1``'s hash; 32 zero bytes before the first)
and ``hash = SHA-256(prev_hash || canonical(entry))``. The canonical encoding is the
fields below, in this order, as UTF-8 text joined by newlines (no field may contain a
newline: ids are checked, numbers are decimal, absent values are empty). Altering,
removing, reordering or inserting any entry changes every later hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from hashlib import sha256
from typing import Any

GENESIS_HASH = bytes(32)

CHAINED_FIELDS = (
    "seq",
    "id",
    "kind",
    "phase",
    "debit_account_id",
    "credit_account_id",
    "amount",
    "pending_id",
    "request_id",
    "expires_at_unix_ms",
    "created_at_unix_ms",
)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def canonical(entry: Mapping[str, Any]) -> bytes:
    """The fields of CHAINED_FIELDS, in order, joined by newlines, UTF-8."""
    return (
        f"{entry['seq']}\n{entry['id']}\n{entry['kind']}\n{entry['phase']}\n"
        f"{entry['debit_account_id']}\n{entry['credit_account_id']}\n{entry['amount']}\n"
        f"{_text(entry['pending_id'])}\n{_text(entry['request_id'])}\n"
        f"{_text(entry['expires_at_unix_ms'])}\n{entry['created_at_unix_ms']}"
    ).encode()


def entry_hash(prev_hash: bytes, entry: Mapping[str, Any]) -> bytes:
    return hashlib.sha256(prev_hash + canonical(entry)).digest()


def row_hash(prev_hash: bytes, row: Sequence[Any]) -> bytes:
    """``entry_hash`` of an entry given as a row in the column order of ``transfers``
    (``seq, id, kind, phase, debit, credit, amount, pending_id, request_id, expires_at,
    created_at, ...``): the writer's hot path, without building a mapping."""
    pending_id = row[7]
    request_id = row[8]
    expires = row[9]
    return sha256(
        prev_hash
        + (
            f"{row[0]}\n{row[1]}\n{row[2]}\n{row[3]}\n{row[4]}\n{row[5]}\n{row[6]}\n"
            f"{'' if pending_id is None else pending_id}\n"
            f"{'' if request_id is None else request_id}\n"
            f"{'' if expires is None else expires}\n{row[10]}"
        ).encode()
    ).digest()
