"""Reference audio for voice cloning: validated and normalized once, cached as a clean 16-bit mono WAV.

Rules (README "Voice profiles"): any sample rate >= 16 kHz; integer or float WAV/FLAC (anything libsndfile reads);
stereo is downmixed; leading/trailing silence is trimmed; the result must keep at least 0.5 s of sound; longer than
30 s after trimming is REFUSED when the profile has a transcript (the transcript would no longer match the audio)
and otherwise TRIMMED to 30 s (cut at the quietest moment of the last 2 s) with a warning; peaks are normalized to
-2 dBFS; too quiet or clipped recordings get a warning. numpy + soundfile only (no torch).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import soundfile as sf

from . import refcache
from .errors import VoiceError
from .paths import asset_dir, cache_dir

if TYPE_CHECKING:
    from .voices import VoiceProfile

_LOGGER = logging.getLogger(__name__)

FORMATS = ("WAV", "WAVEX", "RF64", "W64", "FLAC")
"""Accepted containers (libsndfile names): WAV in its variants, and FLAC."""

MIN_RATE = 16000
"""Lowest accepted sample rate (CosyVoice's speech tokenizer works at 16 kHz)."""

MAX_SECONDS = 30.0
"""Longest reference kept (CosyVoice's speech tokenizer refuses longer prompts)."""

MIN_SECONDS = 0.5
"""Shortest amount of sound accepted after silence trimming."""

SHORT_SECONDS = 2.0
"""Below this a warning says cloning quality suffers."""

LONG_SECONDS = 15.0
"""Above this a warning says every request gets slower (the prompt is part of every synthesis)."""

QUIET_PEAK = 0.1
"""Peak below -20 dBFS: "too quiet" warning (noise is raised along with the voice)."""

CLIP_FRACTION = 0.001
"""More than 0.1 % of samples in flat tops at full scale: "clipped" warning."""

TARGET_PEAK = 0.8
"""Peak level of the normalized file (-2 dBFS, like CosyVoice's own web UI)."""

MAX_GAIN = 31.6
"""Quiet recordings are raised by at most +30 dB."""

_SILENCE_FLOOR = 10 ** (-60 / 20)
"""Frames below -60 dBFS RMS are silence whatever the recording's level."""

_SILENCE_RELATIVE = 10 ** (-40 / 20)
"""Frames 40 dB below the loudest frame count as silence."""

DEFAULT_MAX_REFERENCE_SECONDS = 120.0
"""Longest recording accepted by default (`limits.max_reference_seconds`), checked on the header before reading."""

_SAMPLE_BYTES = {"PCM_S8": 1, "PCM_U8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8}
_HEADER_SLACK = 4 * 1024 * 1024
"""Room for metadata chunks (LIST, bext, a FLAC picture) beyond the samples the header describes."""

_FRAME_SECONDS = 0.02
_MARGIN_SECONDS = 0.1
_VERSION = "1"
"""Bump when the normalization changes, so cached files are rebuilt."""

ASSET_DIR = asset_dir()
"""The project's own reference recordings (with transcripts), made by `script/make-assets`; package data when
installed."""


@dataclass(frozen=True)
class ReferenceInfo:
    """What validation found out about one reference recording."""

    path: Path
    """The original file."""

    format: str
    """Container and sample format, e.g. `WAV PCM_16` or `FLAC PCM_24`."""

    rate: int
    """Sample rate in Hz (kept in the normalized file)."""

    channels: int
    """Channels of the original (the normalized file is mono)."""

    seconds: float
    """Duration of the original."""

    kept_seconds: float
    """Duration after silence trimming (and the 30 s limit)."""

    peak_dbfs: float
    """Peak level of the original, in dBFS."""

    warnings: tuple[str, ...] = ()
    """Problems worth knowing that do not stop the voice from working."""

    cut: bool = False
    """True when the sound was longer than 30 s and only the first 30 s were kept."""

    def summary(self) -> str:
        """One line: format, rate, channels, durations, level."""
        return (
            f"{self.format}, {self.rate} Hz, {self.channels} ch, {self.seconds:.2f} s "
            f"({self.kept_seconds:.2f} s kept), peak {self.peak_dbfs:.1f} dBFS"
        )


def default_cache_dir() -> Path:
    """Where normalized references are cached: `references/` in the project's cache folder (`paths.cache_dir`)."""
    return cache_dir() / "references"


def _dbfs(value: float) -> float:
    return float(20 * np.log10(max(value, 1e-10)))


def _frame_rms(mono: np.ndarray, frame: int) -> np.ndarray:
    count = len(mono) // frame
    if count == 0:
        return np.sqrt(np.mean(mono**2, keepdims=True)) if len(mono) else np.zeros(1)
    frames = mono[: count * frame].reshape(count, frame)
    return np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1))


def _clipped_fraction(mono: np.ndarray) -> float:
    """Share of samples in flat tops at full scale (a sample at the rail next to another one)."""
    at_rail = np.abs(mono) >= 0.999
    flat = at_rail[1:] & at_rail[:-1]
    return float(np.count_nonzero(flat)) / max(len(mono), 1)


def _analyse(data: bytes, path: Path, has_transcript: bool) -> tuple[ReferenceInfo, np.ndarray]:
    """Decode, check and trim; returns the info and the normalized float mono samples."""
    try:
        with sf.SoundFile(io.BytesIO(data)) as handle:
            fmt, subtype, rate, channels = handle.format, handle.subtype, handle.samplerate, handle.channels
            samples = handle.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise VoiceError(f"reference audio {path}: not a readable WAV/FLAC file ({err})") from None
    if fmt not in FORMATS:
        raise VoiceError(f"reference audio {path}: {fmt} files are not accepted; convert it to WAV or FLAC")
    if rate < MIN_RATE:
        raise VoiceError(
            f"reference audio {path}: sample rate {rate} Hz is below the minimum of {MIN_RATE} Hz; "
            "record or export at 16 kHz or more"
        )
    if len(samples) == 0:
        raise VoiceError(f"reference audio {path}: the file holds no samples")
    seconds = len(samples) / rate
    mono = samples.mean(axis=1) if channels > 1 else samples[:, 0]
    mono = np.nan_to_num(mono, nan=0.0, posinf=1.0, neginf=-1.0)
    peak = float(np.max(np.abs(mono)))
    warnings: list[str] = []
    if channels > 1:
        warnings.append(f"{channels} channels mixed down to mono")

    frame = max(1, int(rate * _FRAME_SECONDS))
    rms = _frame_rms(mono, frame)
    loudest = float(rms.max())
    if loudest < _SILENCE_FLOOR:
        raise VoiceError(f"reference audio {path}: no sound (loudest passage {_dbfs(loudest):.0f} dBFS)")
    voiced = np.flatnonzero(rms >= max(loudest * _SILENCE_RELATIVE, _SILENCE_FLOOR))
    margin = int(rate * _MARGIN_SECONDS)
    sound = (int(voiced[-1]) + 1 - int(voiced[0])) * frame / rate
    if sound < MIN_SECONDS:
        raise VoiceError(f"reference audio {path}: only {sound:.2f} s of sound; at least {MIN_SECONDS} s needed")
    start = max(0, int(voiced[0]) * frame - margin)
    end = min(len(mono), (int(voiced[-1]) + 1) * frame + margin)
    trimmed = end - start < len(mono) - frame
    mono = mono[start:end]
    kept = len(mono) / rate
    cut = False
    if trimmed and (seconds - kept) >= 0.5:
        warnings.append(f"{seconds - kept:.1f} s of leading/trailing silence trimmed")
    if kept > MAX_SECONDS:
        if has_transcript:
            raise VoiceError(
                f"reference audio {path}: {kept:.1f} s of sound is longer than {MAX_SECONDS:.0f} s; with a "
                "transcript it cannot be cut (the transcript would no longer match): cut the recording and its "
                "transcript to 3-10 s"
            )
        # Cut where it is quietest in the last 2 s before the limit, so the cut does not split a word.
        limit = int(MAX_SECONDS * rate)
        window = _frame_rms(mono[limit - 2 * rate : limit], frame)
        cut_at = limit - 2 * rate + int(np.argmin(window)) * frame
        mono = mono[:cut_at]
        warnings.append(
            f"longer than {MAX_SECONDS:.0f} s ({kept:.1f} s of sound): only the first {cut_at / rate:.1f} s used"
        )
        kept, cut = cut_at / rate, True
    elif kept > LONG_SECONDS:
        warnings.append(f"{kept:.1f} s long: every request gets slower; 3-10 s works best")
    if kept < SHORT_SECONDS:
        warnings.append(f"only {kept:.1f} s of sound: cloning works better with 3-10 s")
    if peak < QUIET_PEAK:
        warnings.append(f"too quiet (peak {_dbfs(peak):.0f} dBFS): raised, noise included; record closer or louder")
    clipped = _clipped_fraction(mono)
    if clipped > CLIP_FRACTION:
        warnings.append(f"clipped ({clipped:.1%} of samples at full scale): record with less input gain")

    level = float(np.max(np.abs(mono)))
    mono = mono * min(TARGET_PEAK / max(level, 1e-9), MAX_GAIN)
    info = ReferenceInfo(
        path=path,
        format=f"{fmt} {subtype}",
        rate=rate,
        channels=channels,
        seconds=seconds,
        kept_seconds=kept,
        peak_dbfs=_dbfs(peak),
        warnings=tuple(warnings),
        cut=cut,
    )
    return info, mono.astype(np.float32)


def check_length(path: Path, max_seconds: Optional[float]) -> None:
    """Refuse a recording longer than `max_seconds`, or a file larger than its samples, from its header alone.

    Run before the file is read: reading copies the whole file into memory (a 512 MiB sparse reference.wav took
    the server from 54 MB to 1.1 GB). None: no limit.
    """
    if max_seconds is None:
        return
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise VoiceError(f"reference audio {path}: file not found") from None
    except OSError as err:
        raise VoiceError(f"reference audio {path}: cannot read: {err.strerror or err}") from None
    if path.is_dir():
        raise VoiceError(f"reference audio {path}: is a folder, not an audio file")
    size = stat.st_size
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as err:
        raise VoiceError(f"reference audio {path}: not a readable WAV/FLAC file ({err})") from None
    if info.samplerate <= 0 or info.channels <= 0:
        raise VoiceError(f"reference audio {path}: the header gives no sample rate or channels")
    seconds = info.frames / info.samplerate
    if seconds > max_seconds:
        raise VoiceError(
            f"reference audio {path}: {seconds:.0f} s long; the limit is {max_seconds:g} s "
            "(limits.max_reference_seconds): cut it to the 3-10 s you want cloned"
        )
    samples = info.frames * info.channels * _SAMPLE_BYTES.get(info.subtype, 8)
    if size > samples + _HEADER_SLACK:
        raise VoiceError(
            f"reference audio {path}: the file ({size / 1e6:.1f} MB) is larger than the audio its header describes "
            f"({seconds:.1f} s, {samples / 1e6:.1f} MB); refused"
        )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise VoiceError(f"reference audio {path}: file not found") from None
    except IsADirectoryError:
        raise VoiceError(f"reference audio {path}: is a folder, not an audio file") from None
    except OSError as err:
        raise VoiceError(f"reference audio {path}: cannot read: {err.strerror or err}") from None


def inspect_reference(
    path: Path, *, has_transcript: bool = False, max_seconds: Optional[float] = DEFAULT_MAX_REFERENCE_SECONDS
) -> ReferenceInfo:
    """Validate a reference recording without writing anything (blocking); raises VoiceError when unusable."""
    check_length(Path(path), max_seconds)
    return _analyse(_read(Path(path)), Path(path), has_transcript)[0]


def inspect_reference_data(data: bytes, label: Path, *, has_transcript: bool = False) -> ReferenceInfo:
    """Validate a recording held in memory (an upload) without writing anything (blocking); `label` names it."""
    return _analyse(data, Path(label), has_transcript)[0]


_memo: dict[tuple[str, int, int, bool, str], tuple[Path, ReferenceInfo]] = {}
_memo_lock = threading.Lock()


def normalize_reference(
    path: Path, *, has_transcript: bool = False, cache_dir: Optional[Path] = None, max_seconds: Optional[float] = None
) -> tuple[Path, ReferenceInfo]:
    """Validate `path` and return (normalized 16-bit mono WAV in the cache, info); blocking, cached by content.

    `max_seconds`: refuse longer recordings from the header before reading (the server passes
    `limits.max_reference_seconds`; engines call this after the server checked the file).
    """
    path = Path(path)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise VoiceError(f"reference audio {path}: file not found") from None
    except OSError as err:
        raise VoiceError(f"reference audio {path}: cannot read: {err.strerror or err}") from None
    memo_key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, has_transcript, str(cache))
    with _memo_lock:
        hit = _memo.get(memo_key)
    if hit is not None and hit[0].is_file():
        return hit
    check_length(path, max_seconds)
    data = _read(path)
    digest = hashlib.sha256(data + _VERSION.encode()).hexdigest()[:32]
    folder = refcache.holding(cache, (f"{digest}.wav", f"{digest}.json"))
    target = folder / f"{digest}.wav"
    sidecar = folder / f"{digest}.json"
    info: Optional[ReferenceInfo] = None
    if target.is_file() and sidecar.is_file():
        try:
            fields = json.loads(sidecar.read_text(encoding="utf-8"))
            info = ReferenceInfo(**{**fields, "path": path, "warnings": tuple(fields["warnings"])})
        except (OSError, ValueError, TypeError, KeyError):
            info = None  # damaged sidecar: rebuild both
        if info is not None and info.cut and has_transcript:
            info = None  # was trimmed for a transcript-less profile: re-check so this one is refused
    if info is None:
        info, mono = _analyse(data, path, has_transcript)
        wav = io.BytesIO()  # encoded in memory: a failed write is then an OSError, not an assertion in soundfile
        sf.write(wav, mono, info.rate, subtype="PCM_16", format="WAV")
        record = {k: v for k, v in dataclasses.asdict(info).items() if k != "path"}
        files = {target.name: wav.getvalue(), sidecar.name: json.dumps(record).encode()}
        target = refcache.write(cache, files) / target.name
        _LOGGER.debug("Normalized %s -> %s (%s)", path, target, info.summary())
    result = (target, info)
    with _memo_lock:
        _memo[memo_key] = result
    return result


def profile_reference(
    profile: "VoiceProfile", cache_dir: Optional[Path] = None, max_seconds: Optional[float] = None
) -> Optional[tuple[Path, ReferenceInfo]]:
    """(normalized WAV, info) for a profile's reference, None without one; errors name file, profile and problem."""
    if profile.reference_audio is None:
        return None
    try:
        return normalize_reference(
            profile.reference_audio,
            has_transcript=bool(profile.transcript),
            cache_dir=cache_dir,
            max_seconds=max_seconds,
        )
    except VoiceError as err:
        raise type(err)(f"{profile.source or '(no file)'}: voice {profile.name!r}: {err}") from None


def normalized_reference(profile: "VoiceProfile", cache_dir: Optional[Path] = None) -> Path:
    """Path of the profile's reference as a clean 16-bit mono WAV at its original rate (>= 16 kHz), for engines.

    Validated, silence-trimmed, at most 30 s and peak-normalized; built once per file content and cached (so
    calling it again is cheap). Blocking: engines call it on their worker thread, e.g. inside `prepare()`.
    Raises VoiceError (one line naming file, profile and problem) when the profile has no reference audio or the
    recording is unusable.
    """
    result = profile_reference(profile, cache_dir)
    if result is None:
        raise VoiceError(f"{profile.source or '(no file)'}: voice {profile.name!r}: no reference audio configured")
    return result[0]
