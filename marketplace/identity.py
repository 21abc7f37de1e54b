"""Ed25519 identities: key files, signatures with domain separation, node ids.

A node's identity is its Ed25519 public key. Its id is the libp2p peer id of that key
(``12D3KooW...``: the identity multihash of the protobuf-encoded public key, base58btc),
so the node id, the libp2p peer id and the key are one thing.

Every signature covers ``domain + b"\\x00" + message`` where ``domain`` names what is
signed (``mercato.v1.NodeOffer`` ...), so a signature over one kind of message can never
be replayed as another.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
KEY_FILE_MODE = 0o600

_BASE58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


class IdentityError(Exception):
    """A key file or a public key cannot be used."""


def _base58(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    out = []
    while number:
        number, rem = divmod(number, 58)
        out.append(_BASE58_ALPHABET[rem])
    leading_zeros = len(data) - len(data.lstrip(b"\x00"))
    return "1" * leading_zeros + "".join(reversed(out))


def node_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer id of a raw Ed25519 public key."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise IdentityError(
            f"an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}"
        )
    # libp2p crypto.pb PublicKey{Type: Ed25519 (1), Data: key}, then an identity multihash.
    encoded = b"\x08\x01\x12\x20" + public_key
    return _base58(b"\x00" + bytes([len(encoded)]) + encoded)


def _signed_bytes(domain: str, message: bytes) -> bytes:
    return domain.encode() + b"\x00" + message


def verify(public_key: bytes, domain: str, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s signature of ``message`` in ``domain``."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(
            signature, _signed_bytes(domain, message)
        )
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """An Ed25519 key pair."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """A deterministic key from a 32-byte seed (tests and simulations)."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        """Load the key at ``path``, or create it there (mode 0600) on first use."""
        if path.exists():
            return cls.load(path)
        identity = cls.generate()
        identity.save(path)
        return identity

    @classmethod
    def load(cls, path: Path) -> Identity:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise IdentityError(
                f"key file {path} is readable by others (mode {mode:o}); run: chmod 600 {path}"
            )
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except ValueError as exc:
            raise IdentityError(f"key file {path} is not a PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"key file {path} does not hold an Ed25519 key")
        return cls(key)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def node_id(self) -> str:
        return node_id_from_public_key(self.public_key)

    def sign(self, domain: str, message: bytes) -> bytes:
        return self.private_key.sign(_signed_bytes(domain, message))
