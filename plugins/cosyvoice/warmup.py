"""The warm-up: a prompt to speak with when no voice is prepared yet, and what one warm-up call measured."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from wyoming_cosyvoice.voices import VoiceProfile

from .recipes import synthetic_prompt
from .voicebook import WARMUP_NAME


def warmup_profile(first: Optional[VoiceProfile], directory: Path) -> VoiceProfile:
    """The first prepared voice (warming up then costs no extra prompt computation), else a synthetic prompt written
    once into `directory`."""
    if first is not None:
        return first
    path = directory / "warmup_prompt.wav"
    if not path.is_file():
        import soundfile

        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(str(path), synthetic_prompt(), 24000, subtype="FLOAT")
    return VoiceProfile(name=WARMUP_NAME, mode="cross_lingual", reference_audio=path)


@dataclass(frozen=True)
class WarmupRun:
    """One warm-up call: seconds of audio, seconds it took, seconds to the first chunk, whether all was finite."""

    audio_s: float
    total_s: float
    first_s: float
    finite: bool

    @property
    def report(self) -> str:
        """For health: time to the first chunk and the real-time factor."""
        rtf = self.total_s / self.audio_s if self.audio_s else float("nan")
        return f"first chunk {self.first_s * 1000:.0f} ms, rtf {rtf:.2f}"


def measure(chunks: Iterable[np.ndarray], sample_rate: int) -> WarmupRun:
    """Consume the warm-up's chunks, timing them and checking every sample is finite."""
    started = time.perf_counter()
    first: Optional[float] = None
    samples, finite = 0, True
    for chunk in chunks:
        first = first or time.perf_counter()
        samples += len(chunk)
        finite = finite and bool(np.isfinite(chunk).all())
    total = time.perf_counter() - started
    return WarmupRun(samples / sample_rate, total, (first or started) - started, finite)
