"""Wyoming TTS client (used by `say` and `bench`): describe, one-shot and streaming synthesis, with timing.

Works against any Wyoming TTS server: audio may come as several audio-start/-stop runs, with no audio-start at
all, or in another format mid-reply; everything a reply yields is converted to the reply's first format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterable, AsyncIterator, Callable, Optional

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

from .audio import AudioFormat, PcmConverter
from .engine import ENGINE_PARK, ENGINE_STATE, ENGINE_WAKE
from .errors import ClientError, CosyVoiceServiceError, RemoteError

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class AudioPiece:
    """A piece of a reply's audio, in the reply's format."""

    pcm: bytes
    """PCM bytes."""

    fmt: AudioFormat
    """The reply's format (the first one the server announced)."""

    at: float
    """Seconds since the request's first text was sent."""


@dataclass
class ReplyStats:
    """Timing of one reply, filled in while it streams."""

    started: float = 0.0
    """perf_counter() when the first text went out."""

    first_audio: Optional[float] = None
    """Seconds from the first text to the first audio chunk."""

    input_closed: Optional[float] = None
    """Seconds from the first text to the end of the input (streaming: synthesize-stop sent)."""

    total: float = 0.0
    """Seconds from the first text to the end of the reply."""

    audio_bytes: int = 0
    """PCM received, in the reply's format."""

    chunks: int = 0
    """audio-chunk events received."""

    audio_starts: int = 0
    """audio-start events received (some servers send one per sentence)."""

    fmt: Optional[AudioFormat] = None
    """The reply's format."""

    @property
    def audio_seconds(self) -> float:
        """Duration of the audio received."""
        return self.fmt.seconds(self.audio_bytes) if self.fmt else 0.0

    @property
    def rtf(self) -> Optional[float]:
        """Real-time factor: seconds of waiting per second of audio (below 1 is faster than real time)."""
        return self.total / self.audio_seconds if self.audio_seconds else None

    def line(self) -> str:
        """One line for the terminal."""
        ttfa = f"{self.first_audio * 1000:.0f} ms" if self.first_audio is not None else "none"
        rtf = f"{self.rtf:.3f}" if self.rtf is not None else "n/a"
        return (
            f"time to first audio: {ttfa}, audio: {self.audio_seconds:.2f} s in {self.total:.2f} s, "
            f"real-time factor: {rtf}"
        )


@dataclass
class _Assembler:
    """Turns audio events of any well-formed shape into pieces in one format."""

    stats: ReplyStats
    converters: dict[AudioFormat, PcmConverter] = field(default_factory=dict)

    def start(self, event: Event) -> None:
        start = AudioStart.from_event(event)
        self.stats.audio_starts += 1
        if self.stats.fmt is None:
            self.stats.fmt = AudioFormat(start.rate, start.width, start.channels)

    def chunk(self, event: Event) -> Optional[AudioPiece]:
        chunk = AudioChunk.from_event(event)
        fmt = AudioFormat(chunk.rate, chunk.width, chunk.channels)
        stats = self.stats
        if stats.fmt is None:
            stats.fmt = fmt  # a server that sends no audio-start
        pcm = chunk.audio
        if fmt != stats.fmt:
            converter = self.converters.get(fmt)
            if converter is None:
                _LOGGER.info("server changed format mid-reply (%s -> %s); converting", fmt, stats.fmt)
                converter = self.converters[fmt] = PcmConverter(fmt, stats.fmt)
            pcm = converter.convert(pcm)
        stats.chunks += 1
        if not pcm:
            return None
        now = time.perf_counter() - stats.started
        if stats.first_audio is None:
            stats.first_audio = now
        stats.audio_bytes += len(pcm)
        return AudioPiece(pcm, stats.fmt, now)


def _voice(voice: Optional[str], language: Optional[str]) -> Optional[SynthesizeVoice]:
    if not voice and not language:
        return None
    return SynthesizeVoice(name=voice or None, language=language or None)


async def open_client(
    uri: str, connect_timeout: Optional[float], error: type[CosyVoiceServiceError] = ClientError
) -> AsyncClient:
    """A connected `wyoming` AsyncClient for `uri`; a bad URI, a timeout or a refusal raises `error` (one line)."""
    try:
        client = AsyncClient.from_uri(uri, connect_timeout=connect_timeout)
    except ValueError as err:
        raise error(f"{uri}: {err}") from None
    try:
        await client.connect()
    except asyncio.TimeoutError:
        raise error(f"cannot connect to {uri}: no answer within {connect_timeout:g} s") from None
    except OSError as err:
        raise error(f"cannot connect to {uri}: {err.strerror or err}") from None
    return client


class TtsClient:
    """One connection to a Wyoming TTS server; requests run one after another."""

    def __init__(self, uri: str, *, connect_timeout: float = 10.0, read_timeout: float = 60.0) -> None:
        self.uri = uri
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        """Longest wait for any single event from the server."""
        self._client: Optional[AsyncClient] = None
        self._info: Optional[Info] = None

    async def __aenter__(self) -> "TtsClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the connection; failures are one-line ClientErrors."""
        self._client = await open_client(self.uri, self.connect_timeout, ClientError)

    async def close(self) -> None:
        """Close the connection."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(client.disconnect(), 2.0)

    async def _write(self, event: Event) -> None:
        assert self._client is not None, "not connected"
        try:
            await self._client.write_event(event)
        except (ConnectionError, OSError) as err:
            raise ClientError(f"{self.uri}: connection lost while sending: {err}") from None

    async def _read(self, busy: Optional["asyncio.Task[None]"] = None) -> Event:
        """The next event; the read timeout only runs while the server owes us something (not while `busy`)."""
        assert self._client is not None, "not connected"
        reading = asyncio.ensure_future(self._client.read_event())
        try:
            while True:
                done, _ = await asyncio.wait({reading}, timeout=self.read_timeout)
                if done:
                    break
                if busy is None or busy.done():
                    raise ClientError(f"{self.uri}: no answer within {self.read_timeout:g} s")
            event = reading.result()
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as err:
            raise ClientError(f"{self.uri}: connection lost: {err}") from None
        finally:
            if not reading.done():
                reading.cancel()
        if event is None:
            raise ClientError(f"{self.uri}: server closed the connection before the reply ended")
        if Error.is_type(event.type):
            error = Error.from_event(event)
            code = f" ({error.code})" if error.code else ""
            raise RemoteError(f"server error{code}: {error.text}")
        return event

    async def describe(self) -> Info:
        """Ask the server what it offers."""
        await self._write(Describe().event())
        while True:
            event = await self._read()
            if Info.is_type(event.type):
                self._info = Info.from_event(event)
                return self._info

    async def engine_control(self, action: str) -> dict[str, str]:
        """`park` or `wake` the server's engines that park (this server's own events): engine name -> state after."""
        await self._write(Event(ENGINE_WAKE if action == "wake" else ENGINE_PARK))
        while True:
            event = await self._read()
            if event.type == ENGINE_STATE:
                engines = (event.data or {}).get("engines") or {}
                return {str(k): str(v) for k, v in engines.items()} if isinstance(engines, dict) else {}

    async def supports_streaming(self) -> bool:
        """Whether the server advertises streaming synthesis (asks once)."""
        info = self._info or await self.describe()
        return any(p.supports_synthesize_streaming for p in info.tts)

    async def synthesize(
        self, text: str, voice: Optional[str] = None, language: Optional[str] = None, stats: Optional[ReplyStats] = None
    ) -> AsyncIterator[AudioPiece]:
        """One `synthesize` request: audio pieces until audio-stop."""
        stats = stats if stats is not None else ReplyStats()
        assembler = _Assembler(stats)
        stats.started = time.perf_counter()
        await self._write(Synthesize(text=text, voice=_voice(voice, language)).event())
        stats.input_closed = 0.0
        async for piece in self._audio_until(assembler, AudioStop.is_type):
            yield piece
        stats.total = time.perf_counter() - stats.started

    async def synthesize_stream(
        self,
        texts: AsyncIterable[str],
        voice: Optional[str] = None,
        language: Optional[str] = None,
        stats: Optional[ReplyStats] = None,
        streaming: Optional[bool] = None,
    ) -> AsyncIterator[AudioPiece]:
        """Send text as it comes (synthesize-start/-chunk/-stop) and yield audio meanwhile.

        Against a server without streaming support, each text becomes its own `synthesize`, in order.
        """
        if streaming is None:
            streaming = await self.supports_streaming()
        stats = stats if stats is not None else ReplyStats()
        assembler = _Assembler(stats)
        if not streaming:
            async for piece in self._stream_fallback(texts, voice, language, assembler):
                yield piece
            return
        sender = asyncio.create_task(self._send_stream(texts, voice, language, stats), name="tts text sender")
        try:
            async for piece in self._audio_until(assembler, SynthesizeStopped.is_type, sender):
                yield piece
            await sender  # surfaces a failure to send
        finally:
            if not sender.done():
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
        stats.total = time.perf_counter() - stats.started

    async def _send_stream(
        self, texts: AsyncIterable[str], voice: Optional[str], language: Optional[str], stats: ReplyStats
    ) -> None:
        await self._write(SynthesizeStart(voice=_voice(voice, language)).event())
        async for text in texts:
            if not text:
                continue
            if not stats.started:
                stats.started = time.perf_counter()
            await self._write(SynthesizeChunk(text=text).event())
        if not stats.started:
            stats.started = time.perf_counter()
        await self._write(SynthesizeStop().event())
        stats.input_closed = time.perf_counter() - stats.started

    async def _stream_fallback(
        self, texts: AsyncIterable[str], voice: Optional[str], language: Optional[str], assembler: _Assembler
    ) -> AsyncIterator[AudioPiece]:
        stats = assembler.stats
        async for text in texts:
            if not text.strip():
                continue
            if not stats.started:
                stats.started = time.perf_counter()
            await self._write(Synthesize(text=text.strip(), voice=_voice(voice, language)).event())
            async for piece in self._audio_until(assembler, AudioStop.is_type):
                yield piece
        stats.input_closed = time.perf_counter() - stats.started if stats.started else 0.0
        stats.total = time.perf_counter() - stats.started if stats.started else 0.0

    async def _audio_until(
        self, assembler: _Assembler, is_end: Callable[[str], bool], sender: Optional["asyncio.Task[None]"] = None
    ) -> AsyncIterator[AudioPiece]:
        """Yield audio until an event for which `is_end(type)` holds."""
        while True:
            if sender is not None and sender.done() and sender.exception() is not None:
                raise sender.exception()  # type: ignore[misc]
            event = await self._read(sender)
            if AudioStart.is_type(event.type):
                assembler.start(event)
            elif AudioChunk.is_type(event.type):
                piece = assembler.chunk(event)
                if piece is not None:
                    yield piece
            if is_end(event.type):
                return
