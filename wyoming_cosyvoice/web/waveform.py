"""A downsampled peak envelope of a recording, for the page's waveform pictures (blocking: call on a thread)."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any, Union

import numpy as np
import soundfile as sf

POINTS = 160
"""Peaks per picture (one bar each)."""

MAX_SECONDS = 120.0
"""Only this much of a recording is read for a picture (references are at most 30 s of sound)."""

_cache: dict[tuple[str, int, int], dict[str, Any]] = {}
_lock = threading.Lock()


def envelope(source: Union[Path, bytes], points: int = POINTS) -> dict[str, Any]:
    """`{"seconds": duration, "peaks": [0..1] * points}` of a WAV/FLAC file or its bytes; ValueError when unreadable."""
    try:
        with sf.SoundFile(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)) as handle:
            rate, frames = handle.samplerate, handle.frames
            samples = handle.read(min(frames, int(MAX_SECONDS * rate)), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as err:
        raise ValueError(f"not a readable recording ({err})") from None
    mono = np.abs(np.nan_to_num(samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]))
    if len(mono) == 0:
        return {"seconds": 0.0, "peaks": [0.0] * points}
    edges = np.linspace(0, len(mono), points + 1).astype(int)
    peaks = [float(mono[a:b].max()) if b > a else 0.0 for a, b in zip(edges[:-1], edges[1:], strict=True)]
    top = max(max(peaks), 1e-6)
    return {"seconds": round(frames / rate, 3), "peaks": [round(p / top, 3) for p in peaks]}


def file_envelope(path: Path) -> dict[str, Any]:
    """`envelope` of a file, cached by path, modification time and size."""
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    with _lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    result = envelope(path)
    with _lock:
        if len(_cache) > 256:
            _cache.clear()
        _cache[key] = result
    return result
