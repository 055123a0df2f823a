"""`aio.wait_within`: a caller that is cancelled or times out leaves no unretrieved task exception behind (the
"Task exception was never retrieved" tracebacks of studio churn)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from wyoming_cosyvoice.aio import wait_within


async def _unretrieved(caller_ends: str) -> list[str]:
    """Run wait_within over a coroutine that fails while being cancelled; the loop's exception reports after."""
    loop = asyncio.get_running_loop()
    reports: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reports.append(context))
    started, finished = asyncio.Event(), asyncio.Event()

    async def fails_when_cancelled() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None  # an engine call's clean-up can fail like this
        finally:
            finished.set()

    try:
        if caller_ends == "cancelled":
            caller = asyncio.ensure_future(wait_within(fails_when_cancelled(), 30.0))
            await started.wait()
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
        else:
            with pytest.raises(asyncio.TimeoutError):
                await wait_within(fails_when_cancelled(), 0.01)
        await finished.wait()
        await asyncio.sleep(0)  # the task object settles one step after its coroutine ends
        gc.collect()  # the report is made when the unretrieved task is collected
        return [str(r.get("message")) for r in reports]
    finally:
        loop.set_exception_handler(None)


@pytest.mark.parametrize("caller_ends", ["cancelled", "timed out"])
async def test_no_unretrieved_exception_when_the_caller_leaves(caller_ends: str) -> None:
    assert await _unretrieved(caller_ends) == []


async def test_result_and_exception_pass_through() -> None:
    async def value() -> int:
        return 7

    async def boom() -> None:
        raise ValueError("boom")

    assert await wait_within(value(), 1.0) == 7
    with pytest.raises(ValueError, match="boom"):
        await wait_within(boom(), 1.0)
