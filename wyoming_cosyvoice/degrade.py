"""The server's hard bound on requests at once, and degrading instead of refusing: the wait for room in a busy
engine (in arrival order, bounded) and the counts of what was degraded (docs/reliability.md)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Callable, Iterator, Optional

from .engine import Engine
from .errors import ServerBusy

RECHECK_S = 0.5
"""A waiting request looks at the engine's room again at least this often: most changes are announced (a request
leaving the engine), but the engine's measured costs may change without one."""

KINDS = ("waited", "fallback", "default_voice", "retried")
"""What the counters count: requests that waited for room; replies (partly) spoken by the fallback engine; replies
whose voice was not there and that the default voice spoke; engine calls tried again after a transient failure."""


class Degraded:
    """How often a reply was degraded instead of refused, since the start (health, `describe`, metrics)."""

    def __init__(self) -> None:
        self._counts = dict.fromkeys(KINDS, 0)

    def note(self, kind: str) -> None:
        """Count one `kind` (one of KINDS)."""
        if kind not in self._counts:
            raise ValueError(f"unknown degradation {kind!r}")
        self._counts[kind] += 1

    def counts(self) -> dict[str, int]:
        """A copy of the counts, by kind (every kind present)."""
        return dict(self._counts)

    def summary(self) -> str:
        """`waited 2, fallback 1, default_voice 0, retried 0` for log lines."""
        return ", ".join(f"{kind} {n}" for kind, n in self._counts.items())


class RoomQueue:
    """The requests waiting for room in one engine (`Engine.room`), let in one at a time in arrival order."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._waiting: collections.deque[object] = collections.deque()
        self._changed = asyncio.Event()
        engine.add_room_listener(self.notify)

    @property
    def waiting(self) -> int:
        """Requests waiting now."""
        return len(self._waiting)

    def notify(self) -> None:
        """Room may have changed: the first in line looks again."""
        self._changed.set()

    async def wait(self, bound: float, *, first: bool = False) -> tuple[Optional[str], float]:
        """(None, seconds waited) once this request is first in line and the engine has room; (why not, seconds
        waited) when `bound` seconds pass first. `first`: ahead of those waiting (the next piece of a reply already
        playing: a stream in flight goes before new requests). The caller starts the engine call right away, with
        no await in between, so the room it saw is still there."""
        if (first or not self._waiting) and self.engine.room() is None:
            return None, 0.0
        loop = asyncio.get_running_loop()
        started = loop.time()
        me = object()
        if first:
            self._waiting.appendleft(me)
        else:
            self._waiting.append(me)
        try:
            while True:
                why = self.engine.room() if self._waiting[0] is me else "waiting behind earlier requests"
                waited = loop.time() - started
                if why is None or waited >= bound:
                    return why, waited
                self._changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(bound - waited, RECHECK_S))
        finally:
            self._waiting.remove(me)
            self._changed.set()  # the next in line looks again (this one got in, gave up, or was cancelled)


class ConcurrencyLimit:
    """Bounds how many synthesis requests are in progress at once; the rest are refused with ServerBusy."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    @contextlib.contextmanager
    def slot(self, refused: Callable[[str], None] = lambda reason: None) -> Iterator[None]:
        """Hold one slot for the duration of a request (`refused("busy")` is called before a refusal)."""
        if self.active >= self.limit:
            refused("busy")
            raise ServerBusy(f"server busy: {self.active} requests in progress (limit {self.limit}); try again shortly")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
