"""A downsampled peak envelope of a recording, for the page's waveform pictures (blocking: call on a thread)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..errors import VoiceError
from ..recording import BLOCK_SECONDS, mono_blocks, open_recording

POINTS = 160
"""Peaks per picture (one bar each)."""

MAX_SECONDS = 120.0
"""Only this much of a recording is read for a picture (references are at most 30 s of sound)."""

_cache: dict[tuple[str, int, int], dict[str, Any]] = {}
_lock = threading.Lock()


def envelope(source: Union[Path, bytes], points: int = POINTS) -> dict[str, Any]:
    """`{"seconds": duration, "peaks": [0..1] * points}` of a WAV/FLAC file or its bytes; ValueError when unreadable.

    The header passes the same checks as every reference (`recording.open_recording`; any rate, though); at most
    `MAX_SECONDS` are decoded, one block at a time.
    """
    label = Path("upload") if isinstance(source, (bytes, bytearray)) else Path(source)
    try:
        with open_recording(source, label, None, min_rate=1) as handle:  # a broken voice's picture helps too
            rate, frames = handle.samplerate, handle.frames
            count = min(frames, int(MAX_SECONDS * rate))
            edges = np.linspace(0, count, points + 1).astype(int)
            peaks = np.zeros(points)
            offset = 0
            for mono in mono_blocks(handle, label, max(1, int(rate * BLOCK_SECONDS)), count):
                first = int(np.searchsorted(edges, offset, side="right")) - 1
                cuts = edges[(edges > offset) & (edges < offset + len(mono))] - offset
                for index, part in enumerate(np.split(np.abs(mono), cuts)):
                    if len(part):
                        peaks[first + index] = max(peaks[first + index], float(part.max()))
                offset += len(mono)
    except VoiceError as err:
        raise ValueError(str(err)) from None
    top = max(float(peaks.max()), 1e-6)
    return {"seconds": round(frames / rate, 3), "peaks": [round(float(p) / top, 3) for p in peaks]}


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
