"""Real Wyoming peers for tests: a sound-output receiver and a foreign (non-CosyVoice) TTS server.

Both are the `wyoming` library's AsyncServer on 127.0.0.1:<ephemeral> with small handlers, so the code under test
talks to them over real TCP exactly as it would to wyoming-satellite's snd service or to wyoming-piper.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from functools import partial
from typing import AsyncIterator, Optional

import numpy as np
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import Event
from wyoming.info import Attribution, Describe, Info, TtsProgram, TtsVoice
from wyoming.server import AsyncEventHandler, AsyncServer
from wyoming.snd import Played
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped


def port_of(server: AsyncServer) -> int:
    """The bound port of a started AsyncTcpServer."""
    return server._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def serve(factory: object) -> AsyncIterator[int]:
    """Run an AsyncServer with `factory` on an ephemeral port; yields the port."""
    server = AsyncServer.from_uri("tcp://127.0.0.1:0")
    await server.start(factory)  # type: ignore[arg-type]
    try:
        yield port_of(server)
    finally:
        await server.stop()


def tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1) -> bytes:
    """A 16-bit sine wave with a slow ramp so every sample differs (catches reordering and drops)."""
    n = int(seconds * rate)
    t = np.arange(n) / rate
    wave = 0.3 * np.sin(2 * np.pi * freq * t) * (0.5 + 0.5 * t / max(seconds, 1e-9))
    frames = np.repeat(wave[:, None], channels, axis=1)
    return (frames * 32767).astype("<i2").tobytes()


# ------------------------------------------------------------------------------------------ sound receiver


@dataclass
class Received:
    """One audio-start .. audio-stop run as a receiver saw it."""

    start: AudioStart
    audio: bytearray = field(default_factory=bytearray)
    chunks: int = 0
    stopped: bool = False


@dataclass
class SoundReceiver:
    """State of a Wyoming sound-output service (what wyoming-satellite's snd service does, minus the speaker)."""

    send_played: bool = True
    event_delay: float = 0.0
    """Seconds to sleep per event (a slow receiver)."""
    hold: Optional[asyncio.Event] = None
    """When set: stop reading after audio-start until this event is set (a stalled receiver)."""
    streams: list[Received] = field(default_factory=list)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    def factory(self) -> object:
        """Handler factory for AsyncServer.start."""
        return partial(_ReceiverHandler, receiver=self)


class _ReceiverHandler(AsyncEventHandler):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, receiver: SoundReceiver) -> None:
        super().__init__(reader, writer)
        self.receiver = receiver

    async def handle_event(self, event: Event) -> bool:
        r = self.receiver
        if r.event_delay:
            await asyncio.sleep(r.event_delay)
        if AudioStart.is_type(event.type):
            r.streams.append(Received(AudioStart.from_event(event)))
            if r.hold is not None:
                await r.hold.wait()
        elif AudioChunk.is_type(event.type):
            chunk = AudioChunk.from_event(event)
            r.streams[-1].audio += chunk.audio
            r.streams[-1].chunks += 1
        elif AudioStop.is_type(event.type):
            r.streams[-1].stopped = True
            r.stopped.set()
            if r.send_played:
                await self.write_event(Played().event())
        return True


# ------------------------------------------------------------------------------------------ foreign TTS server


@dataclass
class ForeignTts:
    """A TTS server that is not ours: its own rate, several audio-start runs, optional format changes."""

    rate: int = 16000
    runs: int = 2
    """audio-start/-stop runs per reply (some servers send one per sentence)."""
    chunks_per_run: int = 3
    send_start: bool = True
    streaming: bool = False
    drop_after_chunks: Optional[int] = None
    """Close the connection after this many chunks (a server that dies mid-reply)."""
    hang_after_chunks: Optional[int] = None
    """Stop sending after this many chunks but keep the connection open."""
    chunk_seconds: float = 0.1
    chunk_delay: float = 0.0
    """Seconds between chunks (a server slower than the network)."""
    rates: Optional[list[int]] = None
    """Per-run sample rates (a server that changes format mid-reply); default: `rate` for every run."""
    requests: list[str] = field(default_factory=list)
    sent: bytearray = field(default_factory=bytearray)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def factory(self) -> object:
        """Handler factory for AsyncServer.start."""
        return partial(_ForeignHandler, tts=self)

    def info(self) -> Info:
        """A piper-like info."""
        attribution = Attribution(name="test", url="https://example.invalid")
        voice = TtsVoice(
            name="en_US-test",
            description="Test voice",
            attribution=attribution,
            installed=True,
            version="1.0",
            languages=["en_US"],
        )
        program = TtsProgram(
            name="foreign-tts",
            description="Not CosyVoice",
            attribution=attribution,
            installed=True,
            version="9.9",
            voices=[voice],
            supports_synthesize_streaming=self.streaming,
        )
        return Info(tts=[program])


class _ForeignHandler(AsyncEventHandler):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tts: ForeignTts) -> None:
        super().__init__(reader, writer)
        self.tts = tts
        self.streamed: list[str] = []
        self.sent_chunks = 0

    async def handle_event(self, event: Event) -> bool:
        tts = self.tts
        if Describe.is_type(event.type):
            await self.write_event(tts.info().event())
        elif Synthesize.is_type(event.type):
            tts.requests.append(Synthesize.from_event(event).text)
            return await self._reply(stop_each_run=False)
        elif SynthesizeStart.is_type(event.type):
            self.streamed = []
        elif SynthesizeChunk.is_type(event.type):
            self.streamed.append(SynthesizeChunk.from_event(event).text)
        elif SynthesizeStop.is_type(event.type):
            tts.requests.append("".join(self.streamed))
            alive = await self._reply(stop_each_run=True)
            if alive:
                await self.write_event(SynthesizeStopped().event())
            return alive
        return True

    async def _reply(self, stop_each_run: bool) -> bool:
        """Streaming: audio-start/-stop per run. One-shot: an audio-start per run, one audio-stop at the end."""
        tts = self.tts
        for run in range(tts.runs):
            rate = tts.rates[run] if tts.rates else tts.rate
            n = int(tts.chunk_seconds * rate)
            if tts.send_start:
                await self.write_event(AudioStart(rate=rate, width=2, channels=1).event())
            for _ in range(tts.chunks_per_run):
                if tts.drop_after_chunks is not None and self.sent_chunks >= tts.drop_after_chunks:
                    self.writer.close()
                    return False
                if tts.hang_after_chunks is not None and self.sent_chunks >= tts.hang_after_chunks:
                    await tts.release.wait()
                    return False
                if tts.chunk_delay and self.sent_chunks:
                    await asyncio.sleep(tts.chunk_delay)
                k = len(tts.sent) // 2
                pcm = tone(tts.chunk_seconds, rate, freq=300.0 + 100 * run)[: n * 2]
                pcm = (np.frombuffer(pcm, "<i2") + np.int16(k % 7)).astype("<i2").tobytes()
                tts.sent += pcm
                self.sent_chunks += 1
                await self.write_event(AudioChunk(rate=rate, width=2, channels=1, audio=pcm).event())
            if stop_each_run:
                await self.write_event(AudioStop().event())
        if not stop_each_run:
            await self.write_event(AudioStop().event())
        return True
