"""One request's hand-off from the worker thread that makes its audio to the event loop that sends it."""

from __future__ import annotations

import asyncio
import collections
import enum
import threading
import time
from typing import Any, Optional

from .aio import wait_within

ALIVE_INTERVAL_S = 0.5
"""A worker that waits on a shared resource says so at most this often (a wake-up of the loop each time)."""


class HandoffKind(str, enum.Enum):
    """What an item handed from the worker to the loop is (a str, so it reads and logs as its value)."""

    STARTED = "started"
    """The worker began the request."""
    CHUNK = "chunk"
    """PCM bytes."""
    ERROR = "error"
    """The exception the worker ended with."""
    END = "end"
    """The worker is done with the request (always the last item)."""
    ALIVE = "alive"
    """The worker waits on something shared, not hung: only restarts the consumer's inactivity timer."""


class RequestCancelled(Exception):
    """Raised inside the worker thread when the request was cancelled (client gone)."""


class Handoff:
    """Items from one worker thread to one consumer on the loop, with backpressure.

    A deque plus at most one scheduled wake-up of the loop at a time, so a worker that runs ahead costs no loop
    wake-up (self-pipe write) per chunk and the consumer no await per chunk. The worker waits once `limit` bytes of
    audio are ahead of the consumer, until the consumer is back under `limit // 2` (the low-water mark): then it
    goes on in a burst instead of one wake-up per chunk taken. Items are (HandoffKind, value).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self.cancel = threading.Event()
        """Set when the consumer is gone (or gave up): the worker stops at its next chunk."""
        self._loop = loop
        self._pending: "collections.deque[tuple[HandoffKind, Any]]" = collections.deque()
        self._ready = asyncio.Event()
        self._wake_lock = threading.Lock()
        self._wake_scheduled = False
        self._room = threading.Condition()
        self._ahead = 0  # bytes handed to the loop and not yet taken by the consumer
        self.limit = limit
        self.low_water = limit // 2
        self._alive_at = 0.0

    # --- worker side --------------------------------------------------------------------------------

    def post(self, kind: HandoffKind, item: Any = None) -> None:
        """Hand an item to the consumer (any thread); wakes the loop unless a wake-up is already on its way."""
        self._pending.append((kind, item))
        with self._wake_lock:
            if self._wake_scheduled:
                return  # the wake-up already on its way finds this item too
            self._wake_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # event loop closed: nobody is listening any more
            self.cancel.set()

    def emit(self, pcm: bytes) -> None:
        """Hand a chunk of audio over, first waiting while the consumer is `limit` bytes behind; RequestCancelled when
        the consumer is gone."""
        if not pcm:
            return
        with self._room:
            if self._ahead >= self.limit:
                while self._ahead > self.low_water:
                    if self.cancel.is_set():
                        raise RequestCancelled()
                    self._room.wait(0.1)
            self._ahead += len(pcm)
        if self.cancel.is_set():
            raise RequestCancelled()
        self.post(HandoffKind.CHUNK, pcm)

    def alive(self) -> None:
        """The worker is waiting on something shared (another request's model pass), not hung: restart the
        consumer's inactivity timer (at most every ALIVE_INTERVAL_S)."""
        now = time.monotonic()
        if now - self._alive_at >= ALIVE_INTERVAL_S:
            self._alive_at = now
            self.post(HandoffKind.ALIVE)

    # --- loop side ----------------------------------------------------------------------------------

    def _wake(self) -> None:
        with self._wake_lock:
            self._wake_scheduled = False
        self._ready.set()

    async def take(self, timeout: Optional[float]) -> tuple[HandoffKind, Any]:
        """The next item other than ALIVE; asyncio.TimeoutError when nothing came for `timeout` s."""
        if self._pending:
            await asyncio.sleep(0)  # a turn for the other streams between chunks, as when waiting for one
        while True:
            while not self._pending:
                self._ready.clear()
                if self._pending:  # posted between the check and the clear
                    break
                await wait_within(self._ready.wait(), timeout)
            kind, item = self._pending.popleft()
            if kind != HandoffKind.ALIVE:
                return kind, item

    def taken(self, nbytes: int) -> None:
        """The consumer took a chunk of `nbytes`: wake a waiting worker once it is back under the low-water mark."""
        with self._room:
            self._ahead -= nbytes
            if self._ahead <= self.low_water:  # one wake-up for a burst, not one per chunk
                self._room.notify()
