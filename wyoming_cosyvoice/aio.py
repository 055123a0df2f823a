"""asyncio helpers that keep cancellation intact."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Iterator, Optional, TypeVar

T = TypeVar("T")
F = TypeVar("F", bound="asyncio.Future[Any]")


class TaskSet:
    """Background tasks held until they end (asyncio keeps only weak references to running tasks), so that their
    owner can wait for them or cancel them."""

    def __init__(self) -> None:
        self._tasks: set["asyncio.Future[Any]"] = set()

    def add(self, task: F) -> F:
        """Hold `task` until it ends; `task` itself."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __iter__(self) -> Iterator["asyncio.Future[Any]"]:
        """The tasks not ended yet (a copy: iterating while they end is safe)."""
        return iter(list(self._tasks))

    def __len__(self) -> int:
        return len(self._tasks)

    def cancel(self) -> None:
        """Cancel every task still held."""
        for task in self:
            task.cancel()


def _retrieve(task: "asyncio.Future[Any]") -> None:
    """Mark a finished task's exception as seen: the caller who would have seen it left (cancelled or timed out)."""
    if not task.cancelled():
        task.exception()


async def wait_within(awaitable: Awaitable[T], timeout: Optional[float]) -> T:
    """Await `awaitable` for at most `timeout` s (None: no limit); asyncio.TimeoutError when it takes longer.

    Unlike `asyncio.wait_for` before Python 3.12, this never swallows a cancellation of the caller that arrives
    just as the awaitable completes (which left a cancelled connection's synthesis running to the end). When the
    caller is cancelled or times out, the awaitable is cancelled and whatever it ends with is retrieved, so no
    "Task exception was never retrieved" is logged for it.
    """
    if timeout is None:
        return await awaitable
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except BaseException:
        task.cancel()
        task.add_done_callback(_retrieve)
        raise
    if not done:
        task.cancel()
        task.add_done_callback(_retrieve)
        raise asyncio.TimeoutError()
    return task.result()
