"""Engine protocol, audio chunk and options values, and the worker-thread bridge with cancellation."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import queue
import sys
import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Iterator, Optional, TypeVar

from .aio import wait_within
from .audio import AudioFormat
from .errors import CosyVoiceServiceError, EngineError, EngineOutOfMemory, EngineTimeout

if TYPE_CHECKING:
    from .voices import VoiceProfile

_LOGGER = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class AudioChunk:
    """A piece of synthesized audio: little-endian signed PCM."""

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


@dataclass(frozen=True)
class SynthesisOptions:
    """Per-request options that are not part of the voice profile."""

    speed: float = 1.0
    """Speaking-rate multiplier (1.0 = the voice's natural rate)."""

    request_id: str = ""
    """Identifier used in log lines."""

    timeout: Optional[float] = None
    """Seconds the engine may go without producing audio before the request fails (None: no limit)."""


class Cancelled(Exception):
    """Raised inside the worker thread when the request was cancelled (client gone)."""


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

    @abstractmethod
    def synthesize(self, text: str, profile: "VoiceProfile", options: SynthesisOptions) -> AsyncIterator[AudioChunk]:
        """Stream audio for `text` in `profile`'s voice; closing the iterator cancels the work."""

    async def close(self) -> None:
        """Release the model and threads."""


class _Worker:
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
    """An engine whose model lives in ONE worker thread; requests queue for it and cancel between chunks.

    A request whose engine produces nothing for `SynthesisOptions.timeout` seconds fails with EngineTimeout and the
    worker thread is replaced by a fresh one (the stuck thread is abandoned: Python cannot kill it; it exits at its
    next chunk boundary if it ever returns). An out-of-memory error calls `release_memory()` on the worker thread
    before the next request runs.
    """

    def __init__(self) -> None:
        self._worker: Optional[_Worker] = None
        self._gate: Optional[asyncio.Lock] = None
        self.busy = False
        """True while the worker thread runs a synthesis."""
        self.restarts = 0
        """How many times a hung worker thread was replaced."""
        self._recoveries: "set[asyncio.Task[None]]" = set()

    def _current_worker(self) -> _Worker:
        if self._worker is None:
            self._worker = _Worker(f"{self.name}-worker-{self.restarts}")
        return self._worker

    def _lock(self) -> asyncio.Lock:
        # Created lazily so the lock belongs to the loop that serves (engines are built before it runs in tests).
        if self._gate is None:
            self._gate = asyncio.Lock()
        return self._gate

    def replace_worker(self, reason: str) -> None:
        """Abandon the current worker thread (hung) and start the next request on a fresh one."""
        old = self._worker
        self._worker = None
        self.busy = False
        self.restarts += 1
        if old is not None:
            old.stop()
            _LOGGER.error("%s engine: worker thread %s replaced (%s)", self.name, old.thread.name, reason)

    def _abandon(self, worker: _Worker, release: Callable[[], None], reason: str) -> None:
        """Give up on `worker` (hung): the next request runs on a fresh thread; the engine lock is free again."""
        if self._worker is worker:
            self.replace_worker(reason)
        release()  # the abandoned thread no longer owns the model

    def _watch_stop(
        self, worker: _Worker, future: "Future[Any]", timeout: Optional[float], reason: str, release: Callable[[], None]
    ) -> "asyncio.Task[None]":
        """Give a cancelled request's worker `timeout` s to stop, else abandon it; the task belongs to the engine.

        Owned by the engine, not by the request: the request's task may be cancelled again (its client dropped by the
        write timeout, shutdown) while it waits, and that must not skip replacing a wedged worker.
        """

        async def watch() -> None:
            try:
                await wait_within(asyncio.shield(asyncio.wrap_future(future)), timeout)
            except asyncio.TimeoutError:
                self._abandon(worker, release, reason)
            except Exception:  # the worker's own errors were already reported
                pass

        task = asyncio.get_running_loop().create_task(watch(), name=f"{self.name} worker watch")
        self._recoveries.add(task)
        task.add_done_callback(self._recoveries.discard)
        return task

    async def run_in_worker(self, func: Callable[..., T], *args: Any) -> T:
        """Run `func(*args)` on the engine's worker thread (model loading, voice preparation).

        Inside `worker_call_timeout(s)`, a call still running after `s` seconds fails with EngineTimeout and its
        worker thread is replaced (a call has no cancel flag: the thread is hung for all we know).
        """
        timeout = WORKER_CALL_TIMEOUT.get()
        async with self._lock():
            worker = self._current_worker()
            future = worker.submit(func, *args)
            try:
                return await wait_within(asyncio.shield(asyncio.wrap_future(future)), timeout)
            except asyncio.TimeoutError:
                what = getattr(func, "__name__", "call")
                if self._worker is worker:
                    self.replace_worker(f"{what} did not finish within {timeout:g} s")
                raise EngineTimeout(
                    f"{self.name} engine: {what} did not finish within {timeout:g} s (limits.engine_timeout_s); "
                    "the engine worker was restarted"
                ) from None

    def release_memory(self) -> None:
        """Called on the worker thread after an out-of-memory error: free cached (GPU) memory."""
        torch = sys.modules.get("torch")  # never import torch here: only an engine that uses it has loaded it
        if torch is not None:
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()

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
                raise Cancelled()
            emit(pcm)

    async def synthesize(
        self, text: str, profile: "VoiceProfile", options: SynthesisOptions
    ) -> AsyncIterator[AudioChunk]:
        """Run `render` on the worker thread and hand each chunk to the event loop as it is made."""
        loop = asyncio.get_running_loop()
        # Hand-over from the worker: a deque plus at most one scheduled wake-up of the loop at a time, so a worker
        # that runs ahead costs no loop wake-up (self-pipe write) per chunk and the consumer no await per chunk.
        pending: "collections.deque[tuple[str, Any]]" = collections.deque()
        ready = asyncio.Event()
        wake_lock = threading.Lock()
        wake_scheduled = [False]
        cancel = threading.Event()
        room = threading.Condition()
        ahead = [0]  # bytes handed to the loop and not yet taken by the consumer
        limit = self.max_ahead_bytes()
        low_water = limit // 2  # a waiting worker resumes once the consumer is back under this

        def wake() -> None:  # on the loop
            with wake_lock:
                wake_scheduled[0] = False
            ready.set()

        def post(kind: str, item: Any) -> None:
            pending.append((kind, item))
            with wake_lock:
                if wake_scheduled[0]:
                    return  # the wake-up already on its way finds this item too
                wake_scheduled[0] = True
            try:
                loop.call_soon_threadsafe(wake)
            except RuntimeError:  # event loop closed: nobody is listening any more
                cancel.set()

        async def take() -> tuple[str, Any]:
            if pending:
                await asyncio.sleep(0)  # a turn for the other streams between chunks, as when waiting for one
            while not pending:
                ready.clear()
                if pending:  # posted between the check and the clear
                    break
                await wait_within(ready.wait(), options.timeout)
            return pending.popleft()

        def produce() -> None:
            if cancel.is_set():  # cancelled while waiting for the worker
                post("end", None)
                return
            self.busy = True

            def emit(pcm: bytes) -> None:
                if not pcm:
                    return
                # Backpressure: at MAX_AHEAD_SECONDS ahead of the client, wait until it is back under half of that
                # (then go on in a burst, not a wake-up per chunk), but notice cancellation.
                with room:
                    if ahead[0] >= limit:
                        while ahead[0] > low_water:
                            if cancel.is_set():
                                raise Cancelled()
                            room.wait(0.1)
                    ahead[0] += len(pcm)
                if cancel.is_set():
                    raise Cancelled()
                post("chunk", pcm)

            try:
                post("started", None)
                self.render(text, profile, options, emit, cancel)
            except Cancelled:
                pass
            except BaseException as err:  # forwarded to the awaiting coroutine
                if is_out_of_memory(err):
                    self.release_memory()
                post("error", err)
            finally:
                self.busy = False
                post("end", None)

        # The lock orders requests for the worker (queueing time does not count towards the timeout); it is
        # released as soon as the worker is done with this request, not when its consumer has read everything,
        # so a slow reader never holds up the next request.
        lock = self._lock()
        await lock.acquire()
        released = False

        def release(_: Any = None) -> None:
            nonlocal released
            if not released:
                released = True
                lock.release()

        try:
            worker = self._current_worker()
            future = worker.submit(produce)
        except BaseException:
            release()
            raise
        asyncio.wrap_future(future).add_done_callback(release)
        finished = False
        try:
            while True:
                try:
                    kind, item = await take()
                except asyncio.TimeoutError:
                    # No audio for the whole timeout: the worker is hung. Replace it now, so the client hears of it
                    # after one timeout (waiting for the thread to stop would take a second one).
                    finished = True
                    cancel.set()
                    self._abandon(worker, release, f"request {options.request_id or '?'} timed out")
                    raise EngineTimeout(
                        f"{self.name} engine produced no audio for {options.timeout:g} s; request abandoned "
                        "and the engine worker restarted"
                    ) from None
                if kind == "chunk":
                    with room:
                        ahead[0] -= len(item)
                        if ahead[0] <= low_water:  # wake a waiting worker once, for a burst, not per chunk
                            room.notify()
                    yield AudioChunk(item, self.sample_rate, self.sample_width, self.channels)
                elif kind == "error":
                    finished = True
                    if isinstance(item, CosyVoiceServiceError):
                        raise item
                    if is_out_of_memory(item):
                        raise EngineOutOfMemory(
                            f"{self.name} engine ran out of memory ({type(item).__name__}: {item}); "
                            "cached memory was released, try a shorter text"
                        ) from item
                    raise EngineError(f"{self.name} engine failed: {type(item).__name__}: {item}") from item
                elif kind == "end":
                    finished = True
                    break
        finally:
            cancel.set()
            if not finished and not future.done():
                # Give the worker one chunk's time to notice the flag; one that does not is hung. The watch runs to
                # its end even when this request is cancelled while waiting for it.
                reason = f"request {options.request_id or '?'} did not stop"
                await asyncio.shield(self._watch_stop(worker, future, options.timeout, reason, release))

    def max_ahead_bytes(self) -> int:
        """Bytes of audio the worker may make ahead of the consumer (MAX_AHEAD_SECONDS at this engine's format)."""
        return int(MAX_AHEAD_SECONDS * self.sample_rate) * self.sample_width * self.channels

    async def close(self) -> None:
        """Stop the worker thread after the current job."""
        for task in list(self._recoveries):
            task.cancel()
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
