"""Engine protocol, audio chunk and options values, and the worker-thread bridge: slots, timeouts, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import sys
import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Iterator, Optional, TypeVar

from .aio import TaskSet, wait_within
from .audio import AudioFormat
from .errors import CosyVoiceServiceError, EngineError, EngineOutOfMemory, EngineTimeout, EngineUnavailable
from .handoff import Handoff, HandoffKind, RequestCancelled
from .isolation import ChildPool, ChildSpec, Isolation
from .workers import Slots, Worker

if TYPE_CHECKING:
    from .voices import VoiceProfile

_LOGGER = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class PcmChunk:
    """A piece of synthesized audio: little-endian signed PCM (not wyoming's `AudioChunk` event)."""

    audio: bytes
    """Raw PCM samples."""

    rate: int
    """Samples per second."""

    width: int = 2
    """Bytes per sample."""

    channels: int = 1
    """Interleaved channels."""

    @property
    def format(self) -> AudioFormat:
        """The chunk's audio format."""
        return AudioFormat(self.rate, self.width, self.channels)

    @property
    def samples(self) -> int:
        """Number of sample frames in this chunk."""
        return len(self.audio) // (self.width * self.channels)

    @property
    def seconds(self) -> float:
        """Duration of this chunk in seconds."""
        return self.samples / self.rate


AudioChunk = PcmChunk
"""Deprecated: the old name of `PcmChunk`, kept for engine plugins outside this repository."""

Cancelled = RequestCancelled
"""Deprecated: the old name of `RequestCancelled`, kept for engine plugins outside this repository."""


@dataclass(frozen=True)
class SynthesisOptions:
    """Per-request options that are not part of the voice profile."""

    speed: float = 1.0
    """Speaking-rate multiplier (1.0 = the voice's natural rate)."""

    request_id: str = ""
    """Identifier used in log lines."""

    timeout: Optional[float] = None
    """Seconds the engine may go without producing audio before the request fails (None: no limit)."""

    started: Optional[Callable[[], None]] = None
    """Called (on the loop) when the engine starts on the request after waiting for a worker (the queue wait ends)."""


class Engine(ABC):
    """A TTS engine: fixed output format per instance, async streaming synthesis."""

    name: str = "engine"
    """Engine name as registered."""

    sample_rate: int = 22050
    """Output sample rate (fixed per instance)."""

    sample_width: int = 2
    """Output bytes per sample (16-bit)."""

    channels: int = 1
    """Output channels (mono)."""

    @property
    def audio_format(self) -> AudioFormat:
        """The format of every chunk this engine makes (from the three attributes above, which plugins set)."""
        return AudioFormat(self.sample_rate, self.sample_width, self.channels)

    async def start(self) -> None:
        """Load the model; called once before serving."""

    async def prepare(self, profiles: Iterable["VoiceProfile"]) -> None:
        """Precompute and cache per-voice data for `profiles`."""

    async def forget(self, profile_names: Iterable[str]) -> None:
        """Drop per-voice data kept for these profiles: removed, or changed and about to be prepared again.

        Optional (default: nothing is kept). An engine whose model owns that data does it on its worker thread
        (`run_in_worker`); data shared with profiles still in use stays, and so may caches keyed by content.
        """

    async def warmup(self) -> None:
        """Run a throwaway synthesis so the first real request is fast."""

    def health(self) -> dict[str, Any]:
        """Engine facts for logs, `describe` and the health command (cheap, non-blocking)."""
        return {"engine": self.name, "sample_rate": self.sample_rate}

    def reply_opening(self) -> Optional[Callable[[], None]]:
        """A reply this engine will serve is opening (called on the loop at `synthesize-start`, before any text):
        an engine that parks its model when idle starts waking it now, so the wake overlaps the text's arrival, and
        may return a release to call when the reply ends (the model stays awake until then). Cheap; default none."""
        return None

    async def park(self) -> Optional[str]:
        """Free the model's (GPU) memory until the next request; the engine's state after, or None when this engine
        does not park (the default)."""
        return None

    async def wake(self) -> Optional[str]:
        """Undo `park` now rather than at the next request; the state after, or None when this engine does not park."""
        return None

    def heard_as(self, profile: "VoiceProfile") -> str:
        """What a listener hears when this engine speaks `profile`, in a few words ("cloned", "espeak voice for
        de-DE"), once it is ready: the studio, `voices add` and `voices list` show it. Default: the engine."""
        return f"spoken by the {self.name} engine"

    def cannot_start(self) -> Optional[str]:
        """Why `start()` would fail here, judged cheaply without loading anything (settings, files); None when it
        may start. `voices list` / `voices add` use it to say what a server would do. Default: None."""
        return None

    def room(self) -> Optional[str]:
        """None when one more request may start now; else why not, in one line (every slot and the queue taken, or
        one more stream would make those in flight fall behind real time). The service waits, in order and bounded,
        while it says no (`server.busy_wait_s`); `synthesize` called regardless raises ServerBusy. Default: room."""
        return None

    def add_room_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener` (on the event loop) whenever a request leaves the engine, so `room` may have changed.
        Default: never (an engine whose `room` is always None has nothing to announce)."""

    @abstractmethod
    def synthesize(self, text: str, profile: "VoiceProfile", options: SynthesisOptions) -> AsyncIterator[PcmChunk]:
        """Stream audio for `text` in `profile`'s voice; closing the iterator cancels the work."""

    async def close(self) -> None:
        """Release the model and threads."""


ENGINE_PARK, ENGINE_WAKE, ENGINE_STATE = "engine-park", "engine-wake", "engine-state"
"""This server's own Wyoming events (not the protocol's): park or wake the engines that park (`Engine.park`);
answered with `engine-state`, data `{"engines": {name: state}}`."""

OOM_MARKERS = ("out of memory", "cuda error: out of memory", "cublas_status_alloc_failed")
"""Lower-case message fragments that identify a (GPU) out-of-memory failure."""


def is_out_of_memory(err: BaseException) -> bool:
    """True for torch.OutOfMemoryError / torch.cuda.OutOfMemoryError and RuntimeError('CUDA out of memory...')."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in OOM_MARKERS)


WORKER_CALL_TIMEOUT: "contextvars.ContextVar[Optional[float]]" = contextvars.ContextVar(
    "worker_call_timeout", default=None
)
"""Seconds a `run_in_worker` call may take in this context before its worker counts as hung (None: no limit).

Set around voice preparation (`VoicePreparer`), so an engine's `prepare` is bounded without knowing it; model
loading and shutdown run outside it and keep their own limits."""


@contextlib.contextmanager
def worker_call_timeout(seconds: Optional[float]) -> Iterator[None]:
    """Bound every `run_in_worker` call made inside this block (and the tasks it starts) to `seconds`."""
    token = WORKER_CALL_TIMEOUT.set(seconds)
    try:
        yield
    finally:
        WORKER_CALL_TIMEOUT.reset(token)


MAX_AHEAD_SECONDS = 30.0
"""Audio the worker may make ahead of what the client has taken; beyond it the worker waits (so a stalled reader
holds at most this much). Generous on purpose: a waiting worker holds up every other request."""


class ThreadedEngine(Engine):
    """An engine whose model lives in worker threads; requests queue for a slot and cancel between chunks.

    `concurrency` slots (1 unless the engine sets more with `set_concurrency`), each served by its own thread: a
    request holds a slot while its thread makes its audio, so at most that many run at once and the rest wait in
    arrival order. A request whose engine produces nothing for `SynthesisOptions.timeout` seconds fails with
    EngineTimeout and the thread of its slot is replaced by a fresh one (the stuck thread is abandoned: Python
    cannot kill it; it exits at its next chunk boundary if it ever returns); the other slots go on. An out-of-memory
    error calls `release_memory()` on the request's thread before its slot is free again.

    With `isolation` set (docs/reliability.md, "Native engine crashes"), `load` and `render` run in warm child
    processes instead (isolation.py), one per slot: each slot's thread relays its request to a child, so a crash in
    native code fails that request with EngineCrashed and the child is replaced; everything above stays the same.

    Its size (over the ~300 lines the layout asks for): the slots, the per-slot threads, the hung-call watch, the
    out-of-memory clean-up and the child-process relay share the slot's state and its one cancellation path; apart,
    each would reach into the others' fields.
    """

    isolation: Optional[Isolation] = None
    """None: `load` and `render` run on this process's worker threads. An `Isolation`: in that many child
    processes (set it in `__init__`, before `start`, and implement `child_args`)."""

    def __init__(self) -> None:
        self._slots = Slots(1)
        self._workers: dict[int, Worker] = {}
        self._running: set[Handoff] = set()  # requests whose thread is making their audio now
        self._running_lock = threading.Lock()
        self._local = threading.local()
        self._in_flight = 0
        self._queued = 0
        self.restarts = 0
        """How many times a hung worker thread was replaced."""
        self._room_listeners: list[Callable[[], None]] = []
        self._recoveries = TaskSet()
        self._pool: Optional[ChildPool] = None

    def load(self) -> None:
        """Blocking: load what `render` needs and set `sample_rate` (default: nothing). The default `start` runs it
        on a worker thread, or in each child process with `isolation` set."""

    def child_args(self) -> tuple[Any, ...]:
        """Picklable arguments that rebuild this engine in a child process as `type(self)(*child_args())`
        (process isolation only; typically the engine's settings)."""
        raise NotImplementedError(f"{type(self).__name__} sets `isolation` but does not implement child_args()")

    async def start(self) -> None:
        """Load the engine: `load` on a worker thread, or in `isolation.processes` warm child processes."""
        if self.isolation is None:
            await self.run_in_worker(self.load, exclusive=True)
            return
        try:
            spec = ChildSpec.of(type(self), self.child_args())
        except Exception as err:  # unpicklable settings, no child_args: a plugin's mistake, said in one line
            raise EngineUnavailable(f"{self.name} engine: cannot run in a child process: {err}") from None
        self.set_concurrency(self.isolation.processes)
        pool = ChildPool(self.name, spec, self.isolation)
        facts = await self.run_in_worker(pool.start, exclusive=True)
        self._pool = pool
        self.sample_rate, self.sample_width, self.channels = (
            facts["sample_rate"],
            facts["sample_width"],
            facts["channels"],
        )

    def child_pids(self) -> list[int]:
        """Process ids of this engine's child processes (none without isolation)."""
        return self._pool.pids() if self._pool is not None else []

    def health(self) -> dict[str, Any]:
        """Engine facts, with the child processes' (ready, restarts, a crash loop) under process isolation."""
        facts = super().health()
        if self._pool is not None:
            facts.update(self._pool.health())
        return facts

    def add_room_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener` whenever a request gives its slot back (see Engine.add_room_listener)."""
        self._room_listeners.append(listener)

    def _room_changed(self) -> None:
        for listener in self._room_listeners:
            try:
                listener()
            except Exception:  # a listener's bug must not keep the slot from being released
                _LOGGER.exception("%s engine: room listener failed", self.name)

    @property
    def concurrency(self) -> int:
        """Requests that may run at once (one worker thread each)."""
        return self._slots.size

    def set_concurrency(self, size: int) -> None:
        """Run up to `size` requests at once (call while no request holds a slot, e.g. in `start`)."""
        self._slots.resize(max(1, int(size)))

    @property
    def busy(self) -> bool:
        """True while a worker thread makes a request's audio."""
        return bool(self._running)

    @property
    def in_flight(self) -> int:
        """Requests holding a slot (their worker thread is making their audio)."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Requests waiting for a free slot."""
        return self._queued

    def _worker_for(self, slot: int) -> Worker:
        worker = self._workers.get(slot)
        if worker is None:
            suffix = f"worker-{self.restarts}" if slot == 0 else f"slot{slot}-{self.restarts}"
            worker = self._workers[slot] = Worker(f"{self.name}-{suffix}")
        return worker

    def replace_worker(self, reason: str, slot: int = 0) -> None:
        """Abandon the thread of `slot` (hung) and start that slot's next request on a fresh one."""
        old = self._workers.pop(slot, None)
        self.restarts += 1
        if old is not None:
            old.stop()
            _LOGGER.error("%s engine: worker thread %s replaced (%s)", self.name, old.thread.name, reason)

    def _abandon(self, slot: int, worker: Worker, handoff: Handoff, release: Callable[[], None], reason: str) -> None:
        """Give up on `worker` (hung): the slot's next request runs on a fresh thread; the slot is free again."""
        if self._workers.get(slot) is worker:
            self.replace_worker(reason, slot)
        with self._running_lock:
            self._running.discard(handoff)
        try:
            self.request_abandoned(handoff.cancel)
        finally:
            release()  # the abandoned thread no longer counts as working for a request

    def request_abandoned(self, cancel: threading.Event) -> None:
        """Called on the loop when the thread of the request whose cancel flag is `cancel` was given up (hung):
        an engine frees what that request held that others wait for. Default: nothing."""

    def _watch_stop(
        self,
        slot: int,
        worker: Worker,
        future: "Future[Any]",
        handoff: Handoff,
        timeout: Optional[float],
        reason: str,
        release: Callable[[], None],
    ) -> "asyncio.Task[None]":
        """Give a cancelled request's worker `timeout` s to stop, else abandon it; the task belongs to the engine.

        Owned by the engine, not by the request: the request's task may be cancelled again (its client dropped by the
        write timeout, shutdown) while it waits, and that must not skip replacing a wedged worker.
        """

        async def watch() -> None:
            try:
                await wait_within(asyncio.shield(asyncio.wrap_future(future)), timeout)
            except asyncio.TimeoutError:
                self._abandon(slot, worker, handoff, release, reason)
            except Exception:  # the worker's own errors were already reported
                pass

        return self._recoveries.add(asyncio.get_running_loop().create_task(watch(), name=f"{self.name} worker watch"))

    async def run_in_worker(self, func: Callable[..., T], *args: Any, exclusive: bool = False) -> T:
        """Run `func(*args)` on a worker thread (model loading, voice preparation), holding one slot, or with
        `exclusive` every slot (no request runs meanwhile: loading or releasing the model).

        Inside `worker_call_timeout(s)`, a call still running after `s` seconds fails with EngineTimeout and its
        worker thread is replaced (a call has no cancel flag: the thread is hung for all we know).

        Under process isolation a method of this engine (`self.method`) runs on the engine in a child process,
        where the model lives; any other callable runs here.
        """
        timeout = WORKER_CALL_TIMEOUT.get()
        what = getattr(func, "__name__", "call")
        pool = self._pool
        if pool is not None and getattr(func, "__self__", None) is self:
            func, args = functools.partial(pool.call, what, args, timeout), ()
        if exclusive:
            await self._slots.acquire_all()
            slot = 0
        else:
            slot = await self._slots.acquire()
        try:
            worker = self._worker_for(slot)
            future = worker.submit(func, *args)
            try:
                return await wait_within(asyncio.shield(asyncio.wrap_future(future)), timeout)
            except asyncio.TimeoutError:
                if self._workers.get(slot) is worker:
                    self.replace_worker(f"{what} did not finish within {timeout:g} s", slot)
                raise EngineTimeout(
                    f"{self.name} engine: {what} did not finish within {timeout:g} s (limits.engine_timeout_s); "
                    "the engine worker was restarted"
                ) from None
        finally:
            if exclusive:
                self._slots.release_all()
            else:
                self._slots.release(slot)

    def release_memory(self) -> None:
        """Called on the worker thread after an out-of-memory error: free cached (GPU) memory."""
        torch = sys.modules.get("torch")  # never import torch here: only an engine that uses it has loaded it
        if torch is not None:
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()

    def still_working(self) -> None:
        """Called on a request's worker thread while it waits for something shared with other requests (not hung):
        its inactivity timeout starts again."""
        handoff: Optional[Handoff] = getattr(self._local, "handoff", None)
        if handoff is not None:
            handoff.alive()

    def generate(
        self, text: str, profile: "VoiceProfile", options: SynthesisOptions, cancel: threading.Event
    ) -> Iterator[bytes]:
        """Blocking generator of 16-bit PCM at `sample_rate`, run on the worker thread."""
        raise NotImplementedError(f"{type(self).__name__} implements neither generate() nor render()")

    def render(
        self,
        text: str,
        profile: "VoiceProfile",
        options: SynthesisOptions,
        emit: Callable[[bytes], None],
        cancel: threading.Event,
    ) -> None:
        """Blocking: make PCM and pass each piece to `emit` (for callback-style libraries); default uses generate()."""
        for pcm in self.generate(text, profile, options, cancel):
            if cancel.is_set():
                raise RequestCancelled()
            emit(pcm)

    def _produce(self, handoff: Handoff, text: str, profile: "VoiceProfile", options: SynthesisOptions) -> None:
        """One request on its worker thread: render into the hand-off, then say how it ended."""
        if handoff.cancel.is_set():  # cancelled while waiting for the worker
            handoff.post(HandoffKind.END)
            return
        with self._running_lock:
            self._running.add(handoff)
        self._local.handoff = handoff
        try:
            handoff.post(HandoffKind.STARTED)
            if self._pool is not None:
                request = (text, profile, options)
                self._pool.render(options.request_id, request, handoff.emit, handoff.cancel, handoff.alive)
            else:
                self.render(text, profile, options, handoff.emit, handoff.cancel)
        except RequestCancelled:
            pass
        except BaseException as err:  # forwarded to the awaiting coroutine
            if is_out_of_memory(err):
                self.release_memory()
            handoff.post(HandoffKind.ERROR, err)
        finally:
            self._local.handoff = None
            with self._running_lock:
                self._running.discard(handoff)
            handoff.post(HandoffKind.END)

    async def synthesize(
        self, text: str, profile: "VoiceProfile", options: SynthesisOptions
    ) -> AsyncIterator[PcmChunk]:
        """Run `render` on a worker thread and hand each chunk to the event loop as it is made."""
        handoff = Handoff(asyncio.get_running_loop(), self.max_ahead_bytes())
        # The slot orders requests for the workers (queueing time does not count towards the timeout); it is
        # released as soon as the worker is done with this request, not when its consumer has read everything,
        # so a slow reader never holds up the next request.
        self._queued += 1
        try:
            slot = await self._slots.acquire()
        finally:
            self._queued -= 1
        self._in_flight += 1
        if options.started is not None:
            options.started()
        released = False

        def release(_: Any = None) -> None:
            nonlocal released
            if not released:
                released = True
                self._in_flight -= 1
                self._slots.release(slot)
                self._room_changed()

        try:
            worker = self._worker_for(slot)
            future = worker.submit(self._produce, handoff, text, profile, options)
        except BaseException:
            release()
            raise
        asyncio.wrap_future(future).add_done_callback(release)
        finished = False
        try:
            while True:
                try:
                    kind, item = await handoff.take(options.timeout)
                except asyncio.TimeoutError:
                    # No audio for the whole timeout: the worker is hung. Replace it now, so the client hears of it
                    # after one timeout (waiting for the thread to stop would take a second one).
                    finished = True
                    handoff.cancel.set()
                    self._abandon(slot, worker, handoff, release, f"request {options.request_id or '?'} timed out")
                    raise EngineTimeout(
                        f"{self.name} engine produced no audio for {options.timeout:g} s; request abandoned "
                        "and the engine worker restarted"
                    ) from None
                if kind == HandoffKind.CHUNK:
                    handoff.taken(len(item))
                    yield PcmChunk(item, self.sample_rate, self.sample_width, self.channels)
                elif kind == HandoffKind.ERROR:
                    finished = True
                    if isinstance(item, CosyVoiceServiceError):
                        raise item
                    if is_out_of_memory(item):
                        raise EngineOutOfMemory(
                            f"{self.name} engine ran out of memory ({type(item).__name__}: {item}); "
                            "cached memory was released, try a shorter text"
                        ) from item
                    raise EngineError(f"{self.name} engine failed: {type(item).__name__}: {item}") from item
                elif kind == HandoffKind.END:
                    finished = True
                    break
        finally:
            handoff.cancel.set()
            if not finished and not future.done():
                # Give the worker one chunk's time to notice the flag; one that does not is hung. The watch runs to
                # its end even when this request is cancelled while waiting for it.
                reason = f"request {options.request_id or '?'} did not stop"
                watch = self._watch_stop(slot, worker, future, handoff, options.timeout, reason, release)
                await asyncio.shield(watch)

    def max_ahead_bytes(self) -> int:
        """Bytes of audio the worker may make ahead of the consumer (MAX_AHEAD_SECONDS at this engine's format)."""
        return int(MAX_AHEAD_SECONDS * self.sample_rate) * self.sample_width * self.channels

    async def close(self) -> None:
        """Stop the worker threads after their current jobs."""
        self._recoveries.cancel()
        for worker in self._workers.values():
            worker.stop()
        self._workers.clear()
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, pool.close)
