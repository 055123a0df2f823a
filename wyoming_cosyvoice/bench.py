"""Load generator for any Wyoming TTS server: time to first audio, total time, audio length, real-time factor."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from wyoming.audio import AudioStart, AudioStop
from wyoming.client import AsyncClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped, SynthesizeVoice

from .audio import Playback
from .client import TtsClient
from .errors import ClientError, RemoteError, UsageError

_LOGGER = logging.getLogger(__name__)

_WORDS = (
    "the quick brown fox jumps over a lazy dog while curious children watch and laugh from the old stone bridge"
).split()

METRICS = ("ttfa_ms", "total_ms", "audio_s", "rtf", "stall_ms", "connect_ms")
"""Per-request values summarized in `BenchResult.summary()`."""

PERCENTILES = ("min", "median", "p90", "p99", "max")
"""Summary columns printed by the bench command."""


def sentence(words: int) -> str:
    """A deterministic English sentence of `words` words (the first 20 form the standard benchmark sentence)."""
    if words < 1:
        raise UsageError("--words must be at least 1")
    picked = [_WORDS[i % len(_WORDS)] for i in range(words)]
    return " ".join(picked).capitalize() + "."


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, linear interpolation between ranks (numpy's default)."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """min/median/p90/p99/max/mean of `values` (NaN entries when empty)."""
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "min": ordered[0] if ordered else math.nan,
        "median": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "max": ordered[-1] if ordered else math.nan,
        "mean": statistics.fmean(ordered) if ordered else math.nan,
    }


@dataclass(frozen=True)
class BenchSettings:
    """What to send, how often and how many at once."""

    uri: str = "tcp://127.0.0.1:10200"
    """Server address: tcp://HOST:PORT or unix://PATH."""

    text: str = field(default_factory=lambda: sentence(20))
    """Text of every request."""

    voice: Optional[str] = None
    """Voice name to request (None: the server's default)."""

    concurrency: int = 1
    """Clients sending requests at the same time."""

    requests: int = 10
    """Requests in total (shared by the clients), not counting warm-up."""

    stream: bool = False
    """Use streaming synthesis (synthesize-start/-chunk/-stop) instead of one `synthesize` event."""

    warmup: int = 1
    """Requests sent (one at a time) before measuring; not recorded."""

    timeout: float = 120.0
    """Seconds one request may take before it counts as failed."""


@dataclass
class RequestResult:
    """Timing of one request, measured by the client with time.perf_counter."""

    index: int
    """Order in which the request was started."""

    ok: bool = False
    """True when the audio ended normally (audio-stop / synthesize-stopped)."""

    connect_ms: float = math.nan
    """TCP connect time (not part of ttfa_ms/total_ms)."""

    ttfa_ms: float = math.nan
    """From sending the request to receiving the first audio chunk."""

    total_ms: float = math.nan
    """From sending the request to the end of its audio."""

    audio_s: float = 0.0
    """Seconds of audio received."""

    rtf: float = math.nan
    """Real-time factor: total time / audio time (below 1 is faster than real time)."""

    chunks: int = 0
    """Audio chunks received."""

    stall_ms: float = 0.0
    """How far playback starting at the first chunk would have run dry (0: the stream kept ahead of real time)."""

    error: str = ""
    """Why the request failed (an `error` event's code and text, a timeout, a lost connection)."""


@dataclass
class BenchResult:
    """All requests of one run and the summary over the successful ones."""

    settings: BenchSettings
    requests: list[RequestResult]
    wall_s: float
    """Wall time of the measured part (all clients, without warm-up)."""

    server: dict[str, Any] = field(default_factory=dict)
    """The TTS program the server described (name, description, voices)."""

    def error_counts(self) -> "collections.Counter[str]":
        """How many requests failed for each reason."""
        return collections.Counter(r.error for r in self.requests if r.error)

    @property
    def ok(self) -> list[RequestResult]:
        """Successful requests."""
        return [r for r in self.requests if r.ok]

    def summary(self) -> dict[str, Any]:
        """Percentiles of every metric over successful requests, plus totals."""
        ok = self.ok
        audio = sum(r.audio_s for r in ok)
        return {
            **{metric: summarize([getattr(r, metric) for r in ok]) for metric in METRICS},
            "requests": len(self.requests),
            "failed": len(self.requests) - len(ok),
            "behind_real_time": sum(1 for r in ok if r.stall_ms > 0),
            "audio_total_s": audio,
            "wall_s": self.wall_s,
            "x_real_time": audio / self.wall_s if self.wall_s > 0 else math.nan,
        }

    def to_json(self) -> dict[str, Any]:
        """Settings, server, summary and every request, for `--json`."""
        summary = self.summary()
        return {
            "settings": asdict(self.settings),
            "server": self.server,
            "summary": {k: v for k, v in summary.items() if k not in METRICS},
            "metrics": {k: summary[k] for k in METRICS},
            "requests": [asdict(r) for r in self.requests],
        }

    def table(self) -> str:
        """Human-readable summary: one row per metric, min/median/p90/p99/max columns."""
        summary = self.summary()
        labels = {
            "ttfa_ms": "first audio (ms)",
            "total_ms": "total (ms)",
            "audio_s": "audio (s)",
            "rtf": "real-time factor",
            "stall_ms": "behind real time (ms)",
            "connect_ms": "connect (ms)",
        }
        lines = [f"{'':24}" + "".join(f"{p:>10}" for p in PERCENTILES)]
        for metric in METRICS:
            row = summary[metric]
            lines.append(f"{labels[metric]:24}" + "".join(f"{row[p]:10.3f}" for p in PERCENTILES))
        lines.append(
            f"{summary['requests']} requests ({summary['failed']} failed), concurrency {self.settings.concurrency}, "
            f"{'streaming' if self.settings.stream else 'synthesize'}; {summary['audio_total_s']:.1f} s audio in "
            f"{summary['wall_s']:.2f} s = {summary['x_real_time']:.1f}x real time; "
            f"{summary['behind_real_time']} fell behind real time"
        )
        errors = sorted(self.error_counts())
        if errors:
            lines.append("errors: " + "; ".join(errors[:5]))
        return "\n".join(lines)


def _request_events(settings: BenchSettings) -> list[Event]:
    voice = SynthesizeVoice(name=settings.voice) if settings.voice else None
    if not settings.stream:
        return [Synthesize(text=settings.text, voice=voice).event()]
    return [
        SynthesizeStart(voice=voice).event(),
        SynthesizeChunk(text=settings.text).event(),
        SynthesizeStop().event(),
    ]


async def _connect(uri: str) -> AsyncClient:
    try:
        client = AsyncClient.from_uri(uri)
    except ValueError as err:
        raise UsageError(f"--uri {uri}: {err}") from None
    await client.connect()
    return client


async def _exchange(client: AsyncClient, events: list[Event], stream: bool, result: RequestResult) -> None:
    """Send one request and read its reply; timings go into `result`. Kept lean: 64 clients share a few cores."""
    bytes_per_second = 0.0
    playback = Playback()
    first = 0.0
    clock = time.perf_counter
    sent = clock()
    for request in events:
        await client.write_event(request)
    while True:
        event = await client.read_event()
        if event is None:
            result.error = "connection closed before the audio ended"
            break
        kind = event.type
        if kind == "audio-chunk":
            now = clock()
            if not first:
                first = now
                result.ttfa_ms = (now - sent) * 1000.0
            if not bytes_per_second:
                data = event.data or {}
                bytes_per_second = float(data["rate"] * data["width"] * data["channels"])
            playback.chunk(now, len(event.payload or b"") / bytes_per_second)
            result.chunks += 1
        elif AudioStart.is_type(kind):
            start = AudioStart.from_event(event)
            bytes_per_second = float(start.rate * start.width * start.channels)
        elif (AudioStop.is_type(kind) and not stream) or SynthesizeStopped.is_type(kind):
            result.ok = True
            break
        elif Error.is_type(kind):
            error = Error.from_event(event)
            result.error = f"{error.code}: {error.text}" if error.code else error.text
            break
    end = clock()
    result.total_ms = (end - sent) * 1000.0
    result.audio_s = playback.audio
    result.stall_ms = playback.dry_seconds * 1000.0
    if playback.audio > 0:
        result.rtf = (end - sent) / playback.audio


async def measure_request(settings: BenchSettings, index: int) -> RequestResult:
    """One request on a fresh connection (as Home Assistant does), timed by the client."""
    result = RequestResult(index)
    events = _request_events(settings)
    started = time.perf_counter()
    try:
        client = await asyncio.wait_for(_connect(settings.uri), settings.timeout)
    except (OSError, asyncio.TimeoutError) as err:
        result.error = f"connect failed: {type(err).__name__}: {err}"
        return result
    result.connect_ms = (time.perf_counter() - started) * 1000.0
    try:
        await asyncio.wait_for(_exchange(client, events, settings.stream, result), settings.timeout)
    except asyncio.TimeoutError:
        result.error = f"timed out after {settings.timeout:g} s"
    except (ConnectionError, asyncio.IncompleteReadError, OSError) as err:
        result.error = f"connection lost: {type(err).__name__}: {err}"
    finally:
        try:
            await client.disconnect()
        except (ConnectionError, OSError):
            pass
    return result


async def describe(uri: str, timeout: float = 10.0) -> dict[str, Any]:
    """The server's first TTS program (name, description, voice names); ClientError when it does not answer."""

    try:
        AsyncClient.from_uri(uri)
    except ValueError as err:
        raise UsageError(f"--uri {uri}: {err}") from None
    try:
        async with TtsClient(uri, connect_timeout=timeout, read_timeout=timeout) as client:
            info: Optional[Info] = await asyncio.wait_for(client.describe(), timeout)
    except (ClientError, RemoteError, asyncio.TimeoutError) as err:
        raise ClientError(f"{uri}: no Wyoming server answered describe ({type(err).__name__}: {err})") from None
    if info is None or not info.tts:
        raise ClientError(f"{uri}: the server describes no text-to-speech program")
    program = info.tts[0]
    return {
        "name": program.name,
        "description": program.description,
        "voices": [v.name for v in program.voices],
        "supports_synthesize_streaming": bool(program.supports_synthesize_streaming),
    }


async def run_bench(settings: BenchSettings) -> BenchResult:
    """Describe the server, send the warm-up requests, then `requests` requests from `concurrency` clients."""
    if settings.concurrency < 1 or settings.requests < 1:
        raise UsageError("--concurrency and --requests must be at least 1")
    server = await describe(settings.uri)
    if settings.voice and settings.voice not in server["voices"]:
        _LOGGER.warning("voice %r is not among the described voices (%s)", settings.voice, ", ".join(server["voices"]))
    for i in range(settings.warmup):
        warm = await measure_request(settings, -1 - i)
        if not warm.ok:
            raise ClientError(f"{settings.uri}: warm-up request failed: {warm.error}")
    results: list[RequestResult] = []
    indices = iter(range(settings.requests))

    async def client_loop() -> None:
        for index in indices:  # the shared iterator hands each client its next request
            results.append(await measure_request(settings, index))

    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(min(settings.concurrency, settings.requests))))
    wall = time.perf_counter() - started
    results.sort(key=lambda r: r.index)
    return BenchResult(settings, results, wall, server)


def write_json(result: BenchResult, path: Path) -> None:
    """Write `result.to_json()` (NaN written as null)."""
    doc = _nan_to_none(result.to_json())
    Path(path).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def plot(result: BenchResult, path: Path) -> bool:
    """Write a PNG of the latency distribution; False (and a log line) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = result.ok
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((axes[0], "ttfa_ms", "time to first audio (ms)"), (axes[1], "total_ms", "total (ms)")):
        values = sorted(getattr(r, metric) for r in ok)
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], drawstyle="steps-post")
            for q in (50, 90, 99):
                ax.axvline(percentile(values, q), linestyle=":", color="grey")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(True, alpha=0.3)
    s = result.settings
    fig.suptitle(
        f"{result.server.get('name', '?')}: {len(ok)} requests, concurrency {s.concurrency}, "
        f"{'streaming' if s.stream else 'synthesize'}, {len(s.text.split())} words"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
