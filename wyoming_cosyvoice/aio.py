"""asyncio helpers that keep cancellation intact."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Optional, TypeVar

T = TypeVar("T")


async def wait_within(awaitable: Awaitable[T], timeout: Optional[float]) -> T:
    """Await `awaitable` for at most `timeout` s (None: no limit); asyncio.TimeoutError when it takes longer.

    Unlike `asyncio.wait_for` before Python 3.12, this never swallows a cancellation of the caller that arrives
    just as the awaitable completes (which left a cancelled connection's synthesis running to the end).
    """
    if timeout is None:
        return await awaitable
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    finally:
        if not task.done():
            task.cancel()
    if not done:
        raise asyncio.TimeoutError()
    return task.result()
