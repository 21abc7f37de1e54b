"""The signed offer: it verifies over its exact bytes, and any tampering fails."""

from __future__ import annotations

from pathlib import Path

import pytest
from mercato.v1 import market_pb2

from marketplace.identity import Identity, verify
from node.hardware import HardwareInfo
from node.offer import OFFER_DOMAIN, build_offer, sign_offer
from node.settings import NodeSettings

HARDWARE = HardwareInfo(cpu_cores=2, memory_bytes=2**34, cpu_model="Example CPU")


def _offer(identity: Identity, tmp_path: Path, **overrides: object) -> market_pb2.NodeOffer:
    settings = NodeSettings(home=tmp_path, region="eu-west", **overrides)  # type: ignore[arg-type]
    return build_offer(
        settings,
        public_key=identity.public_key,
        worker_address="127.0.0.1:7701",
        hardware=HARDWARE,
        context_length=2048,
        sequence=7,
    )


def test_offer_carries_settings_and_verifies(tmp_path: Path) -> None:
    identity = Identity.generate()
    signed = sign_offer(identity, _offer(identity, tmp_path, price_output_micro_usd_per_mtok=9))
    assert verify(identity.public_key, OFFER_DOMAIN, signed.offer, signed.signature)
    offer = market_pb2.NodeOffer.FromString(signed.offer)
    assert offer.node_public_key == identity.public_key
    assert offer.region == "eu-west"
    assert offer.sequence == 7
    assert offer.max_concurrency == 64
    assert offer.price_micro_usd_per_gpu_hour == 400_000
    assert offer.hardware.accelerator == market_pb2.ACCELERATOR_KIND_CPU
    [model] = offer.models
    assert model.model == "SmolLM2-135M-Instruct"
    assert (model.price_input_micro_usd_per_mtok, model.price_output_micro_usd_per_mtok) == (
        50_000,
        9,
    )
    assert model.context_length == 2048
    assert offer.issued_at_unix_ms > 0


def test_tampered_offer_fails(tmp_path: Path) -> None:
    identity = Identity.generate()
    signed = sign_offer(identity, _offer(identity, tmp_path))
    offer = market_pb2.NodeOffer.FromString(signed.offer)
    offer.models[0].price_output_micro_usd_per_mtok = 1
    assert not verify(
        identity.public_key, OFFER_DOMAIN, offer.SerializeToString(), signed.signature
    )
    flipped = bytes([signed.signature[0] ^ 1]) + signed.signature[1:]
    assert not verify(identity.public_key, OFFER_DOMAIN, signed.offer, flipped)
    other = Identity.generate()
    assert not verify(other.public_key, OFFER_DOMAIN, signed.offer, signed.signature)
    # A receipt signature can never pass as an offer signature (domain separation).
    assert not verify(
        identity.public_key,
        OFFER_DOMAIN,
        signed.offer,
        identity.sign("mercato.v1.UsageReceipt", signed.offer),
    )


def test_signing_another_nodes_offer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="another key"):
        sign_offer(Identity.generate(), _offer(Identity.generate(), tmp_path))


def test_identity_key_file_is_private_and_stable(tmp_path: Path) -> None:
    settings = NodeSettings(home=tmp_path)
    assert settings.identity_path == tmp_path / "node" / "identity.key"
    first = Identity.load_or_create(settings.identity_path)
    assert settings.identity_path.stat().st_mode & 0o777 == 0o600
    assert Identity.load_or_create(settings.identity_path).node_id == first.node_id


def test_offer_takes_concurrency_and_lease_price_from_the_settings(tmp_path: Path) -> None:
    """max_concurrency and the per-GPU-hour price come from the settings, not defaults."""
    identity = Identity.generate()
    offer = _offer(identity, tmp_path, max_concurrency=3, price_micro_usd_per_gpu_hour=1234)
    assert (offer.max_concurrency, offer.price_micro_usd_per_gpu_hour) == (3, 1234)
