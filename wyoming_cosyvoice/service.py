"""The synthesis service behind the handler: one `Reply` per audio reply (voice, engine, format, the sinks' copy),
admission, gain, metrics, and the `info` it describes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from typing import AsyncGenerator, Callable, Iterator, Optional

from wyoming.info import Attribution, Info, TtsProgram, TtsVoice

from . import __version__
from .audio import AudioFormat, apply_gain
from .config import Limits
from .engine import AudioChunk, Engine, SynthesisOptions
from .errors import ServerBusy
from .logs import LogThrottle
from .metrics import NO_RECORD, Metrics, RequestRecord
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
        metrics: Optional[Metrics] = None,
    ) -> None:
        self.engines = engines
        """Every running engine; `engines.engine_for` picks the one for a profile."""
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
        self.metrics = metrics or Metrics()
        """The recorder every reply reports to (docs/metrics.md); the default records nothing."""
        self.metrics.watch(self)

    async def info(self) -> Info:
        """Build `info` from the current usable voice profiles (the voices are rescanned off the event loop)."""
        profiles = await self.preparer.refresh()
        health = self.engine.health()
        facts = ", ".join(f"{k}={v}" for k, v in health.items() if isinstance(v, (str, int, float)) and k != "engine")
        served = self.metrics.summary()
        if served.get("requests"):  # the numbers the studio shows too (one source: the recorder)
            facts = ", ".join(_served_facts(served)) + (", " + facts if facts else "")
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

    def open_reply(
        self, voice: Optional[str], language: Optional[str], *, sinks: bool = True, protocol: str = "wyoming"
    ) -> Reply:
        """The reply for a request's voice name / language: its profile and engine are found once, here
        (VoiceNotFound when there is none, or its engine is not running). `sinks` False: no copy for the sinks;
        `protocol` (wyoming, http, studio) labels its metrics."""
        profile = self.catalog.resolve(voice, language)
        engine = self.engines.engine_for(profile)
        record = self.metrics.request(protocol, profile.name)
        return Reply(self, profile, engine, self.tee if sinks else None, record)

    async def close_sinks(self, timeout: float = 10.0) -> None:
        """Wait (bounded) for server-side sinks to finish the replies they are still writing."""
        if self._finishing:
            await asyncio.wait(set(self._finishing), timeout=timeout)


def _served_facts(summary: dict[str, object]) -> list[str]:
    """The recorder's headline numbers as `describe`'s health facts (key=value)."""
    keys = ("requests", "error", "first_audio_p50_ms", "first_audio_p95_ms", "underruns", "refused", "fallbacks")
    return [f"{key}={summary[key]}" for key in keys if summary.get(key) is not None]


class Reply:
    """One audio reply (`audio-start` .. `audio-stop`): its voice, engine and format, and its copy for the sinks.

    `start()` when its audio begins, `speak(text)` for each piece of text (one request each: admission slot, request
    id, log line), `finish(ok)` at its end (`ok` False: cut off).
    """

    def __init__(
        self,
        service: Service,
        profile: VoiceProfile,
        engine: Engine,
        tee: Optional[Tee],
        record: RequestRecord = NO_RECORD,
    ) -> None:
        self.profile = profile
        """The voice."""
        self.engine = engine
        """The engine that serves the voice."""
        self.format: AudioFormat = engine.audio_format
        """The format of every chunk of the reply."""
        self._service = service
        self._tee = tee
        self._copy: Optional[TeeStream] = None  # the sinks' copy, open from start() to finish()
        self.record = record
        """The reply's metrics (`Service.metrics`): timings, outcome; `record.degraded(reason)` for a fallback."""

    def start(self) -> None:
        """The audio begins: open the reply's stream on every server-side sink (one file or stream per reply)."""
        if self._tee and self._copy is None:
            info = StreamInfo(label=f"r{next(_REPLY_IDS)}", voice=self.profile.name)
            self._copy = self._tee.open(self.format, info)

    async def speak(self, text: str) -> AsyncGenerator[AudioChunk, None]:
        """Stream `text` in the reply's voice (the sinks get a copy); closing it early cancels the engine work."""
        if not text.strip():
            return
        service, profile, record = self._service, self.profile, self.record
        record.speaking()
        with service.admission.slot(record.refused):
            try:
                await service.preparer.ready(profile)
            except Exception as err:  # the voice turned out broken
                record.failed(err)
                raise
            stats = RequestStats(str(next(_REQUEST_IDS)), profile.name, len(text))
            options = SynthesisOptions(
                speed=profile.speed,
                request_id=stats.request_id,
                timeout=service.limits.engine_timeout_s,
                started=record.engine_started,
            )
            record.engine_called()
            chunks = self.engine.synthesize(text, profile, options)
            try:
                async for chunk in chunks:
                    if stats.first_audio is None:
                        stats.first_audio = time.perf_counter()
                    if profile.gain != 1.0:
                        chunk = dataclasses.replace(chunk, audio=apply_gain(chunk.audio, profile.gain))
                    seconds = chunk.seconds
                    stats.audio_seconds += seconds
                    if self._copy is not None:
                        self._copy.write(chunk.audio)
                    yield chunk
                    record.written(seconds)  # the consumer asks for the next chunk once it has sent this one
            except (asyncio.CancelledError, GeneratorExit):
                stats.end = "cancelled"
                raise
            except Exception as err:
                stats.end = type(err).__name__
                record.failed(err)
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
                    record.spoken()
                    _LOGGER.info("%s", stats.line())

    def finish(self, ok: bool) -> None:
        """End the reply (`ok` False: cut off); the sinks finish in the background (`Service.close_sinks`)."""
        self.record.finish(ok)
        copy, self._copy = self._copy, None
        if copy is not None:
            task = asyncio.ensure_future(copy.close(ok))
            self._service._finishing.add(task)
            task.add_done_callback(self._service._finishing.discard)
