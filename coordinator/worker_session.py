"""The coordinator's link to one node's worker: generations multiplexed on one stream.

A new gRPC call per request costs grpc-python about 0.3 ms more than a message on a
call that is already open (measured on loopback: first message of a new unary-stream
call 0.52-0.61 ms p50, a message round trip on an open bidirectional stream
0.20-0.24 ms). That setup sat on every request's time to first token, so the relay
sends each generation as a message on the node session's long-lived ``Session`` stream
(``NodeWorkerService.Session``, see the proto) and reads its output back by
``stream_id``.

:class:`WorkerLink` holds a node session's channel, the metadata its calls carry (the
dispatch tag, and the node id, which the worker checks: a worker that is another node's
refuses the stream and calls PERMISSION_DENIED), and that stream, opened on first use
and again after it breaks.
:meth:`WorkerLink.open` returns a :class:`SessionStream` that reads like a call: ``read()``
gives each ``WorkerGenerateResponse`` as wire bytes (a delta's bytes are a valid
``GenerateResponse``, as on a call) or ``grpc.aio.EOF``, and raises
:class:`WorkerStreamError` (``code()``, ``details()``, as ``AioRpcError``) when the node
ended the generation without a final or the stream broke. A node that does not serve
``Session`` (UNIMPLEMENTED: an older node) gets one call per request, as before.

One task per stream reads the node's frames and hands each to its generation's buffer;
the frame's header (stream id, field tag, length) is read from the bytes, so a delta is
not parsed here either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

import grpc
import grpc.aio
from mercato.v1 import node_pb2

from marketplace.worker_session import SESSION_ACCEPTED_METADATA, STREAM_ID_MAX

log = logging.getLogger(__name__)

WORKER_GENERATE_PATH = "/mercato.v1.NodeWorkerService/Generate"
WORKER_SESSION_PATH = "/mercato.v1.NodeWorkerService/Session"
_TIMEOUT_MS_MAX = 2**32 - 1
_STREAM_ID_TAG = 0x08  # WorkerSessionResponse field 1, varint
_RESPONSE_TAG = 0x12  # field 2, length-delimited: WorkerGenerateResponse
_FINAL_TAG = 0x12  # WorkerGenerateResponse field 2 (final)
_ERROR_TAG = 0x1A  # WorkerGenerateResponse field 3 (error)
_EOF = grpc.aio.EOF
_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The gRPC status code with this number (UNKNOWN for one gRPC does not define)."""
    return _STATUS_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


_STATUS_WAIT_S = 1.0  # for the status of a call a write just failed on
_ACCEPT_TIMEOUT_S = 5.0  # for a new session stream's initial metadata


class WorkerStreamError(Exception):
    """A generation ended without a final; reads like ``grpc.aio.AioRpcError``."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; IndexError if cut short."""
    value = 0
    shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


def split_frame(frame: bytes) -> tuple[int, bytes | None, node_pb2.WorkerSessionEnd | None]:
    """(stream id, WorkerGenerateResponse bytes or None, end or None) of a node's frame.

    The fast path reads the header the node's encoder writes (``stream_id`` first, then
    the response, nothing else); any other layout is parsed in full. Raises
    ``google.protobuf.message.DecodeError`` for bytes that are not a frame.
    """
    try:
        # Most frames: a stream id and a length below 128 (one byte each).
        if (
            frame[0] == _STREAM_ID_TAG
            and frame[1] < 0x80
            and frame[2] == _RESPONSE_TAG
            and frame[3] == len(frame) - 4
        ):
            return frame[1], frame[4:], None
        if frame[0] == _STREAM_ID_TAG:
            stream_id, pos = _varint(frame, 1)
            if frame[pos] == _RESPONSE_TAG:
                length, start = _varint(frame, pos + 1)
                if start + length == len(frame):
                    return stream_id, frame[start:], None
    except IndexError:
        pass
    parsed = node_pb2.WorkerSessionResponse.FromString(frame)
    if parsed.WhichOneof("event") == "response":
        return parsed.stream_id, parsed.response.SerializeToString(), None
    if parsed.WhichOneof("event") == "end":
        return parsed.stream_id, None, parsed.end
    return (
        parsed.stream_id,
        None,
        node_pb2.WorkerSessionEnd(
            status_code=grpc.StatusCode.INTERNAL.value[0], message="sent an empty session message"
        ),
    )


class SessionStream:
    """One generation on a session stream; used like a unary-stream call."""

    __slots__ = ("_ended", "_error", "_messages", "_session", "_waiter", "stream_id")

    def __init__(self, session: _Session, stream_id: int) -> None:
        self._session = session
        self.stream_id = stream_id
        self._messages: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: WorkerStreamError | None = None
        self._ended = False  # final or error seen, or failed: nothing more will come

    async def read(self) -> Any:
        """The next response's bytes, or ``grpc.aio.EOF`` after the last."""
        messages = self._messages
        while not messages:
            if self._error is not None:
                raise self._error
            if self._ended:
                return _EOF
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return messages.popleft()

    def done(self) -> bool:
        return self._ended

    def cancel(self) -> None:
        """Stop the generation on the node (the client left, or the relay gave up on it)."""
        if not self._ended:
            self._ended = True
            self._session.cancel(self.stream_id)

    # called by the session's reader
    def _deliver(self, message: bytes, last: bool) -> None:
        self._messages.append(message)
        if last:
            self._ended = True
        self._wake()

    def _fail(self, error: WorkerStreamError) -> None:
        if not self._ended:
            self._ended = True
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Session:
    """One open ``Session`` call and the generations on it."""

    def __init__(self, link: WorkerLink) -> None:
        self._link = link
        self._call = link.channel.stream_stream(
            WORKER_SESSION_PATH,
            request_serializer=node_pb2.WorkerSessionRequest.SerializeToString,
            response_deserializer=None,  # raw frames: deltas are forwarded unparsed
        )(metadata=link.metadata)
        self._streams: dict[int, SessionStream] = {}
        self._next_id = 1
        self._lock = asyncio.Lock()
        self.broken: WorkerStreamError | None = None
        self._retired = False
        self._reader = asyncio.get_running_loop().create_task(
            self._read_forever(), name="mercato-worker-session"
        )
        self._background_tasks: set[asyncio.Task[None]] = set()
        # The node answers a new stream with its initial metadata at once, marked as
        # accepted; a node without Session ends it UNIMPLEMENTED (no metadata). Waiting
        # for either before the first write avoids a write racing that refusal (it
        # fails INTERNAL, and the real status is lost).
        self._ready = asyncio.get_running_loop().create_task(self._accepted())

    async def _accepted(self) -> None:
        try:
            async with asyncio.timeout(_ACCEPT_TIMEOUT_S):
                metadata = await self._call.initial_metadata()
                if SESSION_ACCEPTED_METADATA not in metadata:
                    # Refused: its status may land a moment after the (empty) metadata.
                    code = await self._call.code()
                    error = WorkerStreamError(code, await self._call.details() or "")
                    self._break(error)
                    raise error
        except TimeoutError:
            error = WorkerStreamError(
                grpc.StatusCode.UNAVAILABLE,
                f"the node did not accept a session stream within {_ACCEPT_TIMEOUT_S} s",
            )
            self._break(error)
            self._call.cancel()
            raise error from None

    async def open(
        self, request: node_pb2.WorkerGenerateRequest, timeout_s: float | None
    ) -> SessionStream:
        if not self._ready.done():
            await asyncio.shield(self._ready)  # shared by every request that waits
        self._ready.result()  # raises the refusal
        stream_id = self._take_id()
        stream = SessionStream(self, stream_id)
        self._streams[stream_id] = stream
        timeout_ms = 0
        if timeout_s is not None:
            timeout_ms = min(_TIMEOUT_MS_MAX, max(1, int(timeout_s * 1000)))
        frame = node_pb2.WorkerSessionRequest(
            stream_id=stream_id, start=request, timeout_ms=timeout_ms
        )
        try:
            await self._write(frame)
        except BaseException:
            self._streams.pop(stream_id, None)
            raise
        return stream

    def _take_id(self) -> int:
        streams = self._streams
        stream_id = self._next_id
        while stream_id in streams:
            stream_id = stream_id % STREAM_ID_MAX + 1
        self._next_id = stream_id % STREAM_ID_MAX + 1
        return stream_id

    async def _write(self, frame: node_pb2.WorkerSessionRequest) -> None:
        if self.broken is not None:
            raise self.broken
        try:
            async with self._lock:  # one write at a time on a call
                await self._call.write(frame)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            # A write to a call that already ended fails with a generic error; the call's
            # own status says why (UNIMPLEMENTED from a node without Session).
            error = self._error_of(exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_STATUS_WAIT_S):
                    code = await self._call.code()
                    if code is not grpc.StatusCode.OK:
                        error = WorkerStreamError(code, await self._call.details() or "")
            self._break(error)
            raise error from exc

    def cancel(self, stream_id: int) -> None:
        if self._streams.pop(stream_id, None) is None or self.broken is not None:
            return
        if self._retired:
            # Half-closed: no more messages. The last one open takes the call with it;
            # another one's output is dropped here until it ends on the node.
            if not self._streams:
                self._call.cancel()
            return
        self._background(self._send_cancel(stream_id))

    async def _send_cancel(self, stream_id: int) -> None:
        with contextlib.suppress(WorkerStreamError):
            await self._write(node_pb2.WorkerSessionRequest(stream_id=stream_id, cancel=True))

    def _background(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background_tasks.add(task)
        task.add_done_callback(self._background_tasks.discard)

    def retire(self) -> None:
        """Take no more generations; the node ends the stream once the open ones have
        finished (a node that re-registers, or leaves, finishes what it was given)."""
        if self._retired or self.broken is not None:
            return
        self._retired = True
        self._background(self._half_close())

    async def _half_close(self) -> None:
        try:
            async with self._lock:
                await self._call.done_writing()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # already over

    async def _read_forever(self) -> None:
        read = self._call.read
        streams = self._streams
        error = WorkerStreamError(grpc.StatusCode.UNAVAILABLE, "the node ended its session")
        try:
            while True:
                frame = await read()
                if frame is _EOF:
                    break
                stream_id, response, end = split_frame(frame)
                stream = streams.get(stream_id)
                if stream is None:
                    continue  # cancelled here, or a stray end after an error
                if response is not None:
                    kind = response[0] if response else 0
                    last = kind in (_FINAL_TAG, _ERROR_TAG)
                    if last:
                        del streams[stream_id]
                    stream._deliver(response, last)
                else:
                    assert end is not None
                    del streams[stream_id]
                    stream._fail(WorkerStreamError(status_code(end.status_code), end.message))
        except grpc.aio.AioRpcError as exc:
            error = self._error_of(exc)
        except asyncio.CancelledError:
            error = WorkerStreamError(grpc.StatusCode.UNAVAILABLE, "the session was closed")
            raise
        except Exception as exc:  # a malformed frame: the stream cannot be trusted
            log.warning("node session broken by an unreadable frame: %s", exc)
            error = WorkerStreamError(grpc.StatusCode.INTERNAL, "sent an unreadable message")
        finally:
            self._break(error)

    @staticmethod
    def _error_of(exc: BaseException) -> WorkerStreamError:
        if isinstance(exc, grpc.aio.AioRpcError):
            return WorkerStreamError(exc.code(), exc.details() or "")
        return WorkerStreamError(grpc.StatusCode.UNAVAILABLE, f"the session broke ({exc})")

    def _break(self, error: WorkerStreamError) -> None:
        """Fail every open generation and forget this stream (the link opens another)."""
        if self.broken is None:
            self.broken = error
            self._link._session_broken(self, error)
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            stream._fail(error)


class WorkerLink:
    """A node session's way to its worker: channel, call metadata, session stream."""

    __slots__ = ("_session", "channel", "metadata", "sessions_unsupported")

    def __init__(self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]) -> None:
        self.channel = channel
        self.metadata = metadata
        self._session: _Session | None = None
        # The node answered Session with UNIMPLEMENTED: one call per request instead.
        self.sessions_unsupported = False

    async def open(
        self, request: node_pb2.WorkerGenerateRequest, timeout_s: float | None
    ) -> SessionStream | grpc.aio.UnaryStreamCall:
        """Start ``request`` on the node; read its responses from what is returned."""
        if self.sessions_unsupported:
            return self.call(request, timeout_s)
        session = self._session
        if session is None:
            session = self._session = _Session(self)
        try:
            return await session.open(request, timeout_s)
        except WorkerStreamError as exc:
            if exc.code() is not grpc.StatusCode.UNIMPLEMENTED:
                raise
        return self.call(request, timeout_s)  # an older node, found out on opening the stream

    def call(
        self, request: node_pb2.WorkerGenerateRequest, timeout_s: float | None
    ) -> grpc.aio.UnaryStreamCall:
        """``request`` as a call of its own (``Generate``)."""
        return self.channel.unary_stream(
            WORKER_GENERATE_PATH,
            request_serializer=node_pb2.WorkerGenerateRequest.SerializeToString,
            response_deserializer=None,  # raw bytes: deltas are forwarded unparsed
        )(request, timeout=timeout_s, metadata=self.metadata)

    def _session_broken(self, session: _Session, error: WorkerStreamError) -> None:
        if self._session is session:
            self._session = None
        if error.code() is grpc.StatusCode.UNIMPLEMENTED:
            log.info("node worker does not serve Session; one call per request")
            self.sessions_unsupported = True

    def retire(self) -> None:
        """This link's node session is over (the node re-registered, or left): new
        requests go elsewhere, and the generations open on its stream finish there
        (until the registry closes the channel, after its grace period)."""
        if self._session is not None:
            self._session.retire()
            self._session = None
