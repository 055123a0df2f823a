"""Wyoming events on the wire, read defensively: bounded sizes, strict types, idle and write timeouts."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any, Callable, Optional

from wyoming.event import Event
from wyoming.version import __version__ as WYOMING_VERSION

from .aio import wait_within
from .config import Limits, describe_value
from .errors import ClientTimeout, LimitExceeded, ProtocolError
from .logs import LogThrottle

_LOGGER = logging.getLogger(__name__)


_KEEPALIVE = ("ping", "pong")
"""Events that do not count as activity for the idle timeout: a connection that only pings is idle."""


class ClientStalled(ConnectionError):
    """The client accepted no data for `limits.write_timeout_s`; the connection was aborted."""


def _decode_object(raw: bytes, what: str) -> dict[str, Any]:
    """UTF-8 JSON object from `raw`, or a ProtocolError saying what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ProtocolError(f"event {what} is not valid UTF-8 (byte {err.start})") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise ProtocolError(f"event {what} is nested too deeply") from None
    except ValueError as err:
        raise ProtocolError(f"event {what} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"event {what} must be a JSON object, got {type(value).__name__}")
    return value


def _length(header: dict[str, Any], key: str, maximum: int, limit_key: str) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(f"'{key}' must be a non-negative integer, got {describe_value(value)}")
    if value > maximum:
        raise LimitExceeded(f"'{key}' is {value} bytes; the limit is {maximum} (limits.{limit_key})")
    return value


async def _exactly(reader: asyncio.StreamReader, count: int, what: str) -> bytes:
    try:
        return await reader.readexactly(count)
    except asyncio.IncompleteReadError as err:
        raise ProtocolError(
            f"connection ended after {len(err.partial)} of the {count} {what} bytes the header announced"
        ) from None


async def read_event(reader: asyncio.StreamReader, limits: Limits) -> Optional[Event]:
    """Read one event; None at a clean end of stream. Malformed input raises ProtocolError or LimitExceeded."""
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as err:
            if not err.partial.strip():
                return None
            raise ProtocolError("connection ended in the middle of an event header") from None
        except asyncio.LimitOverrunError:
            raise LimitExceeded(
                f"event header line is longer than {limits.max_header_bytes} bytes (limits.max_header_bytes)"
            ) from None
        if len(line) > limits.max_header_bytes + 1:
            raise LimitExceeded(
                f"event header line is {len(line) - 1} bytes; the limit is {limits.max_header_bytes} "
                "(limits.max_header_bytes)"
            )
        if line.strip():
            break  # blank lines between events are tolerated (hand-typed sessions)
    header = _decode_object(line, "header")
    event_type = header.get("type")
    if not isinstance(event_type, str) or not event_type:
        raise ProtocolError(f"event header needs a non-empty string 'type', got {describe_value(event_type)}")
    data = header.get("data")
    if data is None:
        data = {}
    elif not isinstance(data, dict):
        raise ProtocolError(f"'data' must be a JSON object, got {type(data).__name__}")
    data_length = _length(header, "data_length", limits.max_data_bytes, "max_data_bytes")
    payload_length = _length(header, "payload_length", limits.max_payload_bytes, "max_payload_bytes")
    if data_length:
        data = {**data, **_decode_object(await _exactly(reader, data_length, "data"), "data")}
    payload = await _exactly(reader, payload_length, "payload") if payload_length else None
    return Event(type=event_type, data=data, payload=payload)


class EventChannel:
    """One client's events: bounded reads with an idle timeout, serialized writes with a write timeout."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        limits: Limits,
        peer: str = "?",
        throttle: Optional[LogThrottle] = None,
    ) -> None:
        self.reader = reader
        self.peer = peer
        """The client, for log lines."""
        self.throttle = throttle or LogThrottle()
        self.writer = writer
        self.limits = limits
        self._write_lock = asyncio.Lock()
        self._last_activity = asyncio.get_running_loop().time()
        self.aborted = False
        self._reading: Optional["asyncio.Future[Optional[Event]]"] = None
        self._stopped = False
        self._error_sent = False

    def touch(self) -> None:
        """Record activity (an event read or written), which resets the idle timer."""
        self._last_activity = asyncio.get_running_loop().time()

    async def read(self, busy: Callable[[], bool]) -> Optional[Event]:
        """The next event. Raises ClientTimeout when nothing completes for the idle timeout while not `busy()`."""
        if self._stopped:
            return None
        loop = asyncio.get_running_loop()
        task = self._reading = asyncio.ensure_future(read_event(self.reader, self.limits))
        try:
            while True:
                remaining = self._last_activity + self.limits.idle_timeout_s - loop.time()
                # asyncio.wait does not cancel the read: a half-read event must not be torn apart by a timer.
                done, _ = await asyncio.wait({task}, timeout=None if math.isinf(remaining) else max(remaining, 0.0))
                if done:
                    if self._stopped and task.cancelled():
                        return None
                    event = task.result()
                    if event is not None and event.type not in _KEEPALIVE:
                        self.touch()
                    return event
                if busy():
                    self.touch()  # waiting for its own synthesis is not idling
                    continue
                if loop.time() - self._last_activity >= self.limits.idle_timeout_s:
                    raise ClientTimeout(
                        f"no complete event for {self.limits.idle_timeout_s:g} s (limits.idle_timeout_s; pings do not "
                        "count)"
                    )
        finally:
            self._reading = None
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def stop_reading(self) -> None:
        """Make `read` return None (end of the conversation) now; later data from the client is left unread.

        The stream itself is not touched: `feed_eof()` on a socket that still receives makes asyncio log a fatal
        "feed_data after feed_eof" error when the client's next bytes arrive.
        """
        self._stopped = True
        if self._reading is not None and not self._reading.done():
            self._reading.cancel()

    async def write(self, event: Event) -> None:
        """Send one event; a client that accepts nothing for the write timeout is aborted (ClientStalled)."""
        async with self._write_lock:
            if self.aborted or self.writer.is_closing():
                raise ConnectionResetError("connection already closed")
            if self._error_sent and event.type != "synthesize-stopped":
                # After its `error` a client hears nothing more but a failed stream's end (it may be mid-stream).
                raise ConnectionResetError("an error was sent; the connection is closing")
            if event.type == "error":
                self._error_sent = True
            # One write per event (the wyoming library makes three sends of it), and a timed wait only when the
            # transport's buffer is over its high-water mark, i.e. when drain() would really block.
            self.writer.write(encode_event(event))
            transport = self.writer.transport
            if transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[1]:
                await self.writer.drain()
            else:
                try:
                    await wait_within(self.writer.drain(), self.limits.write_timeout_s)
                except asyncio.TimeoutError:
                    self.abort()
                    stalled = ClientStalled(
                        f"client accepted no data for {self.limits.write_timeout_s:g} s (limits.write_timeout_s)"
                    )
                    # Logged here: the cancellation that follows may interrupt whoever would log it further up.
                    self.throttle.warning(
                        _LOGGER, "stalled", "client %s: %s; disconnected, its synthesis cancelled", self.peer, stalled
                    )
                    raise stalled from None
            if event.type not in _KEEPALIVE:
                self.touch()

    def abort(self) -> None:
        """Drop the connection now, discarding unsent data (frees the transport's buffer)."""
        self.aborted = True
        transport = self.writer.transport
        if transport is not None and not transport.is_closing():
            abort = getattr(transport, "abort", None)
            if abort is not None:
                abort()
            else:
                transport.close()
        self.stop_reading()


def encode_event(event: Event) -> bytes:
    """The bytes of one event on the wire, exactly as the wyoming library frames it (header, data, payload)."""
    header: dict[str, Any] = {"type": event.type, "version": WYOMING_VERSION}
    data_bytes = b""
    if event.data:
        data_bytes = json.dumps(event.data, ensure_ascii=False).encode("utf-8")
        header["data_length"] = len(data_bytes)
    payload = event.payload or b""
    if payload:
        header["payload_length"] = len(payload)
    return b"".join((json.dumps(header, ensure_ascii=False).encode("utf-8"), b"\n", data_bytes, payload))
