"""`speaker` sink: real-time playback through PortAudio (sounddevice) behind a small jitter buffer."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from wyoming_cosyvoice.audio import AudioFormat, PcmConverter
from wyoming_cosyvoice.errors import NoAudioDevice, SinkError
from wyoming_cosyvoice.extras import require
from wyoming_cosyvoice.hookspecs import Register, hookimpl
from wyoming_cosyvoice.sinks import StreamInfo

_LOGGER = logging.getLogger(__name__)

_END: Any = object()
_PIECE_SECONDS = 0.05
"""Audio per device write: small enough that an abort takes effect within ~50 ms."""


@dataclass(frozen=True)
class SpeakerSettings:
    """`sinks.speaker` settings, or `say --device/--jitter-ms/--device-rate`."""

    device: Optional[Union[int, str]] = None
    """Output device: index, or (part of) its name; default: the system's default output."""

    jitter_ms: int = 150
    """Audio buffered before playback starts (and again after an underrun): absorbs network and GPU jitter."""

    rate: Optional[int] = None
    """Play at this rate, resampling the stream (default: the stream's rate when the device takes it)."""

    def validate(self) -> Optional[tuple[str, str]]:
        """Check ranges."""
        if not 0 <= self.jitter_ms <= 10000:
            return ("jitter_ms", "must be between 0 and 10000")
        if self.rate is not None and not 4000 <= self.rate <= 384000:
            return ("rate", "must be between 4000 and 384000")
        return None


def choose_rate(stream_rate: int, forced: Optional[int], device_takes: Callable[[int], bool], default: int) -> int:
    """The playback rate: forced, else the stream's when the device takes it, else the device's default."""
    if forced:
        return forced
    if device_takes(stream_rate):
        return stream_rate
    return default


def _import_sounddevice() -> Any:
    require("speaker", "playing on the speaker (use --out FILE.wav to save the audio instead)")
    try:
        import sounddevice
    except OSError as err:  # sounddevice raises OSError when libportaudio is missing
        raise NoAudioDevice(f"speaker: PortAudio library not available ({err}); install libportaudio2") from None
    return sounddevice


class _Player:
    """One output stream fed by a writer thread; the event loop only queues bytes."""

    def __init__(self, sd: Any, device: int, fmt: AudioFormat, rate: int, channels: int, jitter_ms: int) -> None:
        self.sd = sd
        self.device = device
        self.rate = rate
        self.channels = channels
        self.converter = PcmConverter(fmt, AudioFormat(rate, 2, channels))
        self.out_bps = rate * 2 * channels
        self.jitter_bytes = int(self.out_bps * jitter_ms / 1000) // (2 * channels) * (2 * channels)
        self.piece_bytes = max(2 * channels, int(self.out_bps * _PIECE_SECONDS) // (2 * channels) * (2 * channels))
        self.high_water = max(self.out_bps * 2, self.jitter_bytes * 4)
        self.queue: "queue.Queue[Any]" = queue.Queue()
        self.queued = 0
        self.lock = threading.Lock()
        self.abort = threading.Event()
        self.played_bytes = 0
        self.underruns = 0
        self.first_sound: Optional[float] = None
        self.opened = time.monotonic()
        self.error: Optional[BaseException] = None
        self.stream: Any = None
        self.done: "asyncio.Future[None]" = asyncio.get_running_loop().create_future()
        self.thread: Optional[threading.Thread] = None

    def open_stream(self) -> None:
        self.stream = self.sd.RawOutputStream(
            samplerate=self.rate, channels=self.channels, dtype="int16", device=self.device, latency="high"
        )

    def start_thread(self) -> None:
        loop = asyncio.get_running_loop()

        def finished() -> None:
            if not self.done.done():
                self.done.set_result(None)

        def run() -> None:
            try:
                self._play()
            except BaseException as err:  # reported by close()
                self.error = err
            finally:
                loop.call_soon_threadsafe(finished)

        self.thread = threading.Thread(target=run, name="speaker", daemon=True)
        self.thread.start()

    def _take(self, block: bool) -> Any:
        try:
            data = self.queue.get(block=block, timeout=0.05 if block else None)
        except queue.Empty:
            return None
        if data is _END:
            return data
        with self.lock:
            self.queued -= len(data)
        return data

    def _prime(self, pending: bytearray) -> bool:
        """Fill `pending` up to the jitter buffer; False when the stream ended meanwhile."""
        while len(pending) < self.jitter_bytes and not self.abort.is_set():
            data = self._take(block=True)
            if data is None:
                continue
            if data is _END:
                return False
            pending += data
        return True

    def _play(self) -> None:
        pending = bytearray()
        more = self._prime(pending)
        if self.abort.is_set():
            self.stream.close()
            return
        self.stream.start()
        rebuffer = False
        while not self.abort.is_set():
            if rebuffer and more:
                more = self._prime(pending)
                rebuffer = False
            if not pending:
                if not more:
                    break
                data = self._take(block=True)
                if data is None:
                    continue
                if data is _END:
                    more = False
                    continue
                pending += data
            piece = bytes(pending[: self.piece_bytes])
            del pending[: len(piece)]
            if self.first_sound is None:
                self.first_sound = time.monotonic()
            if self.stream.write(piece):
                self.underruns += 1
                rebuffer = True  # the device ran dry: rebuild the cushion before going on
            self.played_bytes += len(piece)
            while more and len(pending) < self.piece_bytes:
                data = self._take(block=False)
                if data is None:
                    break
                if data is _END:
                    more = False
                else:
                    pending += data
        if self.abort.is_set():
            self.stream.abort()
        else:
            self.stream.stop()  # returns once the device has played everything written
        self.stream.close()


class _SpeakerStream:
    """Async face of a _Player."""

    def __init__(self, player: _Player, name: str) -> None:
        self.player = player
        self.name = name

    async def write(self, pcm: bytes) -> None:
        """Queue audio for the device, waiting while more than ~2 s is queued (the Tee's lane holds the rest)."""
        player = self.player
        if player.error is not None:
            raise SinkError(f"speaker: playback failed: {player.error}")
        data = player.converter.convert(pcm)
        while player.queued > player.high_water and not player.done.done():
            await asyncio.sleep(0.02)
        with player.lock:
            player.queued += len(data)
        if data:
            player.queue.put(data)

    async def close(self, ok: bool) -> str:
        """Play out what is queued (ok) or stop at once (aborted); report what was played and underruns."""
        player = self.player
        if not ok:
            player.abort.set()
        player.queue.put(_END)
        await player.done
        if player.error is not None:
            raise SinkError(f"speaker: playback failed: {player.error}")
        seconds = player.played_bytes / player.out_bps
        start = f", sound after {(player.first_sound - player.opened) * 1000:.0f} ms" if player.first_sound else ""
        state = "" if ok else " (stopped early)"
        return f"played {seconds:.2f} s at {player.rate} Hz{start}, underruns: {player.underruns}{state}"


class SpeakerSink:
    """Plays each stream on an output device as it arrives."""

    def __init__(self, settings: SpeakerSettings) -> None:
        self.settings = settings
        self.sd = _import_sounddevice()
        device: Optional[Union[int, str]] = settings.device
        if isinstance(device, str) and device.strip().isdigit():
            device = int(device)
        try:
            found = self.sd.query_devices(device, kind="output")
        except ValueError as err:
            names = self._output_names()
            problem = str(err).replace("No output device", "no output device")
            raise SinkError(f"speaker: {problem} (output devices: {names or 'none'})") from None
        except self.sd.PortAudioError as err:
            raise NoAudioDevice(f"speaker: no audio output device available ({err})") from None
        if int(found.get("max_output_channels", 0)) < 1:
            raise SinkError(f"speaker: device {found['name']!r} has no output channels")
        self.device: int = int(found["index"])
        self.max_channels = int(found["max_output_channels"])
        self.default_rate = int(found.get("default_samplerate") or 48000)
        self.name = f"speaker:{found['name']}"

    def _output_names(self) -> str:
        try:
            devices = self.sd.query_devices()
        except Exception:  # noqa: BLE001 - only for the error message
            return ""
        return ", ".join(f"{d['index']}: {d['name']}" for d in devices if d.get("max_output_channels", 0) > 0)

    def _takes(self, rate: int, channels: int) -> bool:
        try:
            self.sd.check_output_settings(device=self.device, samplerate=rate, channels=channels, dtype="int16")
        except Exception:  # noqa: BLE001 - PortAudio reports unsupported settings in several ways
            return False
        return True

    async def open(self, fmt: AudioFormat, info: StreamInfo) -> _SpeakerStream:
        """Open the device for one stream, resampling when it cannot take the stream's rate."""
        channels = min(fmt.channels, self.max_channels)
        rate = choose_rate(fmt.rate, self.settings.rate, lambda r: self._takes(r, channels), self.default_rate)
        if rate != fmt.rate:
            _LOGGER.info("%s: playing %d Hz audio at %d Hz (resampled)", self.name, fmt.rate, rate)
        player = _Player(self.sd, self.device, fmt, rate, channels, self.settings.jitter_ms)
        try:
            await asyncio.to_thread(player.open_stream)
        except Exception as err:  # noqa: BLE001 - PortAudio errors carry their own text
            raise SinkError(f"{self.name}: cannot open output stream at {rate} Hz: {err}") from None
        player.start_thread()
        return _SpeakerStream(player, self.name)


@hookimpl
def register_sinks(register: Register) -> None:
    """Register the `speaker` sink."""
    register("speaker", lambda section: SpeakerSink(section.parse(SpeakerSettings)), spec_key="device")
