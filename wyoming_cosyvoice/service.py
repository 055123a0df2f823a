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

    def open_reply(
        self, voice: Optional[str], language: Optional[str], *, sinks: bool = True, opening: Optional[Opening] = None
    ) -> Reply:
        """The reply for a request's voice name / language: its profile and engine are found once, here or by
        `reply_opening` (VoiceNotFound when there is none, or its engine is not running). `sinks` False: no copy for
        the sinks."""
        if opening is None:
            opening = self.reply_opening(voice, language)
        return Reply(self, opening, self.tee if sinks else None)

    def reply_opening(self, voice: Optional[str], language: Optional[str]) -> Opening:
        """A reply opens (a streamed one at `synthesize-start`, before its text): its voice and engine are found, and
        the engine may start waking a parked model now, so the wake overlaps the text's arrival."""
        profile = self.catalog.resolve(voice, language)
        engine = self.engines.engine_for(profile)
        return Opening(profile, engine, engine.reply_opening())

    async def park(self) -> dict[str, str]:
        """Park every engine that parks (`wyoming-cosyvoice park`, the studio's API): engine name -> state after."""
        states = {name: await engine.park() for name, engine in list(self.engines.running.items())}
        return {name: state for name, state in states.items() if state is not None}

    async def wake(self) -> dict[str, str]:
        """Wake every parked engine now: engine name -> state after."""
        states = {name: await engine.wake() for name, engine in list(self.engines.running.items())}
        return {name: state for name, state in states.items() if state is not None}

    async def close_sinks(self, timeout: float = 10.0) -> None:
        """Wait (bounded) for server-side sinks to finish the replies they are still writing."""
        if self._finishing:
            await asyncio.wait(set(self._finishing), timeout=timeout)


@dataclasses.dataclass
class Opening:
    """A reply's voice and engine, found once, and the engine's release for the reply's end (`Engine.reply_opening`:
    a model that parks stays awake until then)."""

    profile: VoiceProfile
    engine: Engine
    release: Optional[Callable[[], None]] = None

    def close(self) -> None:
        """The reply is over (called once or more: only the first counts)."""
        release, self.release = self.release, None
        if release is not None:
            release()


class Reply:
    """One audio reply (`audio-start` .. `audio-stop`): its voice, engine and format, and its copy for the sinks.

    `start()` when its audio begins, `speak(text)` for each piece of text (one request each: admission slot, request
    id, log line), `finish(ok)` at its end (`ok` False: cut off).
    """

    def __init__(self, service: Service, opening: Opening, tee: Optional[Tee]) -> None:
        self.profile = opening.profile
        """The voice."""
        self.engine = opening.engine
        """The engine that serves the voice."""
        self.format: AudioFormat = self.engine.audio_format
        """The format of every chunk of the reply."""
        self._service = service
        self._tee = tee
        self._copy: Optional[TeeStream] = None  # the sinks' copy, open from start() to finish()
        self._opening = opening  # closed at finish(): a parked model woke for this reply and stays awake until then

    def start(self) -> None:
        """The audio begins: open the reply's stream on every server-side sink (one file or stream per reply)."""
        if self._tee and self._copy is None:
            info = StreamInfo(label=f"r{next(_REPLY_IDS)}", voice=self.profile.name)
            self._copy = self._tee.open(self.format, info)

    async def speak(self, text: str) -> AsyncGenerator[AudioChunk, None]:
        """Stream `text` in the reply's voice (the sinks get a copy); closing it early cancels the engine work."""
        if not text.strip():
            return
        service, profile = self._service, self.profile
        with service.admission.slot():
            await service.preparer.ready(profile)
            stats = RequestStats(str(next(_REQUEST_IDS)), profile.name, len(text))
            options = SynthesisOptions(
                speed=profile.speed, request_id=stats.request_id, timeout=service.limits.engine_timeout_s
            )
            chunks = self.engine.synthesize(text, profile, options)
            try:
                async for chunk in chunks:
                    if stats.first_audio is None:
                        stats.first_audio = time.perf_counter()
                    if profile.gain != 1.0:
                        chunk = dataclasses.replace(chunk, audio=apply_gain(chunk.audio, profile.gain))
                    stats.audio_seconds += chunk.seconds
                    if self._copy is not None:
                        self._copy.write(chunk.audio)
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

    def finish(self, ok: bool) -> None:
        """End the reply (`ok` False: cut off); the sinks finish in the background (`Service.close_sinks`)."""
        self._opening.close()
        copy, self._copy = self._copy, None
        if copy is not None:
            task = asyncio.ensure_future(copy.close(ok))
            self._service._finishing.add(task)
            task.add_done_callback(self._service._finishing.discard)
