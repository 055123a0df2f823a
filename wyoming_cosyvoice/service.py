"""The synthesis service behind the handler: one `Reply` per audio reply (voice, engine, format, the sinks' copy),
admission, gain, metrics, and the `info` it describes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from typing import AsyncGenerator, AsyncIterator, Awaitable, Callable, Optional

from wyoming.info import Attribution, Info, TtsProgram, TtsVoice

from . import __version__
from .aio import TaskSet
from .audio import AudioFormat, PcmConverter, apply_gain
from .config import Limits, ServerSettings
from .degrade import ConcurrencyLimit, Degraded, RoomQueue
from .engine import Engine, PcmChunk, SynthesisOptions
from .errors import EngineError, EngineOutOfMemory, EngineTimeout, ServerBusy, VoiceNotFound
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
    degraded: list[str] = dataclasses.field(default_factory=list)
    """What was degraded instead of refused (waited, retried, fallback, default voice), for the log line."""

    def line(self) -> str:
        """One log line: time to first audio, total time, audio length, real-time factor."""
        total = (self.finished or time.perf_counter()) - self.started
        ttfa = f"{(self.first_audio - self.started) * 1000:.0f} ms" if self.first_audio else "none"
        rtf = total / self.audio_seconds if self.audio_seconds else float("nan")
        return (
            f"request {self.request_id}: voice={self.voice} chars={self.chars} first_audio={ttfa} "
            f"total={total * 1000:.0f} ms audio={self.audio_seconds:.2f} s rtf={rtf:.3f} end={self.end}"
            + (f" degraded={'; '.join(self.degraded)}" if self.degraded else "")
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
        settings: Optional[ServerSettings] = None,
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
        self.concurrency_limit = ConcurrencyLimit(max_concurrent)
        """How many requests may be in progress at once (`server.max_concurrent`); each holds a slot."""
        self.streaming = streaming
        self.first_clause_words = first_clause_words
        """Words a stream's first piece needs before it may end at a clause (`server.first_clause_words`; 0: off)."""
        self.tee = tee
        """Server-side sinks (config `sinks:`) that get a copy of every reply."""
        self.settings = settings or ServerSettings()
        """`server:` settings: what to do when busy (`when_busy`, `busy_wait_s`) or a voice is not there."""
        self.degraded = Degraded()
        """How often a reply was degraded instead of refused (`degraded.counts()`)."""
        self._rooms = {id(engine): RoomQueue(engine) for engine in self.engines.running.values()}
        self._finishing = TaskSet()
        self._closing = False
        self.log_throttle = LogThrottle()
        """Rate limit for the per-client warning lines (refusals, errors, stalls) shared by all connections."""
        self.metrics = metrics or Metrics()
        """The recorder every reply reports to (docs/metrics.md); the default records nothing."""
        self.metrics.watch(self)

    async def info(self) -> Info:
        """Build `info` from the current usable voice profiles (the voices are rescanned off the event loop)."""
        profiles = await self.preparer.refresh()
        health = self.engine.health()
        served = self.metrics.summary()  # the numbers the studio shows too (one source: the recorder)
        facts = ", ".join(
            (_served_facts(served) if served.get("requests") else [])
            + [f"{k}={v}" for k, v in health.items() if isinstance(v, (str, int, float)) and k != "engine"]
            + [f"{kind}={n}" for kind, n in self.degraded.counts().items()]
        )
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
        self,
        voice: Optional[str],
        language: Optional[str],
        *,
        sinks: bool = True,
        client: str = "",
        unknown_voice: Optional[str] = None,
        opening: Optional[Opening] = None,
        protocol: str = "wyoming",
    ) -> Reply:
        """The reply for a request's voice name / language, its profile and engine found once: here, or earlier by
        `reply_opening` (`opening`). `sinks` False: no copy for the sinks; `protocol` (wyoming, http, studio) labels
        its metrics."""
        opening = opening or self.reply_opening(voice, language, client=client, unknown_voice=unknown_voice)
        record = self.metrics.request(protocol, opening.profile.name)
        reply = Reply(self, opening.profile, opening.engine, self.tee if sinks else None, client=client, record=record)
        reply.hold(opening)
        if opening.note:
            record.degraded("default_voice")
            reply.note(opening.note)
        return reply

    def reply_opening(
        self, voice: Optional[str], language: Optional[str], *, client: str = "", unknown_voice: Optional[str] = None
    ) -> Opening:
        """A reply opens (a streamed one at `synthesize-start`, before its text): its voice and engine are found, and
        the engine may start waking a parked model now, so the wake overlaps the text's arrival. A voice that is not
        there (or whose engine is not running) is spoken by the default voice, or the first of `language`
        (`server.unknown_voice: default`), with one log line naming `client`; VoiceNotFound when there is none, or
        with `unknown_voice: error` (the keyword overrides the setting for one caller: the studio auditions a voice
        by its name, or not at all)."""
        note = ""
        try:
            profile = self.catalog.resolve(voice, language)
            engine = self.engines.engine_for(profile)
        except VoiceNotFound as err:
            if not voice or (unknown_voice or self.settings.unknown_voice) == "error":
                raise
            try:
                profile = self.catalog.resolve(None, language)
                engine = self.engines.engine_for(profile)
            except VoiceNotFound:
                raise err from None  # no voice to speak instead: why the asked one is not there says the most
            self.degraded.note("default_voice")
            _LOGGER.warning(
                "client %s asked for voice %r, which is not there (%s); speaking with voice %s instead "
                "(server.unknown_voice: default)",
                client or "?",
                voice[:80],
                err,
                profile.name,
            )
            note = f"default voice {profile.name} for {voice[:80]!r}"
        return Opening(profile, engine, engine.reply_opening(), note)

    async def park(self) -> dict[str, str]:
        """Park every engine that parks (`wyoming-cosyvoice park`, the studio's API): engine name -> state after."""
        states = {name: await engine.park() for name, engine in list(self.engines.running.items())}
        return {name: state for name, state in states.items() if state is not None}

    async def wake(self) -> dict[str, str]:
        """Wake every parked engine now: engine name -> state after."""
        states = {name: await engine.wake() for name, engine in list(self.engines.running.items())}
        return {name: state for name, state in states.items() if state is not None}

    def heard_as(self, profile: VoiceProfile) -> str:
        """What a listener hears for `profile` from the running engines ("cloned", "espeak voice for de-DE", ...)."""
        problem = self.engines.problem(profile)
        if problem is not None:
            if self.settings.unknown_voice == "default" and self.catalog.default is not None:
                return f"the default voice {self.catalog.default.name} ({problem})"
            return f"nothing: {problem}"
        engine = self.engines.engine_for(profile)
        state = engine.health().get("state")
        if state not in (None, "ready"):  # loading, or parked until a request wakes it
            return f"{engine.heard_as(profile)}, waiting for the {engine.name} engine ({state})"
        return engine.heard_as(profile)

    def room_queue(self, engine: Engine) -> Optional[RoomQueue]:
        """The requests waiting for room in `engine` (None for an engine started after the service)."""
        return self._rooms.get(id(engine))

    @property
    def closing(self) -> bool:
        """True once shutdown began: requests in progress (and streams already open) finish, new ones are refused."""
        return self._closing

    def begin_shutdown(self) -> None:
        """Refuse new requests from now on (`closing`); those in progress go on."""
        self._closing = True

    def finish_later(self, finishing: Awaitable[object]) -> None:
        """Run a reply's end for the sinks in the background; `close_sinks` waits for it."""
        self._finishing.add(asyncio.ensure_future(finishing))

    async def close_sinks(self, timeout: float = 10.0) -> None:
        """Wait (bounded) for server-side sinks to finish the replies they are still writing."""
        if self._finishing:
            await asyncio.wait(set(self._finishing), timeout=timeout)

    async def close(self) -> None:
        """The end of serving (TCP and stdio alike): refuse new requests, let the sinks finish their replies
        (bounded), stop preparing voices, close the engines."""
        self.begin_shutdown()
        await self.close_sinks()
        await self.preparer.close()
        await self.engines.close()


def _served_facts(summary: dict[str, object]) -> list[str]:
    """The recorder's headline numbers as `describe`'s health facts (key=value)."""
    keys = ("requests", "error", "first_audio_p50_ms", "first_audio_p95_ms", "underruns", "refused", "fallbacks")
    return [f"{key}={summary[key]}" for key in keys if summary.get(key) is not None]


@dataclasses.dataclass
class Opening:
    """A reply's voice and engine, found once, and the engine's release for the reply's end (`Engine.reply_opening`:
    a model that parks stays awake until then)."""

    profile: VoiceProfile
    engine: Engine
    release: Optional[Callable[[], None]] = None
    note: str = ""
    """A degradation of the whole reply (the default voice for an unknown one)."""

    def close(self) -> None:
        """The reply is over (called once or more: only the first counts)."""
        release, self.release = self.release, None
        if release is not None:
            release()


class Reply:
    """One audio reply (`audio-start` .. `audio-stop`): its voice, engine and format, and its copy for the sinks.

    `start()` when its audio begins, `speak(text)` for each piece of text (one request each: admission slot, request
    id, log line), `finish(ok)` at its end (`ok` False: cut off). A piece the engine cannot speak (busy past
    `server.busy_wait_s`, failed) is spoken by the fallback engine, converted to the reply's format; the rest of the
    reply stays with the fallback.
    """

    def __init__(
        self,
        service: Service,
        profile: VoiceProfile,
        engine: Engine,
        tee: Optional[Tee],
        *,
        client: str = "",
        record: RequestRecord = NO_RECORD,
    ) -> None:
        self.profile = profile
        """The voice."""
        self.engine = engine
        """The engine that serves the voice."""
        self.format: AudioFormat = engine.audio_format
        """The format of every chunk of the reply (the fallback engine's audio is converted to it)."""
        self.client = client
        """Who asked (host:port), for log lines."""
        self.fallback_reason: Optional[str] = None
        """Why the fallback engine speaks the rest of the reply (None: the voice's engine does)."""
        self.record = record
        """The reply's metrics (`Service.metrics`): timings, outcome, fallbacks."""
        self._service = service
        self._tee = tee
        self._copy: Optional[TeeStream] = None  # the sinks' copy, open from start() to finish()
        self._notes: list[str] = []  # degradations of the whole reply, repeated on each request line
        self._pieces = 0
        self._converter: Optional[PcmConverter] = None  # fallback audio -> the announced format, across pieces
        self._opening: Optional[Opening] = None  # closed at finish(): a parked model stays awake until then

    def note(self, what: str) -> None:
        """Record a degradation of the whole reply (each of its request lines says it)."""
        self._notes.append(what)

    def hold(self, opening: Opening) -> None:
        """Keep `opening` until `finish`: a parked model woke for this reply and stays awake until then."""
        self._opening = opening

    def start(self) -> None:
        """The audio begins: open the reply's stream on every server-side sink (one file or stream per reply)."""
        if self._tee and self._copy is None:
            info = StreamInfo(label=f"r{next(_REPLY_IDS)}", voice=self.profile.name)
            self._copy = self._tee.open(self.format, info)

    async def speak(self, text: str, *, speed: float = 1.0) -> AsyncGenerator[PcmChunk, None]:
        """Stream `text` in the reply's voice (the sinks get a copy); closing it early cancels the engine work.
        `speed` multiplies the voice's own speaking rate (kept within 0.25..4)."""
        if not text.strip():
            return
        service, record = self._service, self.record
        record.speaking()
        with service.concurrency_limit.slot(record.refused):
            self._pieces += 1
            stats = RequestStats(str(next(_REQUEST_IDS)), self.profile.name, len(text), degraded=list(self._notes))
            profile = await self._current_version(stats)
            options = SynthesisOptions(
                speed=min(4.0, max(0.25, profile.speed * speed)),
                request_id=stats.request_id,
                timeout=service.limits.engine_timeout_s,
                started=record.engine_started,
            )
            try:
                async with _closing(self._chunks(text, options, stats)) as chunks:
                    async for chunk in chunks:
                        if stats.first_audio is None:
                            stats.first_audio = time.perf_counter()
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
            finally:  # logged whatever happens to the client, a cancellation while closing included
                stats.finished = time.perf_counter()
                record.spoken()
                _LOGGER.info("%s", stats.line())

    async def _chunks(self, text: str, options: SynthesisOptions, stats: RequestStats) -> AsyncIterator[PcmChunk]:
        """The piece's audio from the voice's engine (after waiting for room), else from the fallback engine."""
        service = self._service
        fallback = service.engines.fallback_for(self.engine)
        if self.fallback_reason is None and service.settings.when_busy == "error":
            why = self.engine.room()
            if why is not None:  # refused at once, as the client asked, whatever the engine does when called
                raise ServerBusy(f"{self.engine.name} engine {why}")
        elif self.fallback_reason is None:
            why = await self._wait_for_room(fallback is not None, stats)
            if why is not None:
                self._switch(fallback, f"{self.engine.name} engine still {why}", text, stats, "busy")
        if self.fallback_reason is None:
            try:
                async with _closing(self._engine_chunks(text, options, stats)) as chunks:
                    async for chunk in chunks:
                        yield chunk
                return
            except (EngineError, ServerBusy) as err:
                if fallback is None or (isinstance(err, ServerBusy) and service.settings.when_busy == "error"):
                    raise
                cut = (
                    f" after {stats.audio_seconds:.2f} s of its audio (spoken again whole)" if stats.first_audio else ""
                )
                self._switch(fallback, f"{err}{cut}", text, stats, "busy" if isinstance(err, ServerBusy) else "failed")
        assert fallback is not None
        stats.degraded.append(f"fallback {fallback.name}")
        self.record.engine_called()
        async with _closing(fallback.synthesize(text, self.profile, options)) as chunks:
            async for chunk in chunks:
                if self._converter is None:
                    self._converter = PcmConverter(chunk.format, self.format)
                pcm = self._converter.convert(chunk.audio)
                if pcm:
                    yield PcmChunk(pcm, self.format.rate, self.format.width, self.format.channels)

    async def _wait_for_room(self, has_fallback: bool, stats: RequestStats) -> Optional[str]:
        """Wait, in order, for room in the engine (`server.busy_wait_s`; without a fallback engine up to
        `limits.engine_timeout_s`); why there was none when the bound passed (ServerBusy without a fallback)."""
        service = self._service
        queue = service.room_queue(self.engine)
        if queue is None:
            return None
        bound = service.settings.busy_wait_s
        if not has_fallback:
            bound = max(bound, service.limits.engine_timeout_s)
        why, waited = await queue.wait(bound, first=self._pieces > 1)  # a reply already playing goes first
        if why is not None and not has_fallback:
            raise ServerBusy(f"{self.engine.name} engine {why}; no room within {waited:.0f} s and no fallback engine")
        if why is None and waited > 0:
            service.degraded.note("waited")
            stats.degraded.append(f"waited {waited:.2f} s")
        return None if why is None else f"{why} after {waited:.2f} s (server.busy_wait_s)"

    async def _engine_chunks(
        self, text: str, options: SynthesisOptions, stats: RequestStats
    ) -> AsyncIterator[PcmChunk]:
        """The piece's audio from the voice's engine; tried once more when it failed before its first audio for a
        reason that passes (a hung call replaced, out of memory after the cache was freed)."""
        gain = self.profile.gain
        for attempt in (1, 2):
            try:
                self.record.engine_called()
                async with _closing(self.engine.synthesize(text, self.profile, options)) as chunks:
                    async for chunk in chunks:
                        yield chunk if gain == 1.0 else dataclasses.replace(chunk, audio=apply_gain(chunk.audio, gain))
                return
            except (EngineTimeout, EngineOutOfMemory) as err:
                if stats.first_audio is not None or attempt == 2:
                    raise
                self._service.degraded.note("retried")
                stats.degraded.append(f"retried after {type(err).__name__}")
                _LOGGER.warning(
                    "request %s: %s; trying once more on the %s engine", stats.request_id, err, self.engine.name
                )

    def _switch(self, fallback: Optional[Engine], why: str, text: str, stats: RequestStats, reason: str) -> None:
        """The fallback engine speaks this piece and the rest of the reply (`reason`, busy or failed, labels the
        metrics' fallback count)."""
        assert fallback is not None
        self.fallback_reason = why
        self._service.degraded.note("fallback")
        self.record.degraded(reason)
        _LOGGER.warning(
            "request %s (client %s, voice %s): %s; piece %d of the reply (%r) and the rest spoken by the %s engine",
            stats.request_id,
            self.client or "?",
            self.profile.name,
            why,
            self._pieces,
            _snippet(text),
            fallback.name,
        )

    async def _current_version(self, stats: RequestStats) -> VoiceProfile:
        """The voice as prepared now: a request that waited while the voice changed speaks with the new version
        (VoiceNotFound when it was removed, or now needs another engine than the one this reply's format is of).
        A request that ends here is logged too."""
        try:
            profile = await self._service.preparer.ready(self.profile)
            if profile is not self.profile and self._service.engines.engine_for(profile) is not self.engine:
                raise VoiceNotFound(
                    f"voice {profile.name!r} changed to another engine while the request waited for it; ask again"
                )
        except BaseException as err:
            if isinstance(err, Exception):
                self.record.failed(err)
            stats.end = "cancelled" if isinstance(err, asyncio.CancelledError) else type(err).__name__
            stats.finished = time.perf_counter()
            _LOGGER.info("%s", stats.line())
            raise
        self.profile = profile
        return profile

    def finish(self, ok: bool) -> None:
        """End the reply (`ok` False: cut off); the sinks finish in the background (`Service.close_sinks`)."""
        self.record.finish(ok)
        if self._opening is not None:
            self._opening.close()
        copy, self._copy = self._copy, None
        if copy is not None:
            self._service.finish_later(copy.close(ok))


@contextlib.asynccontextmanager
async def _closing(chunks: AsyncIterator[PcmChunk]) -> AsyncIterator[AsyncIterator[PcmChunk]]:
    """Close an engine's chunk iterator whatever happens (closing it cancels the engine work)."""
    try:
        yield chunks
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


def _snippet(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
