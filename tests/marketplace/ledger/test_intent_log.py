"""The intent log keeps every complete record and drops a corrupted tail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from marketplace.ledger.errors import LedgerBusy
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
