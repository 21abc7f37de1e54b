"""Verification of a node's SignedOffer: parse, check the signature, then every field.

A node is a stranger until its offer passes here. The signature covers the exact bytes
the node sent (never a re-encoding); every claim is then checked against strict bounds
so that nothing a node announces can break routing, billing or the relay.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from mercato.v1 import market_pb2

from coordinator.errors import OfferInvalid, OfferSignatureInvalid
from marketplace.identity import PUBLIC_KEY_BYTES, node_id_from_public_key, verify

OFFER_DOMAIN = "mercato.v1.NodeOffer"
OFFER_BYTES_MAX = 64 * 1024
MODELS_MAX = 16
CONCURRENCY_MAX = 4096
# One million USD per million tokens (or per GPU-hour): far above any real price.
PRICE_MICRO_USD_MAX = 10**12
CONTEXT_LENGTH_MAX = 16 * 1024 * 1024
GPUS_MAX = 64
GPU_MEMORY_BYTES_MAX = 2**44  # 16 TiB
CPU_CORES_MAX = 65_536
MEMORY_BYTES_MAX = 2**50  # 1 PiB
TEXT_FIELD_CHARS_MAX = 256

REGION_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127}$")
_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True, slots=True)
class ModelTerms:
    """One model a node serves and its serverless prices."""

    model: str
    price_input_micro_usd_per_mtok: int
    price_output_micro_usd_per_mtok: int
    context_length: int


@dataclass(frozen=True, slots=True)
class VerifiedOffer:
    """An offer whose signature and fields passed every check."""

    node_id: str
    node_public_key: bytes
    worker_address: str
    region: str
    models: tuple[ModelTerms, ...]
    max_concurrency: int
    price_micro_usd_per_gpu_hour: int
    accelerator: int  # market_pb2.AcceleratorKind
    gpu_count: int
    issued_at_unix_ms: int
    sequence: int
    offer_bytes: bytes
    signature: bytes

    def terms_for(self, model: str) -> ModelTerms | None:
        for terms in self.models:
            if terms.model == model:
                return terms
        return None


def verify_offer(
    signed: market_pb2.SignedOffer, *, now_unix_ms: int, max_age_s: int
) -> VerifiedOffer:
    """Check ``signed`` and return what it says; raise OfferInvalid naming the broken rule."""
    raw = signed.offer
    if not raw:
        raise OfferInvalid("offer: empty; send the serialized NodeOffer in SignedOffer.offer")
    if len(raw) > OFFER_BYTES_MAX:
        raise OfferInvalid(f"offer: {len(raw)} bytes, more than {OFFER_BYTES_MAX}")
    offer = market_pb2.NodeOffer()
    try:
        offer.ParseFromString(raw)
    except DecodeError as exc:
        raise OfferInvalid(f"offer: not a serialized NodeOffer ({exc})") from exc
    public_key = offer.node_public_key
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise OfferInvalid(
            f"node_public_key: {len(public_key)} bytes; a raw Ed25519 key has {PUBLIC_KEY_BYTES}"
        )
    if not verify(public_key, OFFER_DOMAIN, raw, signed.signature):
        raise OfferSignatureInvalid(
            f"signature: not node_public_key's Ed25519 signature over "
            f'"{OFFER_DOMAIN}\\x00" + offer bytes'
        )
    _check_issued_at(offer.issued_at_unix_ms, now_unix_ms, max_age_s)
    if not REGION_PATTERN.fullmatch(offer.region):
        raise OfferInvalid(
            f"region: {offer.region[:40]!r} must match {REGION_PATTERN.pattern} "
            "(lowercase letters, digits, '-'; at most 32)"
        )
    models = _check_models(offer)
    worker_address = _check_worker_address(offer.worker_address)
    if not 1 <= offer.max_concurrency <= CONCURRENCY_MAX:
        raise OfferInvalid(
            f"max_concurrency: {offer.max_concurrency} is outside 1..{CONCURRENCY_MAX}"
        )
    _check_price("price_micro_usd_per_gpu_hour", offer.price_micro_usd_per_gpu_hour)
    _check_hardware(offer)
    return VerifiedOffer(
        node_id=node_id_from_public_key(public_key),
        node_public_key=bytes(public_key),
        worker_address=worker_address,
        region=offer.region,
        models=models,
        max_concurrency=offer.max_concurrency,
        price_micro_usd_per_gpu_hour=offer.price_micro_usd_per_gpu_hour,
        accelerator=offer.hardware.accelerator,
        gpu_count=len(offer.hardware.gpus),
        issued_at_unix_ms=offer.issued_at_unix_ms,
        sequence=offer.sequence,
        offer_bytes=bytes(raw),
        signature=bytes(signed.signature),
    )


def _check_issued_at(issued_at_unix_ms: int, now_unix_ms: int, max_age_s: int) -> None:
    skew_ms = now_unix_ms - issued_at_unix_ms
    if abs(skew_ms) > max_age_s * 1000:
        direction = "old" if skew_ms > 0 else "in the future"
        raise OfferInvalid(
            f"issued_at_unix_ms: {issued_at_unix_ms} is {abs(skew_ms) / 1000:.1f} s {direction}; "
            f"offers must be signed within {max_age_s} s of the coordinator's clock "
            "(sign a fresh offer; check the node's clock)"
        )


def _check_price(field: str, value: int) -> None:
    if value > PRICE_MICRO_USD_MAX:
        raise OfferInvalid(f"{field}: {value} is above the limit {PRICE_MICRO_USD_MAX}")


def _check_models(offer: market_pb2.NodeOffer) -> tuple[ModelTerms, ...]:
    if not 1 <= len(offer.models) <= MODELS_MAX:
        raise OfferInvalid(f"models: {len(offer.models)} entries; offer 1..{MODELS_MAX} models")
    seen: set[str] = set()
    terms: list[ModelTerms] = []
    for index, model in enumerate(offer.models):
        where = f"models[{index}]"
        if not MODEL_NAME_PATTERN.fullmatch(model.model):
            raise OfferInvalid(
                f"{where}.model: {model.model[:40]!r} must be 1..128 characters of "
                "letters, digits and ._:/+- starting with a letter or digit"
            )
        if model.model in seen:
            raise OfferInvalid(f"{where}.model: {model.model!r} is offered twice")
        seen.add(model.model)
        _check_price(
            f"{where}.price_input_micro_usd_per_mtok", model.price_input_micro_usd_per_mtok
        )
        _check_price(
            f"{where}.price_output_micro_usd_per_mtok", model.price_output_micro_usd_per_mtok
        )
        if not 1 <= model.context_length <= CONTEXT_LENGTH_MAX:
            raise OfferInvalid(
                f"{where}.context_length: {model.context_length} is outside 1..{CONTEXT_LENGTH_MAX}"
            )
        terms.append(
            ModelTerms(
                model=model.model,
                price_input_micro_usd_per_mtok=model.price_input_micro_usd_per_mtok,
                price_output_micro_usd_per_mtok=model.price_output_micro_usd_per_mtok,
                context_length=model.context_length,
            )
        )
    return tuple(terms)


def _check_worker_address(address: str) -> str:
    """``host:port`` with a DNS name, an IPv4 address or a bracketed IPv6 address."""
    problem = f"worker_address: {address[:80]!r} must be host:port (e.g. 10.0.0.5:7800)"
    host, sep, port_text = address.rpartition(":")
    if (
        not sep
        or not host
        or not (port_text.isascii() and port_text.isdigit())
        or len(port_text) > 5
    ):
        raise OfferInvalid(problem)
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise OfferInvalid(f"worker_address: port {port} is outside 1..65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(host[1:-1])
        except ValueError as exc:
            raise OfferInvalid(problem) from exc
    else:
        try:
            ip = ipaddress.IPv4Address(host)
        except ValueError:
            if len(host) > 253 or not all(_HOSTNAME_LABEL.fullmatch(p) for p in host.split(".")):
                raise OfferInvalid(problem) from None
            return address
    if ip.is_unspecified or ip.is_multicast:
        raise OfferInvalid(
            f"worker_address: {host} cannot be dialled; advertise the address the "
            "coordinator should connect to"
        )
    return address


def _check_hardware(offer: market_pb2.NodeOffer) -> None:
    if not offer.HasField("hardware"):
        raise OfferInvalid("hardware: missing; send the node's hardware probe")
    hardware = offer.hardware
    kind = hardware.accelerator
    if kind == market_pb2.ACCELERATOR_KIND_CPU:
        if hardware.gpus:
            raise OfferInvalid("hardware.gpus: a CPU node (accelerator CPU) lists no GPUs")
    elif kind == market_pb2.ACCELERATOR_KIND_NVIDIA_GPU:
        if not 1 <= len(hardware.gpus) <= GPUS_MAX:
            raise OfferInvalid(
                f"hardware.gpus: {len(hardware.gpus)} GPUs; a GPU node lists 1..{GPUS_MAX}"
            )
    else:
        raise OfferInvalid(f"hardware.accelerator: {kind} is not a known AcceleratorKind")
    for index, gpu in enumerate(hardware.gpus):
        if not 1 <= len(gpu.name) <= TEXT_FIELD_CHARS_MAX:
            raise OfferInvalid(f"hardware.gpus[{index}].name: 1..{TEXT_FIELD_CHARS_MAX} characters")
        if not 1 <= gpu.memory_bytes <= GPU_MEMORY_BYTES_MAX:
            raise OfferInvalid(
                f"hardware.gpus[{index}].memory_bytes: {gpu.memory_bytes} is outside "
                f"1..{GPU_MEMORY_BYTES_MAX}"
            )
    if not 1 <= hardware.cpu_cores <= CPU_CORES_MAX:
        raise OfferInvalid(
            f"hardware.cpu_cores: {hardware.cpu_cores} is outside 1..{CPU_CORES_MAX}"
        )
    if not 1 <= hardware.memory_bytes <= MEMORY_BYTES_MAX:
        raise OfferInvalid(
            f"hardware.memory_bytes: {hardware.memory_bytes} is outside 1..{MEMORY_BYTES_MAX}"
        )
    if len(hardware.cpu_model) > TEXT_FIELD_CHARS_MAX:
        raise OfferInvalid(f"hardware.cpu_model: more than {TEXT_FIELD_CHARS_MAX} characters")
