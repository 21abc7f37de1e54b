"""asyncio helpers that keep cancellation honest on Python 3.11.

Two patterns lose a cancellation there, and a lost cancellation is a process that does
not stop on SIGTERM:

- ``asyncio.wait_for(x, t)`` returns ``x``'s result when ``x`` completes in the same loop
  turn as the cancellation of the task awaiting it (fixed in 3.12). Use
  ``async with asyncio.timeout(t): await x`` instead (ruff bans ``wait_for`` here).
- ``task.cancel()`` then ``with suppress(CancelledError): await task`` also suppresses a
  cancellation of the *caller* that arrives while it waits. Use ``cancel_and_wait``.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and return once it has ended.

    An exception the task ended with is raised here (as ``await task`` would); its own
    cancellation is not. A cancellation of the caller propagates as usual.
    """
    if task is None:
        return
    task.cancel()
    await asyncio.wait((task,))
    if not task.cancelled():
        task.result()


async def wait_then_cancel(task: asyncio.Task[Any]) -> None:
    """Cancel ``task``, wait until it has ended and ignore how it ended (its exception
    is retrieved so that asyncio does not log it as never retrieved)."""
    task.cancel()
    await asyncio.wait((task,))
    if not task.cancelled():
        task.exception()
