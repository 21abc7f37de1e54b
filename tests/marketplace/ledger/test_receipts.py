"""Receipt checks: signatures, relayed counts, countersignature, offline verification."""

from __future__ import annotations

import pytest
from mercato.v1 import market_pb2

from marketplace.identity import Identity
from marketplace.ledger.errors import ForgedReceipt, MalformedReceipt, MiscountedReceipt
from marketplace.ledger.receipts import (
    check_receipt,
    countersign,
    verify_offline,
)
from tests.marketplace.ledger.conftest import receipt_for

NODE = Identity.from_seed(b"n" * 32)
OTHER = Identity.from_seed(b"o" * 32)
COORDINATOR = Identity.from_seed(b"c" * 32)


def test_good_receipt_passes_and_countersignature_verifies_offline() -> None:
    signed, relayed = receipt_for(NODE, "r1#0", 10, 20)
    usage = check_receipt(signed, relayed)
    assert usage.output_tokens == 20
    out = countersign(signed, COORDINATOR)
    assert verify_offline(out, [COORDINATOR.public_key]).request_id == "r1#0"


def test_altered_receipt_bytes_are_forged() -> None:
    signed, relayed = receipt_for(NODE, "r1#0", 10, 20)
    usage = market_pb2.UsageReceipt.FromString(signed.receipt)
    usage.output_tokens = 2000
    signed.receipt = usage.SerializeToString()
    with pytest.raises(ForgedReceipt):
        check_receipt(signed, relayed)


def test_signature_by_another_key_is_forged() -> None:
    signed, relayed = receipt_for(NODE, "r1#0", 10, 20)
    signed.node_signature = OTHER.sign("mercato.v1.UsageReceipt", signed.receipt)
    with pytest.raises(ForgedReceipt):
        check_receipt(signed, relayed)
    signed2, _ = receipt_for(NODE, "r1#0", 10, 20)
    signed2.node_public_key = OTHER.public_key  # key does not match the node id
    with pytest.raises(ForgedReceipt):
        check_receipt(signed2, relayed)


@pytest.mark.parametrize(
    "field,value",
    [
        ("input_tokens", 11),
        ("output_tokens", 19),
        ("price_output_micro_usd_per_mtok", 1),
        ("model", "other"),
        ("worker_request_id", "r2#0"),
        ("segment_index", 1),
    ],
)
def test_receipt_that_differs_from_relayed_is_miscounted(field: str, value: object) -> None:
    signed, relayed = receipt_for(NODE, "r1#0", 10, 20)
    from dataclasses import replace

    with pytest.raises(MiscountedReceipt):
        check_receipt(signed, replace(relayed, **{field: value}))


def test_garbage_is_malformed() -> None:
    _, relayed = receipt_for(NODE, "r1#0", 10, 20)
    bad = market_pb2.SignedReceipt(receipt=b"\xff\xff\xff", node_public_key=NODE.public_key)
    with pytest.raises(MalformedReceipt):
        check_receipt(bad, relayed)


def test_offline_refuses_missing_or_untrusted_countersignature() -> None:
    signed, _ = receipt_for(NODE, "r1#0", 10, 20)
    with pytest.raises(ForgedReceipt, match="not countersigned"):
        verify_offline(signed)
    out = countersign(signed, COORDINATOR)
    with pytest.raises(ForgedReceipt, match="untrusted"):
        verify_offline(out, [OTHER.public_key])
    out.coordinator_signature = bytes(64)
    with pytest.raises(ForgedReceipt):
        verify_offline(out)


def test_completed_segment_counts_must_match_exactly() -> None:
    """A receipt from a node's final may not count more output than was relayed."""
    signed, relayed = receipt_for(NODE, "r1#0", 10, 20)
    from dataclasses import replace

    with pytest.raises(
        MiscountedReceipt, match="output_tokens is 20 but the coordinator relayed 18"
    ):
        check_receipt(signed, replace(relayed, output_tokens=18))


@pytest.mark.parametrize(
    ("relayed_tokens", "ceiling", "ok"),
    [
        (20, 20, True),  # all that was written was relayed
        (17, 32, True),  # 3 tokens were in flight when the call was cut
        (21, 32, False),  # the node cannot have written fewer than were received
        (10, 19, False),  # more than the node was asked for
    ],
)
def test_cut_off_segment_accepts_a_late_count_between_relayed_and_asked(
    relayed_tokens: int, ceiling: int, ok: bool
) -> None:
    signed, relayed = receipt_for(NODE, "r1#0", 10, 20)  # the node counts 20 output tokens
    from dataclasses import replace

    cut = replace(relayed, output_tokens=relayed_tokens, output_tokens_max=ceiling)
    assert cut.cut_off and not relayed.cut_off
    if ok:
        assert check_receipt(signed, cut).output_tokens == 20
    else:
        with pytest.raises(MiscountedReceipt, match="late receipt output_tokens is 20"):
            check_receipt(signed, cut)


def test_cut_off_segment_checks_every_other_field_exactly() -> None:
    signed, relayed = receipt_for(NODE, "r1#0", 10, 20)
    from dataclasses import replace

    with pytest.raises(MiscountedReceipt, match="input_tokens"):
        check_receipt(
            signed, replace(relayed, output_tokens=5, output_tokens_max=64, input_tokens=9)
        )


def test_receipt_signed_by_another_node_in_its_own_name_is_forged() -> None:
    """A receipt naming NODE but signed (validly) by OTHER with OTHER's key: the key must
    belong to the node the receipt names, not merely verify its own signature."""
    signed, relayed = receipt_for(NODE, "r1#0", 10, 20)
    signed.node_public_key = OTHER.public_key
    signed.node_signature = OTHER.sign("mercato.v1.UsageReceipt", signed.receipt)
    with pytest.raises(ForgedReceipt, match="signed with the key of"):
        check_receipt(signed, relayed)
