"""Benchmark plugin: `pcm`, a zero-cost engine that yields prepared PCM from the event loop (no worker thread),
and `tone` (plugins/example_tone.py, a ThreadedEngine) so both can be served from `--plugins-dir benchmarks/plugins`.

`pcm` exposes the server's own cost: the engine does no work and no thread hop, so everything measured through the
server beyond the direct call is protocol, handler, service, socket and client parsing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Optional

import numpy as np

from wyoming_cosyvoice.engine import Engine, PcmChunk, SynthesisOptions
from wyoming_cosyvoice.hookspecs import Register, hookimpl
from wyoming_cosyvoice.voices import VoiceProfile
from wyoming_cosyvoice_plugins import example_tone


@dataclass(frozen=True)
class PcmSettings:
    """`engines.pcm` settings."""

    sample_rate: int = 24000
    """Output rate (CosyVoice 2/3 speak at 24 kHz)."""

    word_ms: int = 300
    """Audio per word of text."""

    chunk_ms: int = 100
    """Audio per chunk; every chunk is the same prepared bytes object."""

    def validate(self) -> Optional[tuple[str, str]]:
        """Check ranges."""
        if self.sample_rate < 8000:
            return ("sample_rate", "must be at least 8000")
        if not 1 <= self.chunk_ms <= self.word_ms:
            return ("chunk_ms", "must be between 1 and word_ms")
        return None


class PreparedPcmEngine(Engine):
    """Yields `word_ms` of a prepared 24 kHz tone per word in `chunk_ms` chunks, giving the loop a turn between them."""

    name = "pcm"

    def __init__(self, settings: PcmSettings) -> None:
        self.settings = settings
        self.sample_rate = settings.sample_rate
        n = settings.sample_rate * settings.chunk_ms // 1000
        t = np.arange(n) / settings.sample_rate
        pcm = (0.3 * np.sin(2 * np.pi * 440.0 * t) * 32767).astype("<i2").tobytes()
        self._chunk = PcmChunk(pcm, settings.sample_rate)
        self._per_word = max(1, settings.word_ms // settings.chunk_ms)

    async def synthesize(self, text: str, profile: VoiceProfile, options: SynthesisOptions) -> AsyncIterator[PcmChunk]:
        """The prepared chunk, `word_ms / chunk_ms` times per word."""
        chunk = self._chunk
        for _ in range(len(text.split()) * self._per_word):
            yield chunk
            # A well-behaved async engine awaits between chunks; this lets other connections run.
            await asyncio.sleep(0)


@hookimpl
def register_engines(register: Register) -> None:
    """Register `pcm` and the example `tone` engine."""
    register("pcm", lambda section: PreparedPcmEngine(section.parse(PcmSettings)))
    example_tone.register_engines(register)
