"""The intent log keeps every complete record and drops a corrupted tail."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from marketplace.identity import Identity
from marketplace.ledger import Ledger, LedgerSettings, LedgerStore, intent_log
from marketplace.ledger.errors import LedgerBusy, LedgerUnavailable
from marketplace.ledger.intent_log import IntentLog, read_segments
from marketplace.ledger.operations import Settle, SettleSegment
from tests.marketplace.ledger.conftest import kill_ledger, make_client, receipt_for


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


def test_one_writer_per_folder_and_a_dead_one_lets_go(tmp_path: Path) -> None:
    """A second writer of a folder is refused while the first lives (another process,
    named by its pid); once that process is killed, the folder can be taken at once."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from marketplace.ledger.intent_log import IntentLog; "
            f"log = IntentLog(Path({str(tmp_path)!r})); print('held', flush=True); "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "held\n"
        with pytest.raises(LedgerBusy, match=rf"another process \(pid {child.pid}\)"):
            IntentLog(tmp_path)
    finally:
        child.kill()  # no clean-up: the kernel drops the lock of a dead process
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    log = IntentLog(tmp_path)
    with pytest.raises(LedgerBusy, match=rf"\(pid {os.getpid()}\)"):
        IntentLog(tmp_path)  # the same process twice is two writers too
    log.close()
    IntentLog(tmp_path).close()  # closed: free again


@pytest.mark.parametrize("zeros", [8, 13, 4096])
def test_a_zero_filled_tail_is_a_torn_tail(
    tmp_path: Path, zeros: int, caplog: pytest.LogCaptureFixture
) -> None:
    """After a power cut (intent_log_fsync off) a file system can leave zero bytes at
    the end of a segment. A header of zeros reads as length 0, CRC 0, and crc32(b"") is
    0: before, it passed and the empty payload failed to decode, so the coordinator
    could not start. Now reading stops there, with one warning, and keeps the records
    before it."""
    log = IntentLog(tmp_path)
    log.append(_settle("r1"))
    log.append(_settle("r2"))
    (path,) = log.segments()
    with path.open("ab") as f:
        f.write(b"\0" * zeros)
    with caplog.at_level(logging.WARNING, logger="marketplace.ledger.intent_log"):
        assert [op.request_id for op in read_segments([path])] == ["r1", "r2"]
    [warning] = caplog.records
    assert "never acknowledged" in warning.getMessage()


@pytest.mark.parametrize(
    "payload", [b"not json", b"[]", b'{"request_id": "x"}', b"\xff\xfe", b'"text"']
)
def test_a_record_that_passes_its_checksum_but_does_not_decode_ends_the_segment(
    tmp_path: Path, payload: bytes
) -> None:
    log = IntentLog(tmp_path)
    log.append(_settle("r1"))
    (path,) = log.segments()
    with path.open("ab") as f:
        f.write(struct.pack(">II", len(payload), zlib.crc32(payload)) + payload)
    log.append(_settle("r2"))  # after the bad record: not acknowledged either
    assert [op.request_id for op in read_segments([path])] == ["r1"]


def test_a_write_that_stops_short_is_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``os.write`` may write part of a record: the rest is written, not dropped."""
    real_write = os.write

    def short_write(fd: int, data: bytes) -> int:
        return real_write(fd, bytes(data)[:7])

    log = IntentLog(tmp_path)
    monkeypatch.setattr(intent_log.os, "write", short_write)
    log.append(_settle("r1"))
    log.append(_settle("r2"))
    monkeypatch.undo()
    assert [op.request_id for op in read_segments(log.segments())] == ["r1", "r2"]


def test_a_failed_write_is_cut_off_and_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails part-way (a full disk) raises LedgerUnavailable and leaves no
    torn record in front of the next one (which would hide it from recovery)."""
    real_write = os.write
    calls = 0

    def failing_write(fd: int, data: bytes) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_write(fd, bytes(data)[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    log = IntentLog(tmp_path)
    log.append(_settle("r1"))
    monkeypatch.setattr(intent_log.os, "write", failing_write)
    with pytest.raises(LedgerUnavailable, match=r"No space left on device.*Free disk space"):
        log.append(_settle("r2"))
    monkeypatch.undo()
    log.append(_settle("r3"))
    assert [op.request_id for op in read_segments(log.segments())] == ["r1", "r3"]


async def test_recovery_settles_the_records_before_a_zero_filled_tail(
    settings: LedgerSettings, store: LedgerStore, node: Identity
) -> None:
    """A coordinator killed (and its machine's power cut) after a settlement was in the
    intent log but before it was committed starts again, and settles it."""
    client = make_client(store)
    coordinator = Identity.from_seed(b"c" * 32)
    first = Ledger(settings, coordinator=coordinator)
    await first.start(sweep=False)
    await (await first.place_hold("r1", client, 10_000)).durable
    assert first._writer is not None and first._intents is not None
    first._writer.submit = (  # type: ignore[method-assign]
        lambda op: asyncio.get_running_loop().create_future()  # never committed
    )
    signed, relayed = receipt_for(node, "r1#0", 1000, 1000)
    await first.settle("r1", [signed], [relayed])
    (path,) = first._intents.segments()
    await kill_ledger(first)
    with path.open("ab") as f:
        f.write(b"\0" * 512)

    restarted = Ledger(settings, coordinator=coordinator)
    report = await restarted.start(sweep=False)
    await restarted.close()
    assert report is not None and report.replayed == 1 and report.settled == 1
    assert store.settlement("r1")["cost_micro_usd"] == 400  # type: ignore[index]
    assert store.account(client).available_micro_usd == 1_000_000 - 400
