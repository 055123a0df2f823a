"""`wyoming` sink: sends each stream to a Wyoming sound-output service (wyoming-satellite, wyoming-snd-external)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Optional

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncClient
from wyoming.snd import Played

from wyoming_cosyvoice.audio import AudioFormat, PcmConverter
from wyoming_cosyvoice.client import open_client
from wyoming_cosyvoice.errors import SinkError
from wyoming_cosyvoice.hookspecs import Register, hookimpl
from wyoming_cosyvoice.sinks import StreamInfo


@dataclass(frozen=True)
class WyomingSndSettings:
    """`sinks.wyoming` settings, or `--sink wyoming:URI`."""

    uri: str = ""
    """The sound service: tcp://HOST:PORT or unix://PATH."""

    rate: Optional[int] = None
    """Sample rate the receiver expects (default: the stream's)."""

    width: Optional[int] = None
    """Bytes per sample the receiver expects: 1, 2 or 4 (default: the stream's)."""

    channels: Optional[int] = None
    """Channels the receiver expects (default: the stream's)."""

    connect_timeout: float = 5.0
    """Seconds to wait for the connection; a receiver that is down fails only this sink."""

    wait_played: bool = True
    """After audio-stop, wait for the receiver's `played` event (receivers that never send one are fine)."""

    played_grace: float = 5.0
    """Seconds to wait for `played` beyond the audio the receiver still has to play."""

    def validate(self) -> Optional[tuple[str, str]]:
        """Check the URI and format."""
        if not self.uri.startswith(("tcp://", "unix://")):
            return ("uri", f"expected tcp://HOST:PORT or unix://PATH, got {self.uri!r}")
        if self.width is not None and self.width not in (1, 2, 4):
            return ("width", "must be 1, 2 or 4")
        if self.rate is not None and not 4000 <= self.rate <= 384000:
            return ("rate", "must be between 4000 and 384000")
        if self.channels is not None and not 1 <= self.channels <= 8:
            return ("channels", "must be between 1 and 8")
        return None


class _SndStream:
    """One audio-start .. audio-stop exchange with the receiver."""

    def __init__(self, settings: WyomingSndSettings, client: AsyncClient, src: AudioFormat, dst: AudioFormat):
        self.settings = settings
        self.client = client
        self.dst = dst
        self.converter = PcmConverter(src, dst)
        self.sent = 0
        self.started = time.monotonic()

    async def write(self, pcm: bytes) -> None:
        """Convert and send one chunk (waits only on this receiver's connection)."""
        data = self.converter.convert(pcm)
        if not data:
            return
        fmt = self.dst
        await self.client.write_event(
            AudioChunk(rate=fmt.rate, width=fmt.width, channels=fmt.channels, audio=data).event()
        )
        self.sent += len(data)

    async def close(self, ok: bool) -> str:
        """Send audio-stop (also when aborted: the receiver plays what it got) and wait for `played` if asked."""
        seconds = self.dst.seconds(self.sent)
        note = ""
        try:
            await self.client.write_event(AudioStop().event())
            if ok and self.settings.wait_played:
                remaining = max(0.0, seconds - (time.monotonic() - self.started))
                note = await self._wait_played(remaining + self.settings.played_grace)
        finally:
            await _disconnect(self.client)
        state = "" if ok else " (stream interrupted)"
        return f"sent {seconds:.2f} s to {self.settings.uri} at {self.dst.rate} Hz{note}{state}"

    async def _wait_played(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return ", no played event"
            try:
                event = await asyncio.wait_for(self.client.read_event(), left)
            except asyncio.TimeoutError:
                return ", no played event"
            if event is None:
                return ""
            if Played.is_type(event.type):
                return ", played"


async def _disconnect(client: AsyncClient) -> None:
    try:
        await asyncio.wait_for(client.disconnect(), 2.0)
    except (OSError, asyncio.TimeoutError):
        pass


class WyomingSndSink:
    """Sends each stream to one Wyoming sound service, converted to the format it expects."""

    def __init__(self, settings: WyomingSndSettings) -> None:
        self.settings = settings
        self.name = f"wyoming:{settings.uri}"

    async def open(self, fmt: AudioFormat, info: StreamInfo) -> _SndStream:
        """Connect and send audio-start in the receiver's format."""
        s = self.settings
        dst = AudioFormat(s.rate or fmt.rate, s.width or fmt.width, s.channels or fmt.channels)
        client = await open_client(s.uri, s.connect_timeout, SinkError)
        try:
            await client.write_event(AudioStart(rate=dst.rate, width=dst.width, channels=dst.channels).event())
        except BaseException:
            await _disconnect(client)
            raise
        return _SndStream(s, client, fmt, dst)


@hookimpl
def register_sinks(register: Register) -> None:
    """Register the `wyoming` network sink."""
    register("wyoming", lambda section: WyomingSndSink(section.parse(WyomingSndSettings)), spec_key="uri")
