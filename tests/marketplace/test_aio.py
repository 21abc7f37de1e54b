"""marketplace.aio: cancelling a task without losing the caller's own cancellation."""

from __future__ import annotations

import asyncio

import pytest

from marketplace.aio import cancel_and_wait, wait_then_cancel


async def _slow_to_stop(cleaning: asyncio.Event) -> None:
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        cleaning.set()
        await asyncio.sleep(0.2)  # cleanup that takes a while
        raise


async def test_cancel_and_wait_waits_for_the_task_to_end() -> None:
    cleaning = asyncio.Event()
    task = asyncio.create_task(_slow_to_stop(cleaning))
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.cancelled() and cleaning.is_set()


async def test_a_cancelled_caller_stays_cancelled() -> None:
    """The pattern it replaces (``with suppress(CancelledError): await task``) returned
    normally here, so whoever cancelled the caller waited on it forever."""
    cleaning = asyncio.Event()
    task = asyncio.create_task(_slow_to_stop(cleaning))
    await asyncio.sleep(0)
    caller = asyncio.create_task(cancel_and_wait(task))
    await cleaning.wait()  # the caller is now waiting for the task's cleanup
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.wait((task,))


async def test_cancel_and_wait_raises_what_the_task_raised() -> None:
    async def fails_on_cancel() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    task = asyncio.create_task(fails_on_cancel())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="cleanup failed"):
        await cancel_and_wait(task)
    await cancel_and_wait(None)  # nothing to cancel


async def test_wait_then_cancel_ignores_how_the_task_ended() -> None:
    async def fails() -> None:
        raise RuntimeError("ignored")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await wait_then_cancel(task)
    assert task.done() and not task.cancelled()
