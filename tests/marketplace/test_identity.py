"""Identities: key files, domain-separated signatures, node ids equal libp2p peer ids."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from marketplace.identity import Identity, IdentityError, node_id_from_public_key, verify


def test_key_file_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "node" / "identity.key"
    first = Identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load_or_create(path).public_key == first.public_key


@pytest.mark.parametrize("mode", [0o644, 0o640], ids=["others", "group"])
def test_key_file_readable_by_others_or_the_group_is_refused(tmp_path: Path, mode: int) -> None:
    """Any group or other permission bit on the key file is refused, not only 'other'."""
    path = tmp_path / "identity.key"
    Identity.generate().save(path)
    path.chmod(mode)
    with pytest.raises(IdentityError, match="chmod 600"):
        Identity.load(path)


def test_signature_is_bound_to_key_domain_and_message() -> None:
    alice, mallory = Identity.generate(), Identity.generate()
    signature = alice.sign("mercato.v1.NodeOffer", b"offer")
    assert verify(alice.public_key, "mercato.v1.NodeOffer", b"offer", signature)
    assert not verify(alice.public_key, "mercato.v1.UsageReceipt", b"offer", signature)
    assert not verify(alice.public_key, "mercato.v1.NodeOffer", b"offer!", signature)
    assert not verify(mallory.public_key, "mercato.v1.NodeOffer", b"offer", signature)
    assert not verify(alice.public_key, "mercato.v1.NodeOffer", b"offer", signature[:-1])


def test_node_id_is_the_libp2p_peer_id_of_the_same_key() -> None:
    from libp2p.crypto.ed25519 import Ed25519PrivateKey as Libp2pKey
    from libp2p.peer.id import ID

    identity = Identity.from_seed(bytes(range(32)))
    libp2p_key = Libp2pKey.from_bytes(bytes(range(32)))
    assert libp2p_key.get_public_key().to_bytes() == identity.public_key
    expected = ID.from_pubkey(libp2p_key.get_public_key()).to_base58()
    assert identity.node_id == expected
    assert identity.node_id.startswith("12D3KooW")


def test_public_key_of_wrong_size_is_refused() -> None:
    with pytest.raises(IdentityError, match="32 bytes"):
        node_id_from_public_key(b"short")


def test_domain_and_message_are_separated() -> None:
    """The signed bytes keep domain and message apart: ("mercato.v1.Node", b"Offer") and
    ("mercato.v1.NodeOffer", b"") must not be the same signed text."""
    alice = Identity.generate()
    signature = alice.sign("mercato.v1.Node", b"Offer")
    assert not verify(alice.public_key, "mercato.v1.NodeOffer", b"", signature)
