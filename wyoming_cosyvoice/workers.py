"""Worker threads for engines: one thread per slot, and the slots requests hold while their thread works for them."""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")


class Worker:
    """One daemon thread that runs submitted calls in order; it can be abandoned (never joined) when it hangs."""

    def __init__(self, name: str) -> None:
        self._calls: "queue.SimpleQueue[Optional[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]]]" = (
            queue.SimpleQueue()
        )
        # Daemon: a thread wedged inside native code must not keep the process from exiting.
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def submit(self, func: Callable[..., T], *args: Any) -> "Future[T]":
        """Queue `func(*args)`; the returned future completes when it has run."""
        future: "Future[T]" = Future()
        self._calls.put((future, func, args))
        return future

    def stop(self) -> None:
        """Let the thread exit after the calls already queued."""
        self._calls.put(None)

    def _loop(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            future, func, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = func(*args)
            except BaseException as err:  # handed to whoever awaits the future
                future.set_exception(err)
            else:
                future.set_result(result)
            del future, func, args, item


class Slots:
    """`size` numbered slots, each served by its own worker thread; a request holds one slot while its thread works
    for it, and an exclusive call (loading the model) holds all of them. Waiters are served first come, first served,
    and a waiting exclusive call goes before requests that arrive after it."""

    def __init__(self, size: int = 1) -> None:
        self.size = size
        self._free: list[int] = list(range(size))
        self._exclusive = False
        self._waiters: "list[tuple[bool, asyncio.Future[Optional[int]]]]" = []  # (exclusive, future), in order

    @property
    def held(self) -> int:
        """Slots held now (all of them while an exclusive call runs)."""
        return self.size if self._exclusive else self.size - len(self._free)

    @property
    def waiting(self) -> int:
        """Callers waiting for a slot (or for all of them)."""
        return sum(1 for _, future in self._waiters if not future.done())

    def resize(self, size: int) -> None:
        """Change the number of slots (only while none is held: at start, under an exclusive hold)."""
        if self.size - len(self._free) and not self._exclusive:
            raise RuntimeError("slots resized while held")
        self.size = size
        self._free = [] if self._exclusive else list(range(size))

    async def acquire(self) -> int:
        """Wait for a free slot and hold it; its number."""
        if self._free and not self._exclusive and not self._waiters:
            return self._free.pop(0)
        future: "asyncio.Future[Optional[int]]" = asyncio.get_running_loop().create_future()
        self._waiters.append((False, future))
        try:
            slot = await future
        except BaseException:
            self._forget(future)
            raise
        assert slot is not None
        return slot

    async def acquire_all(self) -> None:
        """Wait until no slot is held and hold them all (for calls that must not overlap any request)."""
        if len(self._free) == self.size and not self._exclusive and not self._waiters:
            self._exclusive, self._free = True, []
            return
        future: "asyncio.Future[Optional[int]]" = asyncio.get_running_loop().create_future()
        self._waiters.append((True, future))
        try:
            await future
        except BaseException:
            self._forget(future)
            raise

    def release(self, slot: int) -> None:
        """Give a slot back."""
        if slot < self.size and slot not in self._free:
            self._free.append(slot)
            self._free.sort()
        self._serve()

    def release_all(self) -> None:
        """End an exclusive hold."""
        self._exclusive = False
        self._free = list(range(self.size))
        self._serve()

    def _forget(self, future: "asyncio.Future[Optional[int]]") -> None:
        """A waiter gave up (cancelled); a slot already handed to it goes back."""
        self._waiters = [(e, f) for e, f in self._waiters if f is not future]
        if future.done() and not future.cancelled():
            slot = future.result()
            if slot is None:
                self.release_all()
            else:
                self.release(slot)

    def _serve(self) -> None:
        while self._waiters and not self._exclusive:
            exclusive, future = self._waiters[0]
            if future.done():  # cancelled while queued
                self._waiters.pop(0)
                continue
            if exclusive:
                if len(self._free) != self.size:
                    return  # it waits for the held slots; later arrivals wait behind it
                self._waiters.pop(0)
                self._exclusive, self._free = True, []
                future.set_result(None)
            elif self._free:
                self._waiters.pop(0)
                future.set_result(self._free.pop(0))
            else:
                return
