"""Speech-like test recordings written with soundfile (a voiced tone with a syllable rhythm)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import soundfile as sf


def speechlike(seconds: float, rate: int, peak: float = 0.5, seed: int = 0) -> np.ndarray:
    """A 140 Hz buzz with harmonics and noise, amplitude-modulated at 4 syllables per second."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    voice = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 6)) + 0.05 * rng.standard_normal(len(t))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)
    signal = voice * envelope
    return (signal / np.max(np.abs(signal)) * peak).astype(np.float32)


def write(
    path: Path,
    seconds: float = 3.0,
    rate: int = 24000,
    *,
    peak: float = 0.5,
    channels: int = 1,
    subtype: str = "PCM_16",
    fmt: Optional[str] = None,
    pad: float = 0.0,
    samples: Optional[np.ndarray] = None,
) -> Path:
    """Write a recording; `pad` seconds of silence before and after; stereo puts the voice in both channels."""
    data = speechlike(seconds, rate, peak) if samples is None else samples
    if pad:
        silence = np.zeros(int(pad * rate), dtype=np.float32)
        data = np.concatenate([silence, data, silence])
    if channels > 1:
        data = np.stack([data] * channels, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data, rate, subtype=subtype, format=fmt)
    return path
