"""Serving ``NodeWorkerService.Session``: many generations multiplexed on one stream.

A coordinator sends each request as a ``start`` message on a long-lived stream instead
of opening a ``Generate`` call per request (grpc-python's per-call setup was most of a
relay hop's latency). :func:`serve_session` turns such a stream back into generations:
each runs as its own task with the same async generator that serves ``Generate``
(``generate(request, context)``, yielding ``WorkerGenerateResponse``), and its responses
go out as ``WorkerSessionResponse`` frames tagged with its ``stream_id``.

Each generation behaves as one call would:

* ``context.abort(code, details)`` ends that generation with a ``WorkerSessionEnd``
  (the call's status), not the stream; so does an error or an exceeded ``timeout_ms``;
* a ``cancel`` message cancels its task, as a cancelled call cancels its handler (the
  generator sees CancelledError/GeneratorExit, and can hand over a late receipt);
* its task waits until each frame is written before asking for the next response, as
  a call's handler waits on its writes, so output that arrives meanwhile can be merged;
* the stream ending (the coordinator went away) cancels every generation still open.

``admit()`` is asked synchronously at each start (so concurrent starts cannot all pass a
limit): None admits, ``(code, message)`` refuses with an end frame. ``release()`` runs
when an admitted generation ends. A protocol violation (stream id 0, a start for an open
id, a message that neither starts nor cancels) aborts the whole stream
INVALID_ARGUMENT. This is shared by the node and by test doubles of it, so both serve
exactly the same protocol.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, NoReturn

import grpc
import grpc.aio
from mercato.v1 import node_pb2

log = logging.getLogger(__name__)

STREAM_ID_MAX = 2**32 - 1
# Initial metadata a node sends as soon as it serves a Session stream. A refused stream
# has none (its status comes alone), which is how the caller tells the two apart.
SESSION_ACCEPTED_METADATA = "x-mercato-session-accepted"

Generate = Callable[
    [node_pb2.WorkerGenerateRequest, Any], AsyncIterator[node_pb2.WorkerGenerateResponse]
]
Admit = Callable[[], tuple[grpc.StatusCode, str] | None]


class SessionAbort(Exception):
    """Raised by a generation's ``context.abort``: ends that generation only."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class GenerationContext:
    """What a ``Generate`` handler uses of its ServicerContext, for one generation on a
    Session stream: abort ends the generation; the metadata is the stream's; the time
    remaining counts down from the start message's ``timeout_ms``."""

    __slots__ = ("_deadline", "_stream")

    def __init__(self, stream: grpc.aio.ServicerContext, timeout_ms: int) -> None:
        self._stream = stream
        self._deadline = time.monotonic() + timeout_ms / 1000 if timeout_ms else None

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise SessionAbort(code, details)

    def invocation_metadata(self) -> Any:
        return self._stream.invocation_metadata()

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())


async def serve_session(
    requests: AsyncIterator[node_pb2.WorkerSessionRequest],
    context: grpc.aio.ServicerContext,
    generate: Generate,
    *,
    admit: Admit = lambda: None,
    release: Callable[[], None] = lambda: None,
) -> AsyncIterator[node_pb2.WorkerSessionResponse]:
    """The frames to write on a Session stream (yield them from the handler)."""
    # At once, so the caller knows the stream is served before it writes (a server
    # without Session answers UNIMPLEMENTED instead; see coordinator.worker_session).
    await context.send_initial_metadata(((SESSION_ACCEPTED_METADATA, "1"),))
    session = _Session(context, generate, admit, release)
    reader = asyncio.create_task(session.read(requests))
    try:
        async for frame in session.frames():
            yield frame
        if session.failure is not None:
            await context.abort(session.failure.code, session.failure.details)
    finally:
        reader.cancel()
        await session.close()
        await asyncio.wait((reader,))


class _Session:
    """One Session stream: its generations (a task each) and the frames to write."""

    def __init__(
        self,
        context: grpc.aio.ServicerContext,
        generate: Generate,
        admit: Admit,
        release: Callable[[], None],
    ) -> None:
        self._context = context
        self._generate = generate
        self._admit = admit
        self._release = release
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._admitted: set[int] = set()  # streams whose slot is not released yet
        self._outbox: deque[tuple[node_pb2.WorkerSessionResponse, asyncio.Future[None] | None]]
        self._outbox = deque()
        self._wake = asyncio.Event()
        self._input_done = False
        self.failure: SessionAbort | None = None  # the coordinator broke the protocol

    async def read(self, requests: AsyncIterator[node_pb2.WorkerSessionRequest]) -> None:
        """Start and cancel generations as asked, until the coordinator half-closes."""
        try:
            async for frame in requests:
                stream_id = frame.stream_id
                if stream_id == 0:
                    raise SessionAbort(
                        grpc.StatusCode.INVALID_ARGUMENT, "stream_id: must be 1 or more"
                    )
                action = frame.WhichOneof("action")
                if action == "start":
                    if stream_id in self._tasks:
                        raise SessionAbort(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"stream_id: {stream_id} is already open on this stream",
                        )
                    self._start(stream_id, frame.start, frame.timeout_ms)
                elif action == "cancel":
                    task = self._tasks.get(stream_id)
                    if task is not None:  # else it has just ended: nothing to do
                        task.cancel()
                else:
                    raise SessionAbort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "a session message must start or cancel a generation",
                    )
        except SessionAbort as exc:
            self.failure = exc
        finally:
            self._input_done = True
            self._wake.set()

    def _start(
        self, stream_id: int, request: node_pb2.WorkerGenerateRequest, timeout_ms: int
    ) -> None:
        refusal = self._admit()
        if refusal is not None:
            self._end(stream_id, *refusal)
            return
        self._admitted.add(stream_id)
        task = asyncio.get_running_loop().create_task(self._run(stream_id, request, timeout_ms))
        self._tasks[stream_id] = task
        # A callback, not a finally: a task cancelled before its first step runs no code.
        task.add_done_callback(lambda _: self._finished(stream_id))

    def _release_slot(self, stream_id: int) -> None:
        if stream_id in self._admitted:
            self._admitted.discard(stream_id)
            self._release()

    def _finished(self, stream_id: int) -> None:
        self._release_slot(stream_id)
        del self._tasks[stream_id]
        self._wake.set()

    async def _run(
        self, stream_id: int, request: node_pb2.WorkerGenerateRequest, timeout_ms: int
    ) -> None:
        context = GenerationContext(self._context, timeout_ms)
        try:
            async with asyncio.timeout(timeout_ms / 1000 if timeout_ms else None):
                async with aclosing(self._generate(request, context)) as responses:
                    async for response in responses:
                        if response.HasField("final"):
                            # Done generating: the slot is free once the final is handed
                            # over, not a few loop turns later when the task ends (the
                            # coordinator may already send the next request by then).
                            self._release_slot(stream_id)
                        await self._send(stream_id, response)
        except SessionAbort as exc:
            self._end(stream_id, exc.code, exc.details)
        except TimeoutError:
            self._end(
                stream_id,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the generation's deadline ({timeout_ms} ms) passed",
            )
        except asyncio.CancelledError:
            raise  # cancelled by the coordinator, or the stream ended: nobody to tell
        except Exception:
            log.exception("request %s failed on a session stream", request.request_id)
            self._end(stream_id, grpc.StatusCode.INTERNAL, "the node failed; see its log")

    async def _send(self, stream_id: int, response: node_pb2.WorkerGenerateResponse) -> None:
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        frame = node_pb2.WorkerSessionResponse(stream_id=stream_id, response=response)
        self._outbox.append((frame, written))
        self._wake.set()
        await written

    def _end(self, stream_id: int, code: grpc.StatusCode, message: str) -> None:
        end = node_pb2.WorkerSessionEnd(status_code=code.value[0], message=message)
        self._outbox.append((node_pb2.WorkerSessionResponse(stream_id=stream_id, end=end), None))
        self._wake.set()

    async def frames(self) -> AsyncIterator[node_pb2.WorkerSessionResponse]:
        """Frames to write, in order; ends when the coordinator has half-closed and every
        generation has ended, or it broke the protocol."""
        outbox = self._outbox
        wake = self._wake
        while True:
            while not outbox:
                if self.failure is not None or (self._input_done and not self._tasks):
                    return
                wake.clear()
                await wake.wait()
            frame, written = outbox.popleft()
            yield frame
            if written is not None and not written.done():
                written.set_result(None)

    async def close(self) -> None:
        """Cancel what still runs (a generation cut off signs its late receipt) and wait."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for _, written in self._outbox:
            if written is not None and not written.done():
                written.cancel()
        if tasks:
            await asyncio.wait(tasks)
