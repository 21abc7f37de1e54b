"""Verification of signed offers: signature over the exact bytes, freshness, every field."""

from __future__ import annotations

import pytest
from mercato.v1 import market_pb2

from coordinator.errors import OfferInvalid, OfferSignatureInvalid
from coordinator.offers import TEXT_FIELD_CHARS_MAX, verify_offer
from marketplace.identity import Identity

from .fakes import make_offer, now_unix_ms, sign_offer

MAX_AGE_S = 60


@pytest.fixture(scope="module")
def identity() -> Identity:
    return Identity.from_seed(bytes(range(32)))


def check(signed: market_pb2.SignedOffer):
    return verify_offer(signed, now_unix_ms=now_unix_ms(), max_age_s=MAX_AGE_S)


def test_good_offer_verifies(identity: Identity) -> None:
    offer = make_offer(identity, models=("a-model", "b/model:q4"), sequence=9)
    verified = check(sign_offer(identity, offer))
    assert verified.node_id == identity.node_id
    assert verified.node_public_key == identity.public_key
    assert verified.worker_address == "127.0.0.1:7800"
    assert [t.model for t in verified.models] == ["a-model", "b/model:q4"]
    assert verified.terms_for("a-model").price_output_micro_usd_per_mtok == 200_000
    assert verified.terms_for("missing") is None
    assert verified.sequence == 9
    assert verified.offer_bytes == offer.SerializeToString()


def test_signature_by_another_key_is_unauthenticated(identity: Identity) -> None:
    offer = make_offer(identity)
    other = Identity.generate()
    raw = offer.SerializeToString()
    signed = market_pb2.SignedOffer(offer=raw, signature=other.sign("mercato.v1.NodeOffer", raw))
    with pytest.raises(OfferSignatureInvalid, match=r"^signature"):
        check(signed)


def test_signature_in_another_domain_is_unauthenticated(identity: Identity) -> None:
    raw = make_offer(identity).SerializeToString()
    signed = market_pb2.SignedOffer(
        offer=raw, signature=identity.sign("mercato.v1.UsageReceipt", raw)
    )
    with pytest.raises(OfferSignatureInvalid):
        check(signed)


def test_tampered_bytes_are_unauthenticated(identity: Identity) -> None:
    signed = sign_offer(identity, make_offer(identity, price_output=200_000))
    tampered = market_pb2.NodeOffer.FromString(signed.offer)
    tampered.models[0].price_output_micro_usd_per_mtok = 1
    signed.offer = tampered.SerializeToString()
    with pytest.raises(OfferSignatureInvalid):
        check(signed)


def test_appended_unknown_field_breaks_the_signature(identity: Identity) -> None:
    signed = sign_offer(identity, make_offer(identity))
    signed.offer = signed.offer + b"\xf8\x07\x01"  # field 127, varint 1
    with pytest.raises(OfferSignatureInvalid):
        check(signed)


@pytest.mark.parametrize("skew_s", [-3600, -61, 61, 3600])
def test_stale_or_future_offer_is_refused(identity: Identity, skew_s: int) -> None:
    offer = make_offer(identity, issued_at_unix_ms=now_unix_ms() - skew_s * 1000)
    with pytest.raises(OfferInvalid, match=r"^issued_at_unix_ms"):
        check(sign_offer(identity, offer))


def test_not_a_node_offer(identity: Identity) -> None:
    with pytest.raises(OfferInvalid, match=r"^offer"):
        check(market_pb2.SignedOffer(offer=b"\xff\xff\xff", signature=bytes(64)))
    with pytest.raises(OfferInvalid, match=r"^offer"):
        check(market_pb2.SignedOffer())


def test_short_public_key(identity: Identity) -> None:
    offer = make_offer(identity)
    offer.node_public_key = b"\x01" * 31
    with pytest.raises(OfferInvalid, match=r"^node_public_key"):
        check(sign_offer(identity, offer))


@pytest.mark.parametrize(
    "region", ["", "EU", "eu_west", "-eu", "eu west", "a" * 33, "eu-west\n", "é"]
)
def test_bad_region(identity: Identity, region: str) -> None:
    offer = make_offer(identity, region=region)
    with pytest.raises(OfferInvalid, match=r"^region"):
        check(sign_offer(identity, offer))


@pytest.mark.parametrize("region", ["eu-west", "a", "1", "us-east-2", "a" * 32])
def test_good_region(identity: Identity, region: str) -> None:
    assert check(sign_offer(identity, make_offer(identity, region=region))).region == region


@pytest.mark.parametrize(
    "address",
    [
        "",
        "host",
        "host:",
        ":80",
        "host:0",
        "host:65536",
        "host:99999999",
        "host:-1",
        "0.0.0.0:80",
        "[::]:80",
        "[::1:80",
        "::1:80",
        "bad_host:80",
        "-bad.example:80",
        "a..b:80",
        "224.0.0.1:80",
        "host:80 ",
        "host:\u0668\u0660",
    ],
)
def test_bad_worker_address(identity: Identity, address: str) -> None:
    offer = make_offer(identity, worker_address=address)
    with pytest.raises(OfferInvalid, match=r"^worker_address"):
        check(sign_offer(identity, offer))


@pytest.mark.parametrize(
    "address", ["127.0.0.1:7800", "[::1]:7800", "node-1.example.com:443", "localhost:1"]
)
def test_good_worker_address(identity: Identity, address: str) -> None:
    assert (
        check(sign_offer(identity, make_offer(identity, worker_address=address))).worker_address
        == address
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [("price_input", 10**12 + 1), ("price_output", 2**63)],
)
def test_price_over_the_bound(identity: Identity, field: str, value: int) -> None:
    offer = make_offer(identity, **{field: value})
    with pytest.raises(OfferInvalid, match=r"^models\[0\]\.price_"):
        check(sign_offer(identity, offer))


def test_gpu_hour_price_over_the_bound(identity: Identity) -> None:
    offer = make_offer(identity)
    offer.price_micro_usd_per_gpu_hour = 10**13
    with pytest.raises(OfferInvalid, match=r"^price_micro_usd_per_gpu_hour"):
        check(sign_offer(identity, offer))


@pytest.mark.parametrize("models", [(), tuple(f"m{i}" for i in range(17)), ("a", "a")])
def test_bad_model_list(identity: Identity, models: tuple[str, ...]) -> None:
    offer = make_offer(identity, models=models)
    with pytest.raises(OfferInvalid, match=r"^models"):
        check(sign_offer(identity, offer))


@pytest.mark.parametrize("name", ["", "x" * 129, "-lead", "sp ace", "new\nline"])
def test_bad_model_name(identity: Identity, name: str) -> None:
    offer = make_offer(identity, models=(name,))
    with pytest.raises(OfferInvalid, match=r"^models\[0\]\.model"):
        check(sign_offer(identity, offer))


@pytest.mark.parametrize("context_length", [0, 16 * 1024 * 1024 + 1])
def test_bad_context_length(identity: Identity, context_length: int) -> None:
    offer = make_offer(identity, context_length=context_length)
    with pytest.raises(OfferInvalid, match=r"^models\[0\]\.context_length"):
        check(sign_offer(identity, offer))


@pytest.mark.parametrize("concurrency", [0, 4097])
def test_bad_max_concurrency(identity: Identity, concurrency: int) -> None:
    offer = make_offer(identity, max_concurrency=concurrency)
    with pytest.raises(OfferInvalid, match=r"^max_concurrency"):
        check(sign_offer(identity, offer))


def _hardware_cases():
    def no_hardware(o):
        o.ClearField("hardware")

    def cpu_with_gpu(o):
        o.hardware.gpus.add(name="H100", memory_bytes=80 * 2**30)

    def gpu_without_gpus(o):
        o.hardware.accelerator = market_pb2.ACCELERATOR_KIND_NVIDIA_GPU

    def unknown_kind(o):
        o.hardware.accelerator = 0

    def zero_cores(o):
        o.hardware.cpu_cores = 0

    def zero_memory(o):
        o.hardware.memory_bytes = 0

    def huge_gpu(o):
        o.hardware.accelerator = market_pb2.ACCELERATOR_KIND_NVIDIA_GPU
        o.hardware.gpus.add(name="H100", memory_bytes=2**50)

    def long_gpu_name(o):
        o.hardware.accelerator = market_pb2.ACCELERATOR_KIND_NVIDIA_GPU
        o.hardware.gpus.add(name="H" * (TEXT_FIELD_CHARS_MAX + 1), memory_bytes=2**30)

    def long_cpu_model(o):
        o.hardware.cpu_model = "x" * (TEXT_FIELD_CHARS_MAX + 1)

    return [
        no_hardware,
        cpu_with_gpu,
        gpu_without_gpus,
        unknown_kind,
        zero_cores,
        zero_memory,
        huge_gpu,
        long_gpu_name,
        long_cpu_model,
    ]


@pytest.mark.parametrize("change", _hardware_cases(), ids=lambda f: f.__name__)
def test_insane_hardware(identity: Identity, change) -> None:
    offer = make_offer(identity)
    change(offer)
    with pytest.raises(OfferInvalid, match=r"^hardware"):
        check(sign_offer(identity, offer))


def test_gpu_node_verifies(identity: Identity) -> None:
    offer = make_offer(identity)
    offer.hardware.accelerator = market_pb2.ACCELERATOR_KIND_NVIDIA_GPU
    offer.hardware.gpus.add(name="NVIDIA H100 80GB HBM3", memory_bytes=80 * 2**30)
    assert check(sign_offer(identity, offer)).gpu_count == 1
