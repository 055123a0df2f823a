"""Engine protocol, audio chunk and options values, and the worker-thread bridge with cancellation."""

from __future__ import annotations

import asyncio
import logging
import threading
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Iterator, Optional, TypeVar

from .errors import CosyVoiceServiceError, EngineError

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

    async def start(self) -> None:
        """Load the model; called once before serving."""

    async def prepare(self, profiles: Iterable["VoiceProfile"]) -> None:
        """Precompute and cache per-voice data for `profiles`."""

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


class ThreadedEngine(Engine):
    """An engine whose model lives in ONE worker thread; requests queue for it and cancel between chunks."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-worker")
        self.busy = False
        """True while the worker thread runs a synthesis."""

    async def run_in_worker(self, func: Callable[..., T], *args: Any) -> T:
        """Run `func(*args)` on the engine's worker thread (model loading, voice preparation)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, func, *args)

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
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def post(kind: str, item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, item))
            except RuntimeError:  # event loop closed: nobody is listening any more
                cancel.set()

        def produce() -> None:
            if cancel.is_set():  # cancelled while waiting for the worker
                post("end", None)
                return
            self.busy = True

            def emit(pcm: bytes) -> None:
                if cancel.is_set():
                    raise Cancelled()
                if pcm:
                    post("chunk", pcm)

            try:
                self.render(text, profile, options, emit, cancel)
            except Cancelled:
                pass
            except BaseException as err:  # forwarded to the awaiting coroutine
                post("error", err)
            finally:
                self.busy = False
                post("end", None)

        future = loop.run_in_executor(self._executor, produce)
        try:
            while True:
                kind, item = await queue.get()
                if kind == "chunk":
                    yield AudioChunk(item, self.sample_rate, self.sample_width, self.channels)
                elif kind == "error":
                    if isinstance(item, CosyVoiceServiceError):
                        raise item
                    raise EngineError(f"{self.name} engine failed: {type(item).__name__}: {item}") from item
                else:
                    break
        finally:
            cancel.set()
            if not future.done():
                # Let the worker see the flag; the thread stops at its next chunk boundary.
                future.add_done_callback(_consume_exception)

    async def close(self) -> None:
        """Stop the worker thread after the current job."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def _consume_exception(future: "asyncio.Future[Any]") -> None:
    if not future.cancelled():
        future.exception()
