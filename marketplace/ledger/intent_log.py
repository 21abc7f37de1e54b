"""The settlement intent log: a settlement is on disk before ``settle`` returns.

A coordinator answers the client as soon as a request is settled in memory; the database
commit follows within a batch. To lose nothing if the process is killed in between, each
settlement is first appended to this log with one ``write`` (in the operating system's
page cache, so it survives a killed process; with ``fsync`` it also survives a power
cut). On start, ``Ledger.recover_unsettled`` replays every record through the same
idempotent settlement (already settled ones answer "settled before"), then deletes the
log. While running, the log rotates into segments and a segment is deleted once every
settlement in it is durable in the database.

Record: 4-byte big-endian length, 4-byte CRC-32, then a JSON payload. A torn last record
(length or checksum wrong) is one that was never acknowledged and is skipped. So is a
tail of zero bytes (a length of 0: what a file system can leave at the end of a file
after a power cut when ``intent_log_fsync`` is off), or a record that passes its checksum
but does not decode: reading that segment stops there, with a warning, and start-up goes
on. A write that fails or stops short (a full disk) is cut off the segment again and
refused with :class:`LedgerUnavailable`, so no torn record sits before later ones.

One process at a time writes a folder: it holds an exclusive ``flock`` on
``writer.lock`` in it (with its pid inside) while the log is open, and the kernel lets go
of it when the process dies. A second coordinator started with the same identity and
data directory is refused with :class:`LedgerBusy` instead of running the crash
recovery of a writer that is alive (which would void its open holds).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import json
import logging
import os
import struct
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

from marketplace.ledger.errors import LedgerBusy, LedgerUnavailable
from marketplace.ledger.operations import Settle, SettleSegment

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">II")
_SEGMENT_BYTES_MAX = 4 * 1024 * 1024
_BYTES_FIELDS = (
    "receipt",
    "node_public_key",
    "node_signature",
    "coordinator_public_key",
    "coordinator_signature",
)


def encode_settle(op: Settle) -> bytes:
    data: dict[str, Any] = asdict(op)
    for segment in data["segments"]:
        for name in _BYTES_FIELDS:
            segment[name] = base64.b64encode(segment[name]).decode()
    return json.dumps(data, separators=(",", ":")).encode()


def decode_settle(payload: bytes) -> Settle:
    data = json.loads(payload)
    segments = []
    for segment in data.pop("segments"):
        for name in _BYTES_FIELDS:
            segment[name] = base64.b64decode(segment[name])
        segments.append(SettleSegment(**segment))
    return Settle(segments=tuple(segments), **data)


class IntentLog:
    """Append-only segments of settlement records in one folder (one writer)."""

    def __init__(self, directory: Path, *, fsync: bool = False) -> None:
        self.directory = directory
        self._fsync = fsync
        directory.mkdir(parents=True, exist_ok=True)
        self._lock: int | None = _lock_writer(directory)
        existing = self.segments()
        self._number = (int(existing[-1].stem.split("-")[1]) + 1) if existing else 1
        self._fd: int | None = None
        self._size = 0
        self._outstanding: dict[int, int] = {}

    def segments(self) -> list[Path]:
        return sorted(self.directory.glob("intents-*.log"))

    def previous_segments(self) -> list[Path]:
        """Segments left by an earlier process (everything but the one being written)."""
        current = self._path(self._number)
        return [path for path in self.segments() if path != current]

    def _path(self, number: int) -> Path:
        return self.directory / f"intents-{number:010d}.log"

    def append(self, op: Settle) -> int:
        """Write one record; returns the segment to pass to ``done`` once durable."""
        if self._fd is None or self._size >= _SEGMENT_BYTES_MAX:
            self._rotate()
        payload = encode_settle(op)
        record = _HEADER.pack(len(payload), zlib.crc32(payload)) + payload
        assert self._fd is not None
        try:
            _write_all(self._fd, record)
            if self._fsync:
                os.fsync(self._fd)
        except OSError as exc:
            self._cut_back()
            raise LedgerUnavailable(
                f"could not write the settlement intent log {self._path(self._number)}: "
                f"{exc.strerror or exc}; the request was not settled. Free disk space in "
                f"{self.directory} (or check the disk)"
            ) from exc
        self._size += len(record)
        self._outstanding[self._number] = self._outstanding.get(self._number, 0) + 1
        return self._number

    def _cut_back(self) -> None:
        """Drop the part of a record a failed write left, so the next record follows the
        last whole one; if that fails too, the next record starts a new segment."""
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            self._size = _SEGMENT_BYTES_MAX  # rotates on the next append

    def done(self, number: int) -> None:
        """One record of segment ``number`` is durable in the database."""
        left = self._outstanding.get(number, 0) - 1
        self._outstanding[number] = left
        if left <= 0 and number != self._number:
            del self._outstanding[number]
            self._path(number).unlink(missing_ok=True)

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            old = self._number
            self._number += 1
            if self._outstanding.get(old, 0) <= 0:
                self._outstanding.pop(old, None)
                self._path(old).unlink(missing_ok=True)
        self._fd = os.open(self._path(self._number), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not any(self._outstanding.values()):
            self._path(self._number).unlink(missing_ok=True)
        if self._lock is not None:
            os.close(self._lock)  # lets go of the flock; the file stays (no unlink race)
            self._lock = None


def _lock_writer(directory: Path) -> int:
    """Hold ``directory/writer.lock`` exclusively for as long as this process lives."""
    fd = os.open(directory / "writer.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = b""
        with contextlib.suppress(OSError):
            holder = os.pread(fd, 32, 0)
        os.close(fd)
        pid = holder.decode(errors="replace").strip() or "unknown"
        raise LedgerBusy(
            f"another process (pid {pid}) is this ledger writer: it holds "
            f"{directory / 'writer.lock'}. A coordinator with this identity and data "
            "directory is already running; stop it first, or start this one with its own "
            "--home"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a write may stop short)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "the write wrote nothing")
        view = view[written:]


def read_segments(paths: list[Path]) -> list[Settle]:
    """Every complete record in ``paths``, in order. A segment is read up to its first
    record that is torn (cut short, a wrong checksum, a length of 0 as in a zero-filled
    tail) or does not decode: that record was never acknowledged, nor any after it."""
    ops = []
    for path in paths:
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            torn = _torn(data, offset)
            if torn is None:
                length = _HEADER.unpack_from(data, offset)[0]
                start = offset + _HEADER.size
                try:
                    ops.append(decode_settle(data[start : start + length]))
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    torn = f"a record that does not decode ({type(exc).__name__}: {exc})"
                else:
                    offset = start + length
                    continue
            log.warning(
                "intent log %s: stopped reading at byte %d of %d, %s; the %d bytes from "
                "there were never acknowledged and are skipped",
                path,
                offset,
                len(data),
                torn,
                len(data) - offset,
            )
            break
    return ops


def _torn(data: bytes, offset: int) -> str | None:
    """Why the record at ``offset`` is torn, or None if it is whole and checks out."""
    if offset + _HEADER.size > len(data):
        return "a record header cut short"
    length, crc = _HEADER.unpack_from(data, offset)
    if length == 0:
        return "a record of length 0 (a zero-filled tail)"
    start = offset + _HEADER.size
    payload = data[start : start + length]
    if len(payload) < length:
        return "a record cut short"
    if zlib.crc32(payload) != crc:
        return "a record whose checksum does not match"
    return None
