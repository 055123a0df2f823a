"""Example plugin: a `tone` engine that "speaks" a beep per word from prepared PCM, at no cost. Copy this file into
your `server.plugins_dir` to load it (it is not a built-in). It shows the whole plugin contract in a few lines, and
serves benchmarks as a zero-cost engine that exposes the server's own cost. With `isolation: process` it runs in a
child process (docs/reliability.md "Plugin engines: asking for process isolation")."""

import threading
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional

import numpy as np

from wyoming_cosyvoice.engine import SynthesisOptions, ThreadedEngine
from wyoming_cosyvoice.hookspecs import Register, hookimpl
from wyoming_cosyvoice.isolation import Isolation
from wyoming_cosyvoice.voices import VoiceProfile


@dataclass(frozen=True)
class ToneSettings:
    """`engines.tone` settings."""

    sample_rate: int = 24000
    """Output rate."""
    frequency: float = 440.0
    """Beep pitch in Hz."""
    word_ms: int = 300
    """Audio per word (beep then pause)."""
    chunk_ms: int = 100
    """Audio per chunk."""
    isolation: Literal["thread", "process"] = "thread"
    """`process`: make the audio in `processes` child processes (the cost of isolation, measured in benchmarks)."""
    processes: int = 1
    """Child processes with `isolation: process`."""

    def validate(self) -> Optional[tuple[str, str]]:
        """Check ranges: (key, problem), or None when the settings are usable."""
        if self.sample_rate < 8000:
            return ("sample_rate", "must be at least 8000")
        if self.word_ms < 10 or self.chunk_ms < 1:
            return ("word_ms", "word_ms must be >= 10 and chunk_ms >= 1")
        if not 1 <= self.processes <= 16:
            return ("processes", "must be between 1 and 16")
        return None


class ToneEngine(ThreadedEngine):
    """Emits a prepared beep per word, chunk by chunk."""

    name = "tone"

    def __init__(self, settings: ToneSettings) -> None:
        super().__init__()
        self.settings = settings
        self.sample_rate = settings.sample_rate
        n = settings.sample_rate * settings.word_ms // 1000
        beep = 0.5 * np.sin(2 * np.pi * settings.frequency * (np.arange(n // 2) / settings.sample_rate))
        self._word = (np.concatenate([beep, np.zeros(n - len(beep))]) * 32767).astype("<i2").tobytes()
        if settings.isolation == "process":
            self.isolation = Isolation(processes=settings.processes)

    def child_args(self) -> tuple[Any, ...]:
        """What a child process needs to build this engine again: `ToneEngine(*child_args())`."""
        return (self.settings,)

    def generate(
        self, text: str, profile: VoiceProfile, options: SynthesisOptions, cancel: threading.Event
    ) -> Iterator[bytes]:
        """One prepared beep per word, cut into `chunk_ms` pieces."""
        pcm = self._word * len(text.split())
        step = self.sample_rate * self.settings.chunk_ms // 1000 * 2
        for start in range(0, len(pcm), step):
            yield pcm[start : start + step]


@hookimpl
def register_engines(register: Register) -> None:
    """Register the `tone` engine: its factory gets the `engines.tone` section."""
    register("tone", lambda section: ToneEngine(section.parse(ToneSettings)))
