"""Audio sinks and the Tee that fans one audio stream out to several of them, each isolated from the others."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Deque, Mapping, Optional, Protocol, Sequence

from .audio import AudioFormat
from .config import Config, Section
from .errors import SinkError
from .logs import LogThrottle
from .plugins import Plugins

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamInfo:
    """What a sink may want to know about the stream it is given (for file names, logs)."""

    label: str = "reply"
    """Short identifier of the stream (request id on the server, `reply` in the client)."""

    voice: Optional[str] = None
    """Voice name, when known."""

    started: float = field(default_factory=time.time)
    """Wall-clock time the stream started (seconds since the epoch)."""


class SinkStream(Protocol):
    """One audio stream being written to one sink."""

    async def write(self, pcm: bytes) -> None:
        """Take one chunk of PCM in the stream's format (may wait while the sink catches up)."""

    async def close(self, ok: bool) -> str:
        """Finish the stream (`ok` False: aborted, keep what arrived); returns a one-line summary."""


class Sink(Protocol):
    """A destination for audio; opened once per audio stream."""

    name: str
    """Name shown in reports (e.g. `wav:reply.wav`)."""

    async def open(self, fmt: AudioFormat, info: StreamInfo) -> SinkStream:
        """Start a stream in format `fmt`; raises SinkError (or OSError) when the destination is unavailable."""


@dataclass(frozen=True)
class SinkResult:
    """How one sink fared with one stream."""

    name: str
    """The sink's name."""

    ok: bool
    """True when the sink took the whole stream and finished cleanly."""

    detail: str
    """One line: the sink's summary, or what went wrong."""

    def line(self) -> str:
        """`name: detail` with a failure marker."""
        return f"{self.name}: {'' if self.ok else 'FAILED: '}{self.detail}"


_END = object()


class _Lane:
    """One sink's private queue and task: a slow or failing sink only ever hurts itself."""

    def __init__(
        self,
        sink: Sink,
        fmt: AudioFormat,
        info: StreamInfo,
        max_lag_bytes: int,
        grace: float,
        throttle: Optional[LogThrottle] = None,
    ) -> None:
        self.sink = sink
        self.throttle = throttle or LogThrottle()
        self.fmt = fmt
        self.max_lag_bytes = max_lag_bytes
        self.grace = grace
        self.queue: Deque[Any] = collections.deque()
        self.queued_bytes = 0
        self.handed_bytes = 0
        self.first_write: Optional[float] = None
        self.wakeup = asyncio.Event()
        self.result: Optional[SinkResult] = None
        self.ok_on_close = True
        self.task = asyncio.create_task(self._run(info), name=f"sink {sink.name}")

    def put(self, pcm: bytes) -> None:
        if self.result is not None:
            return
        if self.queued_bytes + len(pcm) > self.max_lag_bytes:
            lag = self.fmt.seconds(self.queued_bytes)
            self.fail(f"fell {lag:.1f} s behind the stream; dropped so the others keep going")
            return
        if self.first_write is None:
            self.first_write = time.monotonic()
        self.queue.append(pcm)
        self.queued_bytes += len(pcm)
        self.handed_bytes += len(pcm)
        self.wakeup.set()

    def end(self, ok: bool) -> None:
        self.ok_on_close = ok
        self.queue.append(_END)
        self.wakeup.set()

    def fail(self, detail: str) -> None:
        if self.result is None:
            self.result = SinkResult(self.sink.name, False, detail)
            self.throttle.warning(_LOGGER, f"sink {self.sink.name}", "sink %s: %s", self.sink.name, detail)
        self.queue.clear()
        self.queued_bytes = 0
        if not self.task.done():
            self.task.cancel()

    def deadline(self) -> float:
        """Seconds to wait at close: what a real-time sink still has to play, plus a grace period."""
        if self.first_write is None:
            return self.grace
        behind = self.fmt.seconds(self.handed_bytes) - (time.monotonic() - self.first_write)
        return max(0.0, behind) + self.grace

    async def _run(self, info: StreamInfo) -> None:
        stream: Optional[SinkStream] = None
        try:
            stream = await self.sink.open(self.fmt, info)
            while True:
                while not self.queue:
                    self.wakeup.clear()
                    await self.wakeup.wait()
                item = self.queue.popleft()
                if item is _END:
                    detail = await stream.close(self.ok_on_close)
                    stream = None
                    if self.result is None:
                        self.result = SinkResult(self.sink.name, True, detail)
                    return
                self.queued_bytes -= len(item)
                await stream.write(item)
        except asyncio.CancelledError:
            if stream is not None:
                await _close_quietly(stream)
            raise
        except Exception as err:  # any sink failure is isolated to its lane
            if self.result is None:
                self.result = SinkResult(self.sink.name, False, _explain(err))
                self.throttle.warning(
                    _LOGGER, f"sink {self.sink.name}", "sink %s failed: %s", self.sink.name, self.result.detail
                )
            self.queue.clear()
            self.queued_bytes = 0
            if stream is not None:
                await _close_quietly(stream)


def _explain(err: BaseException) -> str:
    """Our own errors and OS errors speak for themselves; anything else is a bug in a sink, so name its type."""
    text = str(err) or type(err).__name__
    return text if isinstance(err, (SinkError, OSError)) else f"{type(err).__name__}: {text}"


async def _close_quietly(stream: SinkStream) -> None:
    """Abort a stream after a failure or cancellation; its own errors are only logged."""
    try:
        await asyncio.wait_for(stream.close(False), 2.0)
    except BaseException as err:  # noqa: BLE001 - best effort, never mask the original problem
        _LOGGER.debug("closing a failed sink stream: %r", err)


class TeeStream:
    """One audio stream fanned out to every sink of a Tee. `write` never waits."""

    def __init__(self, lanes: list[_Lane]) -> None:
        self._lanes = lanes
        self._closed = False

    def write(self, pcm: bytes) -> None:
        """Queue a chunk for every sink; a sink that is too far behind is dropped, the others go on."""
        if not pcm or self._closed:
            return
        for lane in self._lanes:
            lane.put(pcm)

    async def close(self, ok: bool = True, timeout: Optional[float] = None) -> list[SinkResult]:
        """End the stream and wait for each sink to finish (each within its own deadline); returns their results."""
        if not self._closed:
            self._closed = True
            for lane in self._lanes:
                lane.end(ok)
        waits = [self._finish(lane, timeout) for lane in self._lanes]
        await asyncio.gather(*waits)
        return [lane.result or SinkResult(lane.sink.name, False, "no result") for lane in self._lanes]

    async def _finish(self, lane: _Lane, timeout: Optional[float]) -> None:
        limit = lane.deadline() if timeout is None else timeout
        done, _ = await asyncio.wait({lane.task}, timeout=limit)
        if not done:
            lane.fail(f"did not finish within {limit:.1f} s; abandoned")
            await asyncio.wait({lane.task}, timeout=3.0)

    def abort(self) -> None:
        """Cancel every sink at once (used when the owner itself is being torn down)."""
        self._closed = True
        for lane in self._lanes:
            if not lane.task.done():
                lane.task.cancel()


class Tee:
    """Fans audio streams out to several sinks, each through its own bounded queue and task."""

    def __init__(self, sinks: Sequence[Sink], *, max_lag_seconds: float = 900.0, grace: float = 10.0) -> None:
        self.sinks = list(sinks)
        self.max_lag_seconds = max_lag_seconds
        """A sink this far behind the stream is dropped (bounds memory for a stuck sink)."""
        self.grace = grace
        """Extra seconds each sink may take at close beyond the audio it still has to play."""
        self.throttle = LogThrottle()
        """Rate limit for the sinks' warning lines (a receiver that is down fails every reply)."""

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def open(self, fmt: AudioFormat, info: Optional[StreamInfo] = None) -> TeeStream:
        """Start one stream on every sink (needs a running event loop)."""
        info = info or StreamInfo()
        max_lag = int(self.max_lag_seconds * fmt.bytes_per_second)
        return TeeStream([_Lane(sink, fmt, info, max_lag, self.grace, self.throttle) for sink in self.sinks])


def parse_spec(plugins: Plugins, spec: str) -> tuple[str, Mapping[str, Any]]:
    """`NAME[:ARG]` from the command line -> (name, settings); ARG sets the key the sink registered as `spec_key`
    (wav: path, wyoming: uri, speaker: device), else `target`."""
    name, sep, arg = spec.partition(":")
    name = name.strip()
    if not name:
        raise SinkError(f"--sink {spec!r}: expected NAME[:ARG], e.g. speaker, wav:reply.wav, wyoming:tcp://host:10601")
    if not sep:
        return name, {}
    if not arg:
        raise SinkError(f"--sink {spec!r}: nothing after ':'")
    registered = plugins.registry["sinks"].get(name)
    return name, {(registered.spec_key if registered else "") or "target": arg}


def build_sink(plugins: Plugins, name: str, section: Section) -> Sink:
    """Create sink `name` from its settings through its plugin's factory."""
    sink: Sink = plugins.factory("sinks", name)(section)
    return sink


def sink_from_spec(plugins: Plugins, spec: str, extra: Optional[Mapping[str, Any]] = None) -> Sink:
    """A sink from a `--sink NAME[:ARG]` option plus extra settings (e.g. jitter_ms from other flags)."""
    name, data = parse_spec(plugins, spec)
    section = Section(
        name=name, data={**data, **(extra or {})}, source="command line", key=f"--sink {name}", base_dir=Path.cwd()
    )
    return build_sink(plugins, name, section)


def server_tee(config: Config, plugins: Plugins) -> Tee:
    """The server-side Tee from config `sinks:` (only config can name files or hosts, never a request)."""
    sinks = [build_sink(plugins, name, config.section("sinks", name)) for name in config.sinks]
    return Tee(sinks)
