"""Shared test helpers: a real server on an ephemeral port, a real Wyoming client, audio checks."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

import numpy as np
import yaml
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event, async_read_event
from wyoming.tts import SynthesizeStopped

from wyoming_cosyvoice.config import Config, load_config
from wyoming_cosyvoice.plugins import Plugins
from wyoming_cosyvoice.server import Server, build_service

TIMEOUT = 20.0
"""Upper bound for any single read in tests (a hang fails instead of blocking CI)."""

SHARED_VOICES = (
    Path(os.environ.get("WYOMING_COSYVOICE_SHARED") or Path(__file__).resolve().parents[2] / "shared") / "voices"
)
"""Reference voices provided beside the checkout, or in $WYOMING_COSYVOICE_SHARED (tests skip when absent)."""


def write_config(
    directory: Path,
    server: Optional[dict[str, Any]] = None,
    voices: Optional[list[dict[str, Any]]] = None,
    default: Optional[str] = None,
    **sections: Any,
) -> Path:
    """Write server.yaml + voices.yaml into `directory` (espeak engine, no fallback) and return server.yaml."""
    directory.mkdir(parents=True, exist_ok=True)
    if voices is None:
        voices = [
            {"name": "tars", "description": "TARS", "languages": ["en-US"]},
            {"name": "anna", "description": "Anna (German)", "languages": ["de-DE"]},
        ]
    voices_doc: dict[str, Any] = {"voices": voices}
    if default:
        voices_doc["default"] = default
    (directory / "voices.yaml").write_text(yaml.safe_dump(voices_doc, sort_keys=False))
    doc: dict[str, Any] = {
        "server": {"uri": "tcp://127.0.0.1:0", **(server or {})},
        "engine": {"name": "espeak", "fallback": None},
        "voice_providers": {"yaml": {"path": "voices.yaml"}},
    }
    doc.update(sections)
    path = directory / "server.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@contextlib.asynccontextmanager
async def running_server(config: Config, plugins: Optional[Plugins] = None) -> AsyncIterator[Server]:
    """Build the service and serve it on 127.0.0.1:<ephemeral>; shut down afterwards."""
    plugins = plugins or Plugins(config.server.plugins_dir)
    service = await build_service(config, plugins)
    server = Server(service, "tcp://127.0.0.1:0")
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown(grace=2.0)


@contextlib.asynccontextmanager
async def connect(server: Server) -> AsyncIterator[AsyncTcpClient]:
    """A connected `wyoming` library client."""
    assert server.port
    client = AsyncTcpClient("127.0.0.1", server.port)
    await asyncio.wait_for(client.connect(), TIMEOUT)
    try:
        yield client
    finally:
        await client.disconnect()


async def read(client: AsyncTcpClient, timeout: float = TIMEOUT) -> Optional[Event]:
    """Read one event under a timeout."""
    return await asyncio.wait_for(client.read_event(), timeout)


@dataclass
class Reply:
    """What a server sent in answer to one request."""

    events: list[Event] = field(default_factory=list)
    starts: list[AudioStart] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)
    chunks: int = 0
    stops: int = 0
    stopped: bool = False
    errors: list[Error] = field(default_factory=list)

    @property
    def rate(self) -> int:
        """Sample rate from the first audio-start."""
        return self.starts[0].rate

    @property
    def seconds(self) -> float:
        """Audio duration (16-bit mono)."""
        return len(self.audio) / 2 / self.rate if self.starts else 0.0

    def samples(self) -> np.ndarray:
        """Audio as float samples."""
        return np.frombuffer(self.audio, dtype="<i2").astype(np.float32) / 32768.0


async def collect(client: AsyncTcpClient, until: str = "audio-stop", timeout: float = TIMEOUT) -> Reply:
    """Read events until `until` (audio-stop or synthesize-stopped), an error, or EOF."""
    reply = Reply()
    while True:
        event = await read(client, timeout)
        if event is None:
            return reply
        reply.events.append(event)
        if AudioStart.is_type(event.type):
            reply.starts.append(AudioStart.from_event(event))
        elif AudioChunk.is_type(event.type):
            reply.audio += event.payload or b""
            reply.chunks += 1
        elif AudioStop.is_type(event.type):
            reply.stops += 1
            if until == "audio-stop":
                return reply
        elif SynthesizeStopped.is_type(event.type):
            reply.stopped = True
            if until == "synthesize-stopped":
                return reply
        elif Error.is_type(event.type):
            reply.errors.append(Error.from_event(event))
            if until != "synthesize-stopped":
                return reply


def assert_speech(samples: np.ndarray, rate: int, words: int) -> None:
    """Audio is plausible speech for `words` words: not silence, mostly voiced, sensible duration."""
    seconds = len(samples) / rate
    assert 0.12 * words <= seconds <= 1.0 * words + 1.0, f"{seconds:.2f} s of audio for {words} words"
    frame = int(rate * 0.02)
    frames = samples[: len(samples) // frame * frame].reshape(-1, frame)
    rms = np.sqrt((frames**2).mean(axis=1))
    assert rms.max() > 0.05, f"audio is (nearly) silent: peak frame RMS {rms.max():.4f}"
    voiced = float((rms > 0.02).mean())
    assert voiced > 0.3, f"only {voiced:.0%} of 20 ms frames carry sound"
    # Speech has a syllable rhythm: the energy envelope rises and falls many times.
    envelope = rms > rms.max() * 0.25
    onsets = int(np.count_nonzero(envelope[1:] & ~envelope[:-1]))
    assert onsets >= max(2, words // 3), f"only {onsets} energy onsets for {words} words"


def replace(obj: Any, **changes: Any) -> Any:
    """dataclasses.replace, re-exported for tests."""
    return dataclasses.replace(obj, **changes)


def refusing_unknown_voices(config: Config) -> Config:
    """`config` with `server.unknown_voice: error` (a voice that is not there gets VoiceNotFound, not the default)."""
    return dataclasses.replace(config, server=dataclasses.replace(config.server, unknown_voice="error"))


def load(path: Path) -> Config:
    """load_config, re-exported for tests."""
    return load_config(path)


def similar(a: bytes, b: bytes) -> bool:
    """True when two 16-bit renderings are the same speech: espeak adds small random variation, so compare
    duration (within 2%) and long-term spectrum (cosine > 0.95) rather than samples."""
    x = np.frombuffer(a, dtype="<i2").astype(np.float64)
    y = np.frombuffer(b, dtype="<i2").astype(np.float64)
    if not len(x) or abs(len(x) - len(y)) > 0.02 * len(x):
        return False

    def spectrum(z: np.ndarray) -> np.ndarray:
        frames = z[: len(z) // 512 * 512].reshape(-1, 512)
        return np.log1p(np.abs(np.fft.rfft(frames * np.hanning(512), axis=1)).mean(axis=0))

    sx, sy = spectrum(x), spectrum(y)
    return bool((sx @ sy) / np.sqrt((sx @ sx) * (sy @ sy)) > 0.95)


@contextlib.asynccontextmanager
async def raw_connection(server: Server) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A plain TCP connection to the server, for sending bytes no well-behaved client would send."""
    assert server.port
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.port), TIMEOUT)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), TIMEOUT)


async def read_raw(reader: asyncio.StreamReader, timeout: float = TIMEOUT) -> Optional[Event]:
    """Read one event from a raw connection with the `wyoming` library's parser, under a timeout."""
    return await asyncio.wait_for(async_read_event(reader), timeout)


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = TIMEOUT) -> list[Event]:
    """All events until the server closes the connection (fails on timeout)."""
    events: list[Event] = []
    while True:
        try:
            event = await read_raw(reader, timeout)
        except (ConnectionError, asyncio.IncompleteReadError):
            return events
        if event is None:
            return events
        events.append(event)


def fault_config(
    directory: Path, limits: Optional[dict[str, Any]] = None, engine: Optional[dict[str, Any]] = None, **server: Any
) -> Config:
    """A config serving the `fault` test engine (tests/fault_engine.py) with the given limits and engine settings."""
    return load_config(
        write_config(
            directory,
            server=server or None,
            engine={"name": "fault", "fallback": None},
            engines={"fault": engine or {}},
            limits=limits or {},
        )
    )


def fault_plugins() -> Plugins:
    """Plugins with the `fault` test engine registered."""
    from . import fault_engine

    return Plugins(extra=(fault_engine,))


async def cli(*args: str, stdin: Optional[bytes] = None, env: Optional[dict[str, str]] = None) -> tuple[int, str, str]:
    """Run `wyoming-cosyvoice ARGS` in a subprocess while the test's event loop keeps serving; (rc, out, err)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "wyoming_cosyvoice",
        *args,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), TIMEOUT * 2)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def start_server(
    config: Path, env: Optional[dict[str, str]] = None, preexec_fn: Optional[Callable[[], Any]] = None
) -> tuple[subprocess.Popen[str], int]:
    """Start `python -m wyoming_cosyvoice serve` on an ephemeral port; return it with the port from "Ready on"."""

    proc = subprocess.Popen(
        [sys.executable, "-m", "wyoming_cosyvoice", "serve", "--config", str(config), "--uri", "tcp://127.0.0.1:0"],
        preexec_fn=preexec_fn,  # a signal disposition for the server to inherit (nohup's)
        cwd=Path(__file__).resolve().parents[1],
        stderr=subprocess.PIPE,
        text=True,
        env={**(env or os.environ), "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"Ready on tcp://127\.0\.0\.1:(\d+)", line)
        if match:
            return proc, int(match.group(1))
    proc.kill()
    raise AssertionError("server did not start:\n" + "".join(lines))
