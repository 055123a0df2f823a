"""The audio format of a stream, and PCM helpers: float/int conversion, gain, chunking, format conversion and
resampling (numpy, no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np


@dataclass(frozen=True)
class AudioFormat:
    """PCM format of one audio stream (little-endian signed samples; 8-bit is unsigned, as in WAV)."""

    rate: int
    """Samples per second."""

    width: int = 2
    """Bytes per sample."""

    channels: int = 1
    """Interleaved channels."""

    @property
    def frame_bytes(self) -> int:
        """Bytes per frame (one sample of every channel)."""
        return self.width * self.channels

    @property
    def bytes_per_second(self) -> int:
        """Bytes of PCM per second of audio."""
        return self.rate * self.frame_bytes

    def seconds(self, nbytes: int) -> float:
        """Duration of `nbytes` of PCM in this format."""
        return nbytes / self.bytes_per_second

    def nbytes(self, seconds: float) -> int:
        """Bytes of the whole frames in `seconds` of audio."""
        return int(seconds * self.rate) * self.frame_bytes


def float_to_pcm16(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] -> 16-bit little-endian PCM, clipped (NaN becomes silence)."""
    data = np.nan_to_num(np.asarray(samples, dtype=np.float32).reshape(-1), nan=0.0, posinf=1.0, neginf=-1.0)
    return (np.clip(data, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def pcm16_to_float(pcm: bytes) -> np.ndarray:
    """16-bit little-endian PCM -> float32 samples in [-1, 1]."""
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


def apply_gain(pcm: bytes, gain: float) -> bytes:
    """Scale 16-bit PCM by `gain`, clipping instead of wrapping."""
    if gain == 1.0:
        return pcm
    data = np.frombuffer(pcm, dtype="<i2").astype(np.float32) * gain
    return np.clip(data, -32768, 32767).astype("<i2").tobytes()


def split_pcm(pcm: bytes, max_bytes: int, frame_bytes: int = 2) -> Iterator[bytes]:
    """Split PCM into pieces of at most `max_bytes`, on sample-frame boundaries."""
    step = max(frame_bytes, max_bytes - max_bytes % frame_bytes)
    for start in range(0, len(pcm), step):
        yield pcm[start : start + step]


def to_float_frames(pcm: bytes, width: int, channels: int) -> np.ndarray:
    """PCM of 1, 2 or 4 bytes per sample -> float32 array of shape (frames, channels)."""
    if width == 1:
        data = (np.frombuffer(pcm, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        data = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 4:
        data = np.frombuffer(pcm, dtype="<i4").astype(np.float32) / 2147483648.0
    else:
        raise ValueError(f"unsupported sample width {width}")
    frames = len(data) // channels
    return data[: frames * channels].reshape(frames, channels)


def from_float_frames(frames: np.ndarray, width: int) -> bytes:
    """float32 (frames, channels) -> interleaved PCM of `width` bytes, clipped."""
    data = np.clip(frames.reshape(-1), -1.0, 1.0)
    if width == 1:
        return (data * 127.0 + 128.0).astype(np.uint8).tobytes()
    if width == 2:
        return (data * 32767.0).astype("<i2").tobytes()
    if width == 4:
        return (data.astype(np.float64) * 2147483647.0).astype("<i4").tobytes()
    raise ValueError(f"unsupported sample width {width}")


def remix(frames: np.ndarray, channels: int) -> np.ndarray:
    """Change the channel count: average down to mono, or copy mono to every channel."""
    if frames.shape[1] == channels:
        return frames
    mono = frames.mean(axis=1, keepdims=True)
    return np.repeat(mono, channels, axis=1)


def resample_clip(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling of a whole short clip (a reference recording) via the FFT: exact length, no aliasing
    when going down (e.g. to 16 kHz); float32 mono in and out."""
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    if rate_in == rate_out or len(samples) == 0:
        return samples
    count = max(1, int(round(len(samples) * rate_out / rate_in)))
    spectrum = np.fft.rfft(samples.astype(np.float64))
    keep = min(len(spectrum), count // 2 + 1)
    out = np.fft.irfft(spectrum[:keep], n=count) * (count / len(samples))
    return out.astype(np.float32)


class StreamResampler:
    """Linear-interpolation resampler that keeps its phase across chunks (no clicks at chunk edges)."""

    def __init__(self, rate_in: int, rate_out: int, channels: int = 1) -> None:
        self.rate_in = rate_in
        self.rate_out = rate_out
        self._pos = 0.0  # position of the next output sample, in input samples relative to _prev
        self._prev = np.zeros((1, channels), dtype=np.float32)

    def process(self, frames: np.ndarray) -> np.ndarray:
        """Resample a (frames, channels) float block; returns what can be produced so far."""
        if self.rate_in == self.rate_out or len(frames) == 0:
            return frames
        data = np.concatenate([self._prev, frames.astype(np.float32)])
        step = self.rate_in / self.rate_out
        last = len(data) - 1
        positions = np.arange(self._pos, last, step)
        if len(positions) == 0:
            self._pos -= len(frames)
            self._prev = data[-1:]
            return np.zeros((0, frames.shape[1]), dtype=np.float32)
        idx = positions.astype(np.int64)
        frac = (positions - idx)[:, None].astype(np.float32)
        out = data[idx] * (1.0 - frac) + data[idx + 1] * frac
        self._pos = positions[-1] + step - last
        self._prev = data[-1:]
        return out


class PcmConverter:
    """Converts a PCM stream from one format to another, chunk by chunk."""

    def __init__(self, src: AudioFormat, dst: AudioFormat) -> None:
        self.src = src
        self.dst = dst
        self._resampler = StreamResampler(src.rate, dst.rate, dst.channels)

    def convert(self, pcm: bytes) -> bytes:
        """Convert one chunk; the output may be slightly shorter or longer as the resampler's phase moves."""
        if self.src == self.dst:
            return pcm
        frames = to_float_frames(pcm, self.src.width, self.src.channels)
        frames = remix(frames, self.dst.channels)
        frames = self._resampler.process(frames)
        return from_float_frames(frames, self.dst.width)


class Playback:
    """Would a listener who starts playing at the first chunk have run dry? The one rule the `bench` command and the
    server's metrics share: a chunk that arrives later after the first chunk than the audio before it lasts means
    playback waited; with playback pausing until audio is there, the waits add up to the largest such lag."""

    __slots__ = ("first", "audio", "stall", "earlier", "total")

    def __init__(self) -> None:
        self.first = 0.0
        """When the first chunk (of the current run of playback) arrived; 0: none yet."""
        self.audio = 0.0
        """Seconds of audio received in the current run."""
        self.stall = 0.0
        """How long the current run's playback waited for audio, in seconds."""
        self.earlier = 0.0
        """Waits of the runs that ended (see `rest`)."""
        self.total = 0.0
        """Seconds of audio received in all."""

    def chunk(self, now: float, seconds: float) -> None:
        """A chunk of `seconds` of audio arrived at `now` (time.perf_counter)."""
        if not self.first:
            self.first = now
        else:
            lag = (now - self.first) - self.audio
            if lag > self.stall:
                self.stall = lag
        self.audio += seconds
        self.total += seconds

    def rest(self, now: float) -> None:
        """The sender waits for more text: if playback has played everything by `now`, the next chunk starts a new
        run (waiting for text that was not there yet is no underrun); else playback goes on."""
        if self.first and now - self.first - self.stall >= self.audio:
            self.earlier += self.stall
            self.first, self.audio, self.stall = 0.0, 0.0, 0.0

    @property
    def dry_seconds(self) -> float:
        """How long playback would have waited for audio in all (0: it never ran dry)."""
        return self.earlier + self.stall
