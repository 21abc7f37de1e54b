"""API key format and hashing.

A key is ``mk_<key id>_<secret>``: the id (16 hex digits) finds the row, the secret
(32 random bytes, base64url) is checked against its SHA-256, which is all the database
keeps. SHA-256 without salt or stretching is right here: the secret has 256 bits of
entropy, so there is nothing to brute-force. The full key is shown once, at creation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

from marketplace.ledger.errors import MalformedKey

KEY_PREFIX = "mk"
_KEY_PATTERN = re.compile(r"^mk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")


def new_key() -> tuple[str, str, str]:
    """``(key_id, full_key, secret_sha256_hex)`` of a fresh key."""
    key_id = secrets.token_hex(8)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    return key_id, f"{KEY_PREFIX}_{key_id}_{secret}", hash_secret(secret)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_key(key: str) -> tuple[str, str]:
    """``(key_id, secret)``; MalformedKey when ``key`` is not ``mk_<id>_<secret>``."""
    match = _KEY_PATTERN.match(key.strip()) if isinstance(key, str) else None
    if match is None:
        raise MalformedKey(
            "API key is malformed: expected 'mk_<id>_<secret>' as issued by "
            "'mercato keys issue' (send it as 'authorization: Bearer <key>')"
        )
    return match.group(1), match.group(2)


def secret_matches(secret: str, secret_sha256_hex: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), secret_sha256_hex)
