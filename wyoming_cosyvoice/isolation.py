"""Process isolation for engines: a pool of warm child processes runs an engine's blocking load and render, so a
crash in native code fails one request instead of ending the server; dead children are replaced, within a bound."""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .child import Child, ChildDied, ChildHung, ChildSpec
from .errors import CosyVoiceServiceError, EngineCrashed, EngineUnavailable
from .handoff import RequestCancelled

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Isolation:
    """How a `ThreadedEngine` runs in child processes (its `isolation` attribute; None: on threads in the server)."""

    processes: int = 1
    """Warm child processes, each serving one request at a time (the engine's concurrency)."""

    max_restarts: int = 10
    """Children lost (crashed, killed) within `window_s` before no more are started: requests are then refused
    with EngineCrashed until the oldest loss is `window_s` old."""

    window_s: float = 60.0
    """The crash-loop window."""

    stop_grace_s: float = 2.0
    """Seconds a child has to stop after its request was cancelled (client gone); then it is killed and replaced."""

    start_timeout_s: float = 120.0
    """Seconds a child may take to load the engine."""

    def __post_init__(self) -> None:
        if self.processes < 1 or self.max_restarts < 1:
            raise ValueError("Isolation needs at least one process and one restart")


def _portable(options: Any) -> Any:
    """Request options without their callbacks (`SynthesisOptions.started`): those run in the server, and a
    function cannot cross to a child."""
    if not dataclasses.is_dataclass(options) or isinstance(options, type):
        return options
    changes = {f.name: None for f in dataclasses.fields(options) if callable(getattr(options, f.name))}
    return dataclasses.replace(options, **changes) if changes else options


def _how(err: BaseException) -> str:
    """What happened to a child, for a log or error line: "died (SIGSEGV)", "did not load within 120 s"."""
    return f"died ({err})" if isinstance(err, ChildDied) else str(err)


class ChildPool:
    """`Isolation.processes` warm children of one engine. A worker thread checks one out per request or call and
    gives it back; a child that dies is replaced at once (its request gets one EngineCrashed line), unless the
    crash-loop bound is reached. Thread-safe; every method but `health` blocks (worker threads call them)."""

    def __init__(self, engine: str, spec: ChildSpec, policy: Isolation) -> None:
        self.engine = engine
        self.spec = spec
        self.policy = policy
        self.restarts = 0
        """Children lost since the start (each one replaced unless the bound held it back)."""
        self._lock = threading.Lock()
        self._idle: list[Child] = []
        self._busy: set[Child] = set()
        self._losses: "collections.deque[float]" = collections.deque()  # when children were lost, in the window
        self._last_loss = ""
        self._loop_logged_until = 0.0
        self._serial = 0
        self._closed = False

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> dict[str, Any]:
        """Start every child and wait until each has loaded the engine; the engine's audio facts. A child that
        cannot load raises its own error (EngineUnavailable when the child died or hung) and nothing is left."""
        children = [self._new_child() for _ in range(self.policy.processes)]
        try:
            facts = [self._ready(child) for child in children]
        except BaseException:
            for child in children:
                child.kill()
                child.release()
            raise
        with self._lock:
            self._idle.extend(children)
        return facts[0]

    def _ready(self, child: Child) -> dict[str, Any]:
        try:
            return child.wait_ready(self.policy.start_timeout_s)
        except (ChildDied, ChildHung) as err:
            raise EngineUnavailable(f"{self.engine} engine: its worker process {_how(err)} while loading") from None
        except CosyVoiceServiceError:
            raise
        except Exception as err:
            raise EngineUnavailable(
                f"{self.engine} engine could not load in its worker process: {type(err).__name__}: {err}"
            ) from None

    def close(self) -> None:
        """Stop every child: idle ones are asked to exit, busy ones are killed (the server is going away)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            busy = list(self._busy)
        for child in busy:
            child.kill()
        for child in idle:
            child.stop()
        for child in idle:
            child.release()

    def pids(self) -> list[int]:
        """Process ids of the children now running (for tests and `health`)."""
        with self._lock:
            return sorted(c.pid for c in [*self._idle, *self._busy] if c.pid is not None)

    def health(self) -> dict[str, Any]:
        """Facts for the engine's health: processes ready, restarts, and the crash-loop refusal if it holds."""
        now = time.monotonic()
        with self._lock:
            facts: dict[str, Any] = {
                "isolation": "process",
                "processes": f"{sum(1 for c in self._idle if c.loaded()) + len(self._busy)}/{self.policy.processes}",
                "restarts": self.restarts,
            }
            if self._refusing(now):
                facts["state"] = self._refusal(now)
        return facts

    # --- requests -------------------------------------------------------------------------------------

    def render(
        self,
        request_id: str,
        request: tuple[str, Any, Any],
        emit: Callable[[bytes], None],
        cancel: threading.Event,
        alive: Callable[[], None],
    ) -> None:
        """Make one request's audio (text, profile, options) in a child, passing each chunk to `emit`. While it
        waits for a child to load (one replacing a crashed one), `alive` says so: that is no hung engine."""

        def waiting() -> None:
            if cancel.is_set():
                raise RequestCancelled()
            alive()

        text, profile, options = request
        child = self._checkout(waiting)
        try:
            child.render(self._next_id(), (text, profile, _portable(options)), emit, cancel, self.policy.stop_grace_s)
        except ChildDied as died:
            self._lost(child, f"died ({died}) during request {request_id or '?'}")
            raise EngineCrashed(
                f"{self.engine} engine: its worker process died ({died}) while making this audio; it was "
                "replaced and other requests go on"
            ) from None
        except ChildHung as hung:
            self._lost(child, f"{hung} (request {request_id or '?'}); killed")
            raise RequestCancelled() from None
        except BaseException:
            self._checkin(child)  # the engine's own error: the child is fine
            raise
        self._checkin(child)

    def call(self, name: str, args: tuple[Any, ...], timeout: Optional[float]) -> Any:
        """Run the engine's method `name(*args)` in one child (voice preparation); its result."""
        child = self._checkout()
        try:
            result = child.call(name, args, timeout)
        except (ChildDied, ChildHung) as err:
            how = _how(err)
            self._lost(child, f"{how} in {name}")
            raise EngineCrashed(f"{self.engine} engine: its worker process {how} in {name}; it was replaced") from None
        except BaseException:
            self._checkin(child)
            raise
        self._checkin(child)
        return result

    def _next_id(self) -> int:
        with self._lock:
            self._serial += 1
            return self._serial

    def _new_child(self) -> Child:
        return Child(self.spec, f"{self.engine}-child-{self._next_id()}")

    def _checkout(self, tick: Optional[Callable[[], None]] = None) -> Child:
        """A loaded child for one request: an idle one (loaded ones first), else a new one; each that fails to
        load counts as lost, so this ends at the crash-loop bound at the latest. `tick` runs while it waits."""
        while True:
            with self._lock:
                if self._closed:
                    raise EngineUnavailable(f"{self.engine} engine is closed")
                child = next((c for c in self._idle if c.loaded()), None) or next(iter(self._idle), None)
                if child is not None:
                    self._idle.remove(child)
                    self._busy.add(child)
                elif self._refusing(time.monotonic()):
                    raise EngineCrashed(self._refusal(time.monotonic()))
            if child is None:
                child = self._new_child()
                with self._lock:
                    self._busy.add(child)
            try:
                child.wait_ready(self.policy.start_timeout_s, tick)
                return child
            except RequestCancelled:  # the request is gone; the child goes on loading for the next one
                self._checkin(child)
                raise
            except (ChildDied, ChildHung) as err:
                self._lost(child, f"{_how(err)} while loading")
            except BaseException as err:  # the engine's load failed in the child (a library gone since start)
                self._lost(child, f"could not load the engine: {type(err).__name__}: {err}")

    def _checkin(self, child: Child) -> None:
        """A child back from a request: idle again, or stopped when the pool is closed or has one too many (one
        started while a killed child's request was still winding down)."""
        with self._lock:
            self._busy.discard(child)
            if not self._closed and len(self._idle) + len(self._busy) < self.policy.processes:
                self._idle.append(child)
                return
        child.stop()
        child.release()

    def _lost(self, child: Child, how: str) -> None:
        """A child is gone (or killed): count it, log it, free its pipe and handle, start its replacement."""
        child.kill()
        child.release()
        now = time.monotonic()
        with self._lock:
            self._busy.discard(child)
            self.restarts += 1
            self._losses.append(now)
            self._last_loss = how
            refusing = self._refusing(now)
            replace = not self._closed and not refusing and len(self._idle) + len(self._busy) < self.policy.processes
            loop_line = ""
            if refusing and now >= self._loop_logged_until:  # once per window
                self._loop_logged_until = now + self.policy.window_s
                loop_line = self._refusal(now)
        if self._closed:
            return
        _LOGGER.warning("%s engine: worker process %s %s", self.engine, child.pid, how)
        if loop_line:
            _LOGGER.error("%s", loop_line)
        if replace:
            fresh = self._new_child()  # it loads while the pool goes on; the next checkout waits for it if needed
            with self._lock:
                if self._closed:
                    closed = True
                else:
                    closed = False
                    self._idle.append(fresh)
            if closed:
                fresh.kill()
                fresh.release()

    def _refusing(self, now: float) -> bool:
        """True while `max_restarts` children were lost within the window (call with the lock held)."""
        while self._losses and now - self._losses[0] >= self.policy.window_s:
            self._losses.popleft()
        return len(self._losses) >= self.policy.max_restarts

    def _refusal(self, now: float) -> str:
        wait = self.policy.window_s - (now - self._losses[0]) if self._losses else 0.0
        return (
            f"{self.engine} engine: crash loop: {len(self._losses)} worker processes lost within "
            f"{self.policy.window_s:g} s (last: {self._last_loss}); none is started for {max(wait, 0.0):.0f} s "
            "and requests are refused meanwhile"
        )
