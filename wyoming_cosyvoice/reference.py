"""Reference audio for voice cloning: validated and normalized once, cached as a clean 16-bit mono WAV.

Rules (docs/voices.md): any sample rate >= 16 kHz; integer or float WAV/FLAC (anything libsndfile reads);
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
from .recording import BLOCK_SECONDS, Source, mono_blocks, open_recording, read_mono
from .recording import FORMATS as FORMATS  # re-exported: the accepted formats are part of this module's rules
from .recording import MIN_RATE as MIN_RATE

if TYPE_CHECKING:
    from .voices import VoiceProfile

_LOGGER = logging.getLogger(__name__)

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


def _scan(handle: sf.SoundFile, label: Path, frame: int) -> tuple[np.ndarray, float, int]:
    """Per-frame RMS, peak and length of the whole recording, decoded one block at a time (nothing kept)."""
    block_frames = frame * max(1, int(handle.samplerate * BLOCK_SECONDS) // frame)
    parts: list[np.ndarray] = []
    peak, total, tail = 0.0, 0, np.zeros(0, dtype=np.float32)
    for mono in mono_blocks(handle, label, block_frames):
        total += len(mono)
        peak = max(peak, float(np.max(np.abs(mono))))
        count = len(mono) // frame
        if count:
            parts.append(_frame_rms(mono[: count * frame], frame))
        tail = mono[count * frame :]
    if total == 0:
        raise VoiceError(f"reference audio {label}: the file holds no samples")
    return (np.concatenate(parts) if parts else _frame_rms(tail, frame)), peak, total


def _analyse(handle: sf.SoundFile, path: Path, has_transcript: bool) -> tuple[ReferenceInfo, np.ndarray]:
    """Check and trim an opened recording (`open_recording`); returns the info and the normalized float mono samples.

    Two passes: the first measures the whole file block by block; the second decodes only the part kept.
    """
    rate, channels = handle.samplerate, handle.channels
    frame = max(1, int(rate * _FRAME_SECONDS))
    rms, peak, total = _scan(handle, path, frame)
    seconds = total / rate
    warnings: list[str] = []
    if channels > 1:
        warnings.append(f"{channels} channels mixed down to mono")
    loudest = float(rms.max())
    if loudest < _SILENCE_FLOOR:
        raise VoiceError(f"reference audio {path}: no sound (loudest passage {_dbfs(loudest):.0f} dBFS)")
    voiced = np.flatnonzero(rms >= max(loudest * _SILENCE_RELATIVE, _SILENCE_FLOOR))
    margin = int(rate * _MARGIN_SECONDS)
    sound = (int(voiced[-1]) + 1 - int(voiced[0])) * frame / rate
    if sound < MIN_SECONDS:
        raise VoiceError(f"reference audio {path}: only {sound:.2f} s of sound; at least {MIN_SECONDS} s needed")
    start = max(0, int(voiced[0]) * frame - margin)
    end = min(total, (int(voiced[-1]) + 1) * frame + margin)
    trimmed = end - start < total - frame
    kept = (end - start) / rate
    cut = False
    if trimmed and (seconds - kept) >= 0.5:
        warnings.append(f"{seconds - kept:.1f} s of leading/trailing silence trimmed")
    if kept > MAX_SECONDS and has_transcript:
        raise VoiceError(
            f"reference audio {path}: {kept:.1f} s of sound is longer than {MAX_SECONDS:.0f} s; with a "
            "transcript it cannot be cut (the transcript would no longer match): cut the recording and its "
            "transcript to 3-10 s"
        )
    limit = int(MAX_SECONDS * rate)
    mono = read_mono(handle, path, start, min(end - start, limit))
    if kept > MAX_SECONDS:
        # Cut where it is quietest in the last 2 s before the limit, so the cut does not split a word.
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
        format=f"{handle.format} {handle.subtype}",
        rate=rate,
        channels=channels,
        seconds=seconds,
        kept_seconds=kept,
        peak_dbfs=_dbfs(peak),
        warnings=tuple(warnings),
        cut=cut,
    )
    return info, mono.astype(np.float32)


def check_reference(
    source: Source,
    label: Path,
    *,
    has_transcript: bool = False,
    max_seconds: Optional[float] = DEFAULT_MAX_REFERENCE_SECONDS,
) -> tuple[ReferenceInfo, np.ndarray]:
    """The one validation every reference passes, an upload (bytes) or a file: the header checks of
    `open_recording` before any sample is decoded, then `_analyse`. Blocking; VoiceError when unusable."""
    with open_recording(source, label, max_seconds) as handle:
        return _analyse(handle, label, has_transcript)


def inspect_reference(
    path: Path, *, has_transcript: bool = False, max_seconds: Optional[float] = DEFAULT_MAX_REFERENCE_SECONDS
) -> ReferenceInfo:
    """Validate a reference recording without writing anything (blocking); raises VoiceError when unusable."""
    return check_reference(Path(path), Path(path), has_transcript=has_transcript, max_seconds=max_seconds)[0]


def inspect_reference_data(
    data: bytes,
    label: Path,
    *,
    has_transcript: bool = False,
    max_seconds: Optional[float] = DEFAULT_MAX_REFERENCE_SECONDS,
) -> ReferenceInfo:
    """Validate a recording held in memory (an upload) without writing anything (blocking); `label` names it."""
    return check_reference(data, Path(label), has_transcript=has_transcript, max_seconds=max_seconds)[0]


def _digest(path: Path) -> str:
    """Content hash of a file, read in pieces (a large file is never held in memory for it)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for piece in iter(lambda: handle.read(1 << 20), b""):
                digest.update(piece)
    except OSError as err:
        raise VoiceError(f"reference audio {path}: cannot read: {err.strerror or err}") from None
    digest.update(_VERSION.encode())
    return digest.hexdigest()[:32]


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
    with open_recording(path, path, max_seconds) as handle:
        result = _normalize(handle, path, has_transcript, cache)
    with _memo_lock:
        _memo[memo_key] = result
    return result


def _normalize(handle: sf.SoundFile, path: Path, has_transcript: bool, cache: Path) -> tuple[Path, ReferenceInfo]:
    """The cached normalized WAV of an opened recording: reused when its content was normalized before (in the
    reference cache, or in the temporary one while that cannot be written: refcache)."""
    digest = _digest(path)
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
        info, mono = _analyse(handle, path, has_transcript)
        wav = io.BytesIO()  # encoded in memory: a failed write is then an OSError, not an assertion in soundfile
        sf.write(wav, mono, info.rate, subtype="PCM_16", format="WAV")
        record = {k: v for k, v in dataclasses.asdict(info).items() if k != "path"}
        files = {target.name: wav.getvalue(), sidecar.name: json.dumps(record).encode()}
        target = refcache.write(cache, files) / target.name
        _LOGGER.debug("Normalized %s -> %s (%s)", path, target, info.summary())
    return target, info


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
