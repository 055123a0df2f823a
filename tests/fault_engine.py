"""Test plugin: a `fault` engine whose chunks can be counted and whose faults are chosen by the request text.

It is a real ThreadedEngine (the worker-thread bridge under test) with a `generate` that makes plain PCM:
- "RAISE" in the text: a ValueError after the first chunk;
- "FAIL": a ValueError before the first chunk (an engine that cannot speak this at all);
- "OOM": an exception shaped like torch's (class `OutOfMemoryError`, a RuntimeError, "CUDA out of memory...");
- "HANG": blocks without looking at the cancel flag (a wedged native call) until `release` is set;
- "SLOW": waits `slow_s` before the first chunk (a cold model);
- "WEDGE": makes its chunks, then blocks like HANG (a call that wedges after the audio was made);
- "ONCE" with "OOM" or "RAISE": the fault happens the first time that text is asked for only (a passing fault);
- `room_for` > 0: `room()` says no while that many requests hold or wait for a slot (an engine at capacity);
- otherwise: `chunks_per_word` chunks per word, `chunk_ms` apart, each `chunk_bytes` long.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from wyoming_cosyvoice.config import Section
from wyoming_cosyvoice.engine import SynthesisOptions, ThreadedEngine
from wyoming_cosyvoice.hookspecs import hookimpl
from wyoming_cosyvoice.voices import VoiceProfile


class OutOfMemoryError(RuntimeError):
    """Same name, base class and message shape as torch.OutOfMemoryError (torch is not installed here)."""


@dataclass(frozen=True)
class FaultSettings:
    """`engines.fault` settings."""

    sample_rate: int = 16000
    """Output rate."""

    chunk_ms: int = 20
    """Pause before each chunk (simulated compute)."""

    chunk_bytes: int = 640
    """Bytes per chunk."""

    chunks_per_word: int = 2
    """Chunks per word of text."""

    slow_s: float = 1.0
    """Delay before the first chunk for "SLOW" texts."""

    room_for: int = 0
    """Requests admitted at once by `room()` (0: no limit)."""


class FaultEngine(ThreadedEngine):
    """Counts what it makes; misbehaves on request."""

    name = "fault"

    def __init__(self, settings: FaultSettings) -> None:
        super().__init__()
        self.settings = settings
        self.sample_rate = settings.sample_rate
        self.produced = 0
        """Chunks handed out, over all requests."""
        self.outcomes: list[str] = []
        """How each request ended in the worker: done, cancelled or error."""
        self.finished = threading.Event()
        """Set whenever a request leaves `generate`."""
        self.release = threading.Event()
        """Set by tests to let a HANG request return."""
        self.memory_released = 0
        self.worker_threads: set[str] = set()
        self.calls: list[str] = []
        """The text of every call, in order."""

    def room(self) -> Optional[str]:
        """No room while `room_for` requests hold or wait for a slot."""
        taken = self.in_flight + self.queued
        if self.settings.room_for and taken >= self.settings.room_for:
            return f"at capacity: {taken} requests (room_for {self.settings.room_for})"
        return None

    def release_memory(self) -> None:
        """Count calls (the real one would empty torch's CUDA cache)."""
        self.memory_released += 1
        super().release_memory()

    def generate(
        self, text: str, profile: VoiceProfile, options: SynthesisOptions, cancel: threading.Event
    ) -> Iterator[bytes]:
        """Chunks of a square wave, or the fault the text asks for."""
        self.worker_threads.add(threading.current_thread().name)
        faulty = "ONCE" not in text or text not in self.calls
        self.calls.append(text)
        outcome = "cancelled"
        try:
            if "HANG" in text:
                self.release.wait(60)
                outcome = "hung"
                return
            if "SLOW" in text:
                time.sleep(self.settings.slow_s)
            if "FAIL" in text:
                raise ValueError("simulated engine failure")
            if "OOM" in text and faulty:
                raise OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.81 GiB of "
                    "which 1.02 GiB is free."
                )
            period = bytes([0, 40, 0, 40, 0, 192, 0, 192])
            chunk = (period * (self.settings.chunk_bytes // len(period) + 1))[: self.settings.chunk_bytes]
            for i in range(len(text.split()) * self.settings.chunks_per_word):
                time.sleep(self.settings.chunk_ms / 1000)
                if i == 1 and "RAISE" in text and faulty:
                    raise ValueError("simulated engine bug")
                self.produced += 1
                yield chunk
            if "WEDGE" in text:
                self.release.wait(60)
                outcome = "hung"
                return
            outcome = "done"
        except Exception:
            outcome = "error"
            raise
        finally:
            self.outcomes.append(outcome)
            self.finished.set()


@hookimpl
def register_engines(register: Callable[[str, Callable[[Section], Any]], None]) -> None:
    """Register the `fault` engine."""
    register("fault", lambda section: FaultEngine(section.parse(FaultSettings)))
