"""The group-commit writer: one asyncio task and one database thread.

``submit(op)`` queues an operation and returns a future at once; nothing on the caller's
path waits for the disk. The task takes everything queued (up to ``commit_batch_max``),
applies it in one transaction on its own thread (one fsync per batch), and resolves
each operation's future when the batch is durable — with its result, or with the
LedgerError that refused it. While one batch commits, the next one gathers, so batches
grow with load and latency stays one commit at low load.

After each commit the writer reports the available balance of every account the batch
touched (the database's truth), which the ledger's in-memory cache adopts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from marketplace.ledger.applier import apply_batch
from marketplace.ledger.database import WRITE_OPTION
from marketplace.ledger.errors import LedgerError, LedgerUnavailable
from marketplace.ledger.operations import Operation

log = logging.getLogger(__name__)

_ATTEMPTS = 3

BatchCallback = Callable[[Sequence[Operation], Sequence[Any], dict[str, int]], None]


def commit_ops(conn: Connection, ops: Sequence[Operation]) -> tuple[list[Any], dict[str, int]]:
    """Apply ``ops`` in one transaction, retrying on database errors; as a last resort
    each operation alone, so one bad operation cannot sink its batch."""
    last: Exception | None = None
    for _ in range(_ATTEMPTS):
        try:
            with conn.begin():
                answers, available = apply_batch(conn, ops)
            return answers, available
        except DBAPIError as exc:
            last = exc
            log.warning("ledger batch of %d failed, retrying: %s", len(ops), exc.orig)
            if exc.connection_invalidated:
                time.sleep(0.05)
    if len(ops) > 1:
        answers, available = [], {}
        for op in ops:
            one, avail = commit_ops(conn, [op])
            answers.extend(one)
            available.update(avail)
        return answers, available
    error = LedgerUnavailable(f"the ledger database refused the write: {last}")
    return [error], {}


class GroupCommitWriter:
    """Batches queued operations into one transaction per commit."""

    def __init__(
        self,
        engine: Engine,
        *,
        batch_max: int = 4096,
        window_ms: float = 0.0,
        on_batch: BatchCallback | None = None,
    ) -> None:
        self._engine = engine
        self._batch_max = batch_max
        self._window_s = window_ms / 1000
        self._on_batch = on_batch
        self._queue: list[tuple[Operation, asyncio.Future[Any]]] = []
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ledger-writer")
        self._conn: Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.batches = 0
        self.ops_committed = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ledger-writer")

    def submit(self, op: Operation) -> asyncio.Future[Any]:
        """Queue ``op``; the future resolves when it is durable (or refused)."""
        if self._closing or self._task is None:
            raise LedgerUnavailable("the ledger writer is not running; start the ledger first")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((op, future))
        self._wakeup.set()
        return future

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def drain(self) -> None:
        """Wait until everything queued so far is durable."""
        if self._queue:
            await asyncio.gather(*(f for _, f in self._queue), return_exceptions=True)

    async def close(self) -> None:
        """Commit what is queued, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close_connection)
        self._executor.shutdown(wait=True)

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _commit(self, ops: list[Operation]) -> tuple[list[Any], dict[str, int]]:
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            self._conn = self._engine.connect().execution_options(**{WRITE_OPTION: True})
        return commit_ops(self._conn, ops)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                if self._window_s and not self._closing:
                    await asyncio.sleep(self._window_s)
            if not self._queue:
                continue
            taken = self._queue[: self._batch_max]
            del self._queue[: self._batch_max]
            ops = [op for op, _ in taken]
            try:
                answers, available = await loop.run_in_executor(self._executor, self._commit, ops)
            except Exception as exc:  # a bug or a dead database: fail this batch, go on
                log.exception("ledger batch failed")
                error = LedgerUnavailable(f"the ledger could not commit: {exc}")
                answers, available = [error] * len(ops), {}
            self.batches += 1
            self.ops_committed += len(ops)
            if self._on_batch is not None:
                try:
                    self._on_batch(ops, answers, available)
                except Exception:
                    log.exception("ledger batch callback failed")
            for (_, future), answer in zip(taken, answers, strict=True):
                if future.done():
                    continue
                if isinstance(answer, LedgerError):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)
