"""Opening a recording safely: the one header check every reference passes (uploads and files) before any sample is
decoded, and block-wise decoding to mono so memory never depends on what the file claims.

A compressed file can describe hours of sound in a few hundred kilobytes (a FLAC of constant audio), and a header
can say "length unknown": both are refused from the header alone, before a sample is decoded. numpy + soundfile only.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import soundfile as sf

from .errors import VoiceError

FORMATS = ("WAV", "WAVEX", "RF64", "W64", "FLAC")
"""Accepted containers (libsndfile names): WAV in its variants, and FLAC."""

MIN_RATE = 16000
"""Lowest accepted sample rate (CosyVoice's speech tokenizer works at 16 kHz)."""

MAX_RATE = 192000
"""Highest accepted sample rate (the highest studio rate in common use)."""

MAX_CHANNELS = 8
"""Most channels accepted (7.1 sound); they are mixed down to mono block by block."""

BLOCK_SECONDS = 1.0
"""Audio decoded at once while scanning a recording."""

_UNKNOWN_FRAMES = 2**62
"""libsndfile reports a length it does not know (a FLAC header without a sample count) as a huge number."""

_SAMPLE_BYTES = {"PCM_S8": 1, "PCM_U8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8}
_HEADER_SLACK = 4 * 1024 * 1024
"""Room for metadata chunks (LIST, bext, a FLAC picture) beyond the samples the header describes."""

Source = Union[Path, bytes, bytearray]
"""A recording: a file on disk, or an upload held in memory."""

_ERRORS = (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError)


def _size(source: Source, label: Path) -> int:
    if isinstance(source, (bytes, bytearray)):
        return len(source)
    try:
        stat = Path(source).stat()
    except FileNotFoundError:
        raise VoiceError(f"reference audio {label}: file not found") from None
    except OSError as err:
        raise VoiceError(f"reference audio {label}: cannot read: {err.strerror or err}") from None
    if Path(source).is_dir():
        raise VoiceError(f"reference audio {label}: is a folder, not an audio file")
    return stat.st_size


@contextlib.contextmanager
def open_recording(
    source: Source, label: Path, max_seconds: Optional[float], *, min_rate: int = MIN_RATE
) -> Iterator[sf.SoundFile]:
    """The recording opened for reading once its header passed every check; VoiceError (one line) otherwise.

    Checked: container, sample rate (`min_rate` to `MAX_RATE`), channels, a known length of at most `max_seconds`
    (None: any known length), and a size no larger than the samples the header describes. Nothing is decoded here.
    """
    size = _size(source, label)
    try:
        handle = sf.SoundFile(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source))
    except _ERRORS as err:
        raise VoiceError(f"reference audio {label}: not a readable WAV/FLAC file ({err})") from None
    with handle:
        _check_header(handle, label, size, max_seconds, min_rate)
        yield handle


def _check_header(handle: sf.SoundFile, label: Path, size: int, max_seconds: Optional[float], min_rate: int) -> None:
    fmt, rate, channels, frames = handle.format, handle.samplerate, handle.channels, handle.frames
    if fmt not in FORMATS:
        raise VoiceError(f"reference audio {label}: {fmt} files are not accepted; convert it to WAV or FLAC")
    if rate < min_rate:
        raise VoiceError(
            f"reference audio {label}: sample rate {rate} Hz is below the minimum of {min_rate} Hz; "
            "record or export at 16 kHz or more"
        )
    if rate > MAX_RATE:
        raise VoiceError(f"reference audio {label}: sample rate {rate} Hz is above the maximum of {MAX_RATE} Hz")
    if not 0 < channels <= MAX_CHANNELS:
        raise VoiceError(f"reference audio {label}: {channels} channels; at most {MAX_CHANNELS} are accepted")
    if frames >= _UNKNOWN_FRAMES or frames < 0:
        raise VoiceError(f"reference audio {label}: the header does not say how long it is; refused")
    if frames == 0:
        raise VoiceError(f"reference audio {label}: the file holds no samples")
    seconds = frames / rate
    if max_seconds is not None and seconds > max_seconds:
        raise VoiceError(
            f"reference audio {label}: {seconds:.0f} s long; the limit is {max_seconds:g} s "
            "(limits.max_reference_seconds): cut it to the 3-10 s you want cloned"
        )
    samples = frames * channels * _SAMPLE_BYTES.get(handle.subtype, 8)
    if size > samples + _HEADER_SLACK:
        raise VoiceError(
            f"reference audio {label}: the file ({size / 1e6:.1f} MB) is larger than the audio its header "
            f"describes ({seconds:.1f} s, {samples / 1e6:.1f} MB); refused"
        )


def _mono(block: np.ndarray) -> np.ndarray:
    mono = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]
    return np.nan_to_num(mono, nan=0.0, posinf=1.0, neginf=-1.0).astype(np.float32, copy=False)


def mono_blocks(
    handle: sf.SoundFile, label: Path, block_frames: int, limit: Optional[int] = None
) -> Iterator[np.ndarray]:
    """The recording from its start (its first `limit` frames) as float mono blocks of `block_frames`; never more
    than the header said."""
    handle.seek(0)
    left = handle.frames if limit is None else min(handle.frames, limit)
    while left > 0:
        try:
            block = handle.read(min(block_frames, left), dtype="float32", always_2d=True)
        except _ERRORS as err:
            raise VoiceError(f"reference audio {label}: damaged audio data ({err})") from None
        if len(block) == 0:
            return
        left -= len(block)
        yield _mono(block)


def read_mono(handle: sf.SoundFile, label: Path, start: int, count: int) -> np.ndarray:
    """`count` frames from frame `start` as float mono, decoded block by block (no multi-channel copy of it all)."""
    out = np.zeros(max(0, count), dtype=np.float32)
    block_frames = max(1, int(handle.samplerate * BLOCK_SECONDS))
    try:
        handle.seek(start)
        done = 0
        while done < count:
            block = handle.read(min(block_frames, count - done), dtype="float32", always_2d=True)
            if len(block) == 0:
                break
            out[done : done + len(block)] = _mono(block)
            done += len(block)
    except _ERRORS as err:
        raise VoiceError(f"reference audio {label}: damaged audio data ({err})") from None
    return out[:done]
