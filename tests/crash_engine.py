"""Test plugin: a `crash` engine that runs in child processes (process isolation) and crashes on request.

Its texts choose what the child does:
- "SEGV": dereferences a null pointer through ctypes (a real SIGSEGV, as a native library's bug does);
- "ABORT": os.abort() (SIGABRT, what glibc does on "buffer overflow detected");
- "HANG": blocks in a loop that never looks at the cancel flag (a wedged native call);
- "RAISE": a ValueError (an ordinary engine error: the child survives);
- otherwise: one chunk of `chunk_bytes` per word, each line-logged to `trace` (when set) so a test can see how
  far a cancelled request got in the child; a word "slow" waits `slow_ms` before its chunk.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from wyoming_cosyvoice.engine import SynthesisOptions, ThreadedEngine
from wyoming_cosyvoice.hookspecs import hookimpl
from wyoming_cosyvoice.isolation import Isolation
from wyoming_cosyvoice.voices import VoiceProfile


@dataclass(frozen=True)
class CrashSettings:
    """`engines.crash` settings."""

    processes: int = 1
    max_restarts: int = 10
    window_s: float = 60.0
    stop_grace_s: float = 2.0
    chunk_bytes: int = 320
    slow_ms: int = 50
    trace: Optional[Path] = None
    """File the child appends a line to per chunk made."""
    fail_load: bool = False
    """Raise in `load` (a library that cannot be opened)."""


class CrashEngine(ThreadedEngine):
    """Process-isolated; crashes, hangs or fails when the text says so."""

    name = "crash"
    sample_rate = 16000

    def __init__(self, settings: CrashSettings) -> None:
        super().__init__()
        self.settings = settings
        self.isolation = Isolation(settings.processes, settings.max_restarts, settings.window_s, settings.stop_grace_s)
        self.loaded_in = 0

    def child_args(self) -> tuple[Any, ...]:
        return (self.settings,)

    def load(self) -> None:
        if self.settings.fail_load:
            raise RuntimeError("no such library")
        self.loaded_in = os.getpid()

    def generate(
        self, text: str, profile: VoiceProfile, options: SynthesisOptions, cancel: threading.Event
    ) -> Iterator[bytes]:
        assert self.loaded_in == os.getpid(), "render ran in another process than load"
        if "SEGV" in text:
            ctypes.string_at(0)
        if "ABORT" in text:
            os.abort()
        if "RAISE" in text:
            raise ValueError("the text asked for an error")
        while "HANG" in text:
            time.sleep(0.05)
        for i, word in enumerate(text.split()):
            if word == "slow":
                time.sleep(self.settings.slow_ms / 1000)
            if self.settings.trace is not None:
                with open(self.settings.trace, "a") as trace:
                    trace.write(f"{os.getpid()} {i}\n")
            yield bytes([i % 256, 0]) * (self.settings.chunk_bytes // 2)

    def whoami(self) -> int:
        """The process this method runs in (run_in_worker runs engine methods in a child)."""
        return os.getpid()


@hookimpl
def register_engines(register: Any) -> None:
    """Register the `crash` engine."""
    register("crash", lambda section: CrashEngine(section.parse(CrashSettings)))
