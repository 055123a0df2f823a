"""The synthesis service behind the handler: voice resolution, admission, gain, metrics, and the `info` it describes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from typing import AsyncIterator, Iterator, Optional

from wyoming.info import Attribution, Info, TtsProgram, TtsVoice

from . import __version__
from .audio import AudioFormat, apply_gain
from .config import Limits
from .engine import AudioChunk, Engine, SynthesisOptions
from .errors import ServerBusy
from .logs import LogThrottle
from .preparation import VoicePreparer
from .routing import Engines
from .sinks import StreamInfo, Tee, TeeStream
from .text import DEFAULT_FIRST_CLAUSE_WORDS
from .voices import VoiceCatalog, VoiceProfile

_LOGGER = logging.getLogger(__name__)

_ATTRIBUTION = Attribution(name="wyoming-cosyvoice", url="https://github.com/FunAudioLLM/CosyVoice")
_REQUEST_IDS = itertools.count(1)
_REPLY_IDS = itertools.count(1)


class Admission:
    """Bounds how many synthesis requests are admitted at once; the rest are refused with ServerBusy."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.closing = False
        """Set at shutdown: requests in progress (and streams already open) finish, new ones are refused."""

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one slot for the duration of a request."""
        if self.active >= self.limit:
            raise ServerBusy(f"server busy: {self.active} requests in progress (limit {self.limit}); try again shortly")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


@dataclasses.dataclass
class RequestStats:
    """Timing of one synthesis request, for the log line and benchmarks."""

    request_id: str
    voice: str
    chars: int
    started: float = dataclasses.field(default_factory=time.perf_counter)
    first_audio: Optional[float] = None
    audio_seconds: float = 0.0
    finished: Optional[float] = None
    end: str = "done"
    """How the request ended: done, cancelled (client gone or stalled) or the error class name."""

    def line(self) -> str:
        """One log line: time to first audio, total time, audio length, real-time factor."""
        total = (self.finished or time.perf_counter()) - self.started
        ttfa = f"{(self.first_audio - self.started) * 1000:.0f} ms" if self.first_audio else "none"
        rtf = total / self.audio_seconds if self.audio_seconds else float("nan")
        return (
            f"request {self.request_id}: voice={self.voice} chars={self.chars} first_audio={ttfa} "
            f"total={total * 1000:.0f} ms audio={self.audio_seconds:.2f} s rtf={rtf:.3f} end={self.end}"
        )


class ReplyTap:
    """A copy of one reply's audio for the server-side sinks; never makes the client wait."""

    def __init__(self, stream: Optional[TeeStream], finishing: "set[asyncio.Task[object]]") -> None:
        self._stream = stream
        self._finishing = finishing

    def write(self, pcm: bytes) -> None:
        """Queue a chunk for the sinks (returns at once)."""
        if self._stream is not None:
            self._stream.write(pcm)

    def finish(self, ok: bool) -> None:
        """End the reply (`ok` False: aborted); the sinks finish in the background."""
        stream, self._stream = self._stream, None
        if stream is None:
            return
        task = asyncio.ensure_future(stream.close(ok))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)


class Service:
    """Everything a connection handler needs, shared by all connections."""

    def __init__(
        self,
        engines: Engines,
        catalog: VoiceCatalog,
        *,
        max_concurrent: int = 4,
        streaming: bool = True,
        tee: Optional[Tee] = None,
        limits: Optional[Limits] = None,
        preparer: Optional[VoicePreparer] = None,
        first_clause_words: int = DEFAULT_FIRST_CLAUSE_WORDS,
    ) -> None:
        self.engines = engines
        """Every running engine; `engine_for` picks the one for a profile."""
        self.engine = self.engines.main
        """The main engine: serves every profile without an `engine` field."""
        self.limits = limits or Limits()
        """Protocol and resource limits every connection applies."""
        self.catalog = catalog
        self.preparer = preparer or VoicePreparer(catalog, self.engines)
        """Prepares new or changed voices in the background (hot reload) and leaves broken ones out."""
        self.admission = Admission(max_concurrent)
        self.streaming = streaming
        self.first_clause_words = first_clause_words
        """Words a stream's first piece needs before it may end at a clause (`server.first_clause_words`; 0: off)."""
        self.tee = tee
        """Server-side sinks (config `sinks:`) that get a copy of every reply."""
        self._finishing: set[asyncio.Task[object]] = set()
        self.log_throttle = LogThrottle()
        """Rate limit for the per-client warning lines (refusals, errors, stalls) shared by all connections."""

    def engine_for(self, profile: VoiceProfile) -> Engine:
        """The engine that serves `profile` (VoiceNotFound when it is not running)."""
        return self.engines.engine_for(profile)

    def audio_format(self, profile: Optional[VoiceProfile] = None) -> tuple[int, int, int]:
        """(rate, width, channels) of the audio streamed for `profile` (default: the main engine's)."""
        engine = self.engine if profile is None else self.engine_for(profile)
        return (engine.sample_rate, engine.sample_width, engine.channels)

    async def info(self) -> Info:
        """Build `info` from the current usable voice profiles (the voices are rescanned off the event loop)."""
        profiles = await self.preparer.refresh()
        health = self.engine.health()
        facts = ", ".join(f"{k}={v}" for k, v in health.items() if isinstance(v, (str, int, float)) and k != "engine")
        description = f"CosyVoice voice cloning TTS (engine: {self.engine.name}{'; ' + facts if facts else ''})"
        notes = self.engines.notes()
        if notes:
            description += f" [{'; '.join(notes)}]"
        voices = [
            TtsVoice(
                name=p.name,
                description=p.description or p.name,
                attribution=_ATTRIBUTION,
                installed=True,
                version=__version__,
                languages=list(p.languages),
            )
            for p in profiles
        ]
        program = TtsProgram(
            name="cosyvoice",
            description=description,
            attribution=_ATTRIBUTION,
            installed=True,
            version=__version__,
            voices=voices,
            supports_synthesize_streaming=self.streaming,
        )
        return Info(tts=[program])

    def open_reply(self, profile: VoiceProfile) -> ReplyTap:
        """A tap for one reply's audio (one file or stream per reply on each configured sink)."""
        if not self.tee:
            return ReplyTap(None, self._finishing)
        fmt = AudioFormat(*self.audio_format(profile))
        stream = self.tee.open(fmt, StreamInfo(label=f"r{next(_REPLY_IDS)}", voice=profile.name))
        return ReplyTap(stream, self._finishing)

    async def close_sinks(self, timeout: float = 10.0) -> None:
        """Wait (bounded) for server-side sinks to finish the replies they are still writing."""
        if self._finishing:
            await asyncio.wait(set(self._finishing), timeout=timeout)

    def resolve(self, name: Optional[str], language: Optional[str]) -> VoiceProfile:
        """The profile for a request's voice name / language."""
        return self.catalog.resolve(name, language)

    async def synthesize(self, text: str, profile: VoiceProfile) -> AsyncIterator[AudioChunk]:
        """Stream audio for `text`; closing the iterator early cancels the engine work."""
        with self.admission.slot():
            await self.preparer.ready(profile)
            stats = RequestStats(str(next(_REQUEST_IDS)), profile.name, len(text))
            options = SynthesisOptions(
                speed=profile.speed, request_id=stats.request_id, timeout=self.limits.engine_timeout_s
            )
            chunks = self.engine_for(profile).synthesize(text, profile, options)
            try:
                async for chunk in chunks:
                    if stats.first_audio is None:
                        stats.first_audio = time.perf_counter()
                    if profile.gain != 1.0:
                        chunk = dataclasses.replace(chunk, audio=apply_gain(chunk.audio, profile.gain))
                    stats.audio_seconds += chunk.seconds
                    yield chunk
            except (asyncio.CancelledError, GeneratorExit):
                stats.end = "cancelled"
                raise
            except Exception as err:
                stats.end = type(err).__name__
                raise
            finally:
                try:
                    aclose = getattr(chunks, "aclose", None)
                    if aclose is not None:
                        await aclose()
                except asyncio.CancelledError:
                    stats.end = "cancelled"
                    raise
                finally:  # logged whatever happens to the client, a cancellation while closing included
                    stats.finished = time.perf_counter()
                    _LOGGER.info("%s", stats.line())
