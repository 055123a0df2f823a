"""When the model parks and wakes: the states and the idle deadline (pure `Machine`), and the asyncio `Keeper`.

States: ready -> parking -> parked -> waking -> ready. The model parks after `keep_alive` seconds with no request in
flight and no reply open (a streamed reply holds it between its sentences); a request, a reply opening or an explicit
`wake` starts one wake that every later request waits for; a request arriving while the model is parking asks the
park to stop early and wakes it once the park has returned. The Keeper does no model work itself: the engine hands
it `park` and `wake` coroutines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

_LOGGER = logging.getLogger(__name__)

READY, PARKING, PARKED, WAKING = "ready", "parking", "parked", "waking"

NEVER = -1.0
"""`keep_alive` that never parks by itself (explicit `park` still works)."""


class TransitionError(RuntimeError):
    """A lifecycle step that the current state does not allow (a bug in the caller)."""


@dataclass
class Machine:
    """The lifecycle's state and counters; every method is a pure step on them (the time is passed in)."""

    keep_alive: float = NEVER
    """Seconds idle before parking; -1 never, 0 as soon as idle."""

    state: str = READY
    in_flight: int = 0
    """Requests that need the model (waiting for it or using it)."""
    holds: int = 0
    """Replies open (between their sentences the model stays awake)."""
    idle_since: float = 0.0
    """When the last request ended or the last hold was released (or the model woke)."""
    park_wanted: bool = False
    """An explicit `park`: due as soon as no request is in flight, whatever `keep_alive` and the holds say."""
    stop_park: bool = False
    """A request arrived while parking: the park should return early."""
    wakes: int = 0
    parks: int = 0
    last_wake_s: Optional[float] = None
    """How long the last wake took."""

    def _to(self, state: str, *allowed: str) -> None:
        if self.state not in allowed:
            raise TransitionError(f"{self.state} -> {state} not allowed")
        self.state = state

    def deadline(self) -> Optional[float]:
        """When the model becomes due to park (None: not while things stand as they are)."""
        if self.state != READY or self.in_flight:
            return None
        if self.park_wanted:
            return self.idle_since
        if self.keep_alive < 0 or self.holds:
            return None
        return self.idle_since + self.keep_alive

    def due(self, now: float) -> bool:
        """True when the park should start now."""
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def request_begins(self) -> str:
        """A request needs the model: `run` (ready), `wake` (parked: the caller starts the wake), `wait` (waking or
        parking: the caller awaits the step in progress, then asks again)."""
        self.in_flight += 1
        return self.need()

    def need(self) -> str:
        """What a caller that needs the model does now (see `request_begins`); a park in progress is asked to stop."""
        if self.state == READY:
            return "run"
        if self.state == PARKED:
            self._to(WAKING, PARKED)
            return "wake"
        if self.state == PARKING:
            self.stop_park = True
        return "wait"

    def request_ends(self, now: float) -> None:
        """A request no longer needs the model."""
        if self.in_flight <= 0:
            raise TransitionError("request_ends without request_begins")
        self.in_flight -= 1
        if not self.in_flight:
            self.idle_since = now

    def hold(self) -> str:
        """A reply opens: like `need` (a parked model starts waking) and the model stays awake until `release`."""
        self.holds += 1
        return self.need()

    def release(self, now: float) -> None:
        """A reply ended (or its holder went away)."""
        self.holds = max(0, self.holds - 1)
        if not self.holds and not self.in_flight:
            self.idle_since = max(self.idle_since, now)

    def parking(self) -> None:
        """The park starts (the caller checked `due`)."""
        self._to(PARKING, READY)
        self.stop_park = False

    def parked(self, anything: bool, now: float) -> None:
        """The park returned: `anything` False when it stopped before changing anything (the model stays ready)."""
        self.park_wanted = False
        if anything:
            self._to(PARKED, PARKING)
            self.parks += 1
        else:
            self._to(READY, PARKING)
            self.idle_since = now
        self.stop_park = False

    def woke(self, seconds: float, now: float) -> None:
        """The wake finished: ready again."""
        self._to(READY, WAKING)
        self.wakes += 1
        self.last_wake_s = seconds
        self.idle_since = now

    def wake_failed(self) -> None:
        """The wake failed: still parked (the next request tries again)."""
        self._to(PARKED, WAKING)


class Keeper:
    """Runs the Machine on the event loop: the idle timer, one wake shared by every waiter, the park task."""

    def __init__(
        self,
        keep_alive: float,
        mode: str,
        park: Callable[[threading.Event], Awaitable[bool]],
        wake: Callable[[], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.machine = Machine(keep_alive, idle_since=clock())
        self.mode = mode
        """host or unload (for the reports)."""
        self._park, self._wake, self._clock = park, wake, clock
        self._step: Optional[asyncio.Task[Any]] = None  # the park or wake in progress
        self._stop_park = threading.Event()  # set for the park function (worker thread) when a request arrives
        self._changed: Optional[asyncio.Event] = None
        self._watch: Optional[asyncio.Task[None]] = None
        self._waiters: list[asyncio.Future[None]] = []
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.last_wake_at: Optional[float] = None
        """Wall-clock time the last wake finished."""
        self.last_wake_why = ""

    @property
    def state(self) -> str:
        """ready, parking, parked or waking."""
        return self.machine.state

    @property
    def label(self) -> str:
        """The state as reported: ready, parking, parked (host|unload) or waking."""
        state = self.machine.state
        return f"parked ({self.mode})" if state == PARKED else state

    def start(self) -> None:
        """Start the idle timer (on the running loop)."""
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self.machine.idle_since = self._clock()
        self._watch = self._loop.create_task(self._watcher(), name="cosyvoice keep-alive")

    async def close(self) -> None:
        """Stop the timer; a park or wake in progress is awaited (it runs on the engine's worker)."""
        for task in (self._watch, self._step):
            if task is not None and not task.done():
                if task is self._watch:
                    task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._watch = None

    def _nudge(self) -> None:
        if self._changed is not None:
            self._changed.set()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_until(self, settled: Callable[[], bool]) -> None:
        """Return once `settled()` holds, checked at every change of the lifecycle (bound it with a timeout)."""
        while not settled():
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter

    async def _watcher(self) -> None:
        assert self._changed is not None
        while True:
            deadline = self.machine.deadline()
            self._changed.clear()
            if deadline is None or deadline > self._clock():
                timeout = None if deadline is None else deadline - self._clock()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout)
                continue
            if self._step is None:
                self._stop_park.clear()
                self.machine.parking()  # now, not when the task first runs: a request arriving meanwhile waits
                self._begin(self._run_park())
            with contextlib.suppress(Exception):  # a failed wake is the waiting requests' to report
                await asyncio.shield(self._step)  # type: ignore[arg-type]

    def _begin(self, step: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(step)
        self._step = task

        def done(_: Any) -> None:
            if self._step is task:
                self._step = None
            self._nudge()

        task.add_done_callback(done)
        task.add_done_callback(_quiet)  # its failure reaches the requests awaiting it; none may be left to read it
        self._nudge()

    async def _run_park(self) -> None:
        machine = self.machine
        started = self._clock()
        anything = True  # a park that raised may have changed part of the model: the next request wakes it whole
        try:
            anything = await self._park(self._stop_park)
        except Exception:
            _LOGGER.exception("CosyVoice park failed; the next request wakes the model")
        finally:
            machine.parked(anything, self._clock())
        if anything:
            _LOGGER.info("CosyVoice parked (%s) in %.2f s", self.mode, self._clock() - started)

    async def _run_wake(self, why: str) -> None:
        started = self._clock()
        try:
            await self._wake()
        except BaseException:
            self.machine.wake_failed()
            raise
        seconds = self._clock() - started
        self.machine.woke(seconds, self._clock())
        self.last_wake_at, self.last_wake_why = time.time(), why
        _LOGGER.info("CosyVoice awake in %.2f s (%s; woken by %s)", seconds, self.mode, why)

    async def _settle(self, action: str, why: str) -> None:
        """Act on the machine's answer until the model is ready; the wake or park in progress is shared."""
        while action != "run":
            if action == "wake":
                self._begin(self._run_wake(why))
            elif self.machine.state == PARKING:
                self._stop_park.set()
            step = self._step
            if step is not None:
                await asyncio.shield(step)  # a waiter that leaves does not cancel the wake others wait for
            else:  # the step that answers this one has not begun yet: wait for a change, never spin
                await self.wait_until(self._moved_from(self.machine.state))
            action = self.machine.need()

    def _moved_from(self, state: str) -> Callable[[], bool]:
        return lambda: self.machine.state != state or self._step is not None

    @contextlib.asynccontextmanager
    async def request(self, why: str = "a request") -> AsyncIterator[None]:
        """Hold the model awake for a request: waits for (or starts) the wake; parking resumes when it ends."""
        action = self.machine.request_begins()
        self._nudge()
        try:
            await self._settle(action, why)
            yield
        finally:
            self.machine.request_ends(self._clock())
            self._nudge()

    def hold(self, why: str = "a reply opening") -> Callable[[], None]:
        """A reply opens: start waking now (not awaited) and stay awake until the returned release is called (or
        dropped: a holder that goes away without calling it releases on collection)."""
        action = self.machine.hold()
        if action == "wake":
            self._begin(self._run_wake(why))  # now: a request arriving next waits for this very wake
            action = "wait"
        if action != "run":
            waiter = asyncio.get_running_loop().create_task(self._settle(action, why), name="cosyvoice wake on reply")
            waiter.add_done_callback(_quiet)
        self._nudge()
        return _Hold(self)

    def _release(self) -> None:
        self.machine.release(self._clock())
        self._nudge()

    async def park_now(self) -> str:
        """Park as soon as no request is in flight (open replies do not stop it); the state after."""
        if self.machine.state != PARKED:
            self.machine.park_wanted = True
            self._nudge()
            await self.wait_until(lambda: not self.machine.park_wanted)
        return self.label

    async def wake_now(self, why: str = "a wake command") -> str:
        """Wake (or wait for the wake in progress); the state after."""
        self.machine.park_wanted = False
        action = self.machine.need()
        self._nudge()
        await self._settle(action, why)
        return self.label

    def facts(self) -> dict[str, Any]:
        """For health and describe: the state, keep_alive and the last wake."""
        facts: dict[str, Any] = {"lifecycle": self.label}
        keep = self.machine.keep_alive
        facts["keep_alive"] = "never" if keep < 0 else f"{keep:g} s ({self.mode})"
        if self.last_wake_at is not None and self.machine.last_wake_s is not None:
            at = time.strftime("%H:%M:%S", time.localtime(self.last_wake_at))
            facts["last_wake"] = f"{self.machine.last_wake_s:.2f} s at {at}"
        return facts


class _Hold:
    """The release a reply holds; called once, or on collection when its holder forgot."""

    def __init__(self, keeper: Keeper) -> None:
        loop = keeper._loop

        def release() -> None:  # may run on any thread (garbage collection): hand it to the loop
            if loop is None:
                keeper._release()
                return
            if loop.is_closed():
                return
            try:
                if asyncio.get_running_loop() is loop:
                    keeper._release()
                    return
            except RuntimeError:
                pass
            loop.call_soon_threadsafe(keeper._release)

        self._finalizer = weakref.finalize(self, release)
        self._finalizer.atexit = False  # at interpreter exit there is no model left to keep awake

    def __call__(self) -> None:
        self._finalizer()


def _quiet(task: "asyncio.Future[Any]") -> None:
    """A wake's failure is reported through the requests that need it, not as an unread task exception."""
    if not task.cancelled():
        task.exception()
