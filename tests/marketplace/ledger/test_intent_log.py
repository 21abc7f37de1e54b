"""The intent log keeps every complete record and drops a corrupted tail."""

from __future__ import annotations

from pathlib import Path

from marketplace.ledger.intent_log import IntentLog, read_segments
from marketplace.ledger.operations import Settle, SettleSegment


def _settle(request_id: str) -> Settle:
    segment = SettleSegment(
        f"{request_id}#0", 0, "node", "m", 1, 2, 3, b"r", b"k", b"s", b"ck", b"cs"
    )
    return Settle(request_id, "acct", "m", 1000, (segment,), 10)


def test_a_record_whose_checksum_fails_is_dropped_with_what_follows(tmp_path: Path) -> None:
    """A last record of the right length but altered bytes (a torn write) is never
    replayed: its CRC-32 does not match, so reading stops before it."""
    log = IntentLog(tmp_path)
    log.append(_settle("r1"))
    log.append(_settle("r2"))
    (path,) = log.segments()
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the last record's JSON payload
    path.write_bytes(bytes(data))
    assert [op.request_id for op in read_segments([path])] == ["r1"]
