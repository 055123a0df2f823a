"""The web port's connection bound: a cap on open connections, and deadlines for request heads, bodies and idleness.

aiohttp itself never sheds a connection that sends nothing, dribbles its head or never sends its body, and accepts
as many as the file limit allows, which can leave the Wyoming port none. Every connection of the web port is
wrapped in a `_Watched` protocol: over `web.max_connections` it is answered 503 and closed at once; otherwise its
request head must arrive within `web.header_timeout_s` (then `web.idle_timeout_s` between requests), and a
request's body within `web.body_timeout_s` of its head, or the connection is dropped; so is one that stops reading
its answer for `limits.write_timeout_s` (a stalled audition would hold an engine slot). The app's first middleware
(`ConnectionWarden.middleware`) says when a request's head has arrived and when its answer is done.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any, Awaitable, Callable, Optional

from aiohttp import web

from ..config import WebSettings
from ..guard import client_name
from ..logs import LogThrottle

_LOGGER = logging.getLogger(__name__)

FD_RESERVE = 32
"""File descriptors kept free besides both ports' connections (reference files, caches, worker pipes, logs)."""

ACCEPT_ERROR = "socket.accept() out of system resource"
"""asyncio's message when accept() fails for want of file descriptors (logged with a traceback per attempt)."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _refusal(message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _Watched(asyncio.Protocol):
    """One connection: refused when the web port is full, else aiohttp's own protocol under the warden's deadlines."""

    def __init__(self, warden: "ConnectionWarden") -> None:
        self.warden = warden
        self.inner: Optional[asyncio.Protocol] = None
        self.transport: Optional[asyncio.Transport] = None
        self.busy = 0
        self._timer: Optional[asyncio.TimerHandle] = None
        self._stalled: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if not self.warden.admit(self, transport):
            transport.write(_refusal(self.warden.full_message))
            transport.close()
            return
        self.inner = self.warden.make_protocol()
        self.inner.connection_made(transport)
        self.expect(self.warden.settings.header_timeout_s, "no request head")

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> Optional[bool]:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()
            loop = asyncio.get_running_loop()
            self._stalled = loop.call_later(self.warden.write_timeout_s, self._write_stalled)

    def resume_writing(self) -> None:
        self._resumed()
        if self.inner is not None:
            self.inner.resume_writing()

    def _resumed(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None

    def _write_stalled(self) -> None:
        self._stalled = None
        if self.transport is not None and not self.transport.is_closing():
            self.warden.throttle.log(
                _LOGGER, logging.INFO, "web stalled", "web: connection from %s dropped: it stopped reading its "
                "answer (limits.write_timeout_s)", self.peer(),
            )  # fmt: skip
            self.transport.abort()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.cancel()
        self._resumed()
        if self.inner is not None:
            self.warden.release(self)
            self.inner.connection_lost(exc)

    def expect(self, seconds: float, why: str, still: Callable[[], bool] = lambda: True) -> None:
        """Drop the connection in `seconds` unless a request is being answered by then (or `still()` is false)."""
        self.cancel()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expired, why, still)

    def _expired(self, why: str, still: Callable[[], bool]) -> None:
        self._timer = None
        if self.transport is None or self.transport.is_closing() or not still():
            return
        self.warden.throttle.log(
            _LOGGER, logging.INFO, f"web {why}", "web: connection from %s dropped: %s in time", self.peer(), why
        )
        self.transport.abort()

    def cancel(self) -> None:
        """No deadline until the next `expect`."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def peer(self) -> str:
        """The client, for log lines (`guard.client_name`)."""
        return client_name(self.transport.get_extra_info("peername") if self.transport is not None else None)


class ConnectionWarden:
    """Counts the web port's connections, refuses those over the cap and sheds the ones that stall (module doc)."""

    def __init__(self, settings: WebSettings) -> None:
        self.settings = settings
        self.max_connections = settings.max_connections
        """The cap in force: `web.max_connections`, or fewer where the file limit leaves no room for it."""
        self.write_timeout_s = 30.0
        """A client reading nothing of its answer for this long is dropped (the server's `limits.write_timeout_s`)."""
        self.open: dict[asyncio.BaseTransport, _Watched] = {}
        self.throttle = LogThrottle()
        self._make_protocol: Optional[Callable[[], asyncio.Protocol]] = None

    @property
    def full_message(self) -> str:
        """What a refused client is told."""
        return f"too many connections to the web port (web.max_connections = {self.max_connections})"

    async def serve(self, make_protocol: Callable[[], asyncio.Protocol], host: str, port: int) -> asyncio.Server:
        """Listen on `host:port`, each connection served by `make_protocol` (aiohttp's server) under this warden."""
        self._make_protocol = make_protocol
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: _Watched(self), host, port, reuse_address=True)

    def make_protocol(self) -> asyncio.Protocol:
        """aiohttp's protocol for an admitted connection."""
        assert self._make_protocol is not None, "serve() first"
        return self._make_protocol()

    def admit(self, watched: _Watched, transport: asyncio.BaseTransport) -> bool:
        """True (and counted) when there is room for one more connection."""
        if len(self.open) >= self.max_connections:
            self.throttle.log(
                _LOGGER, logging.WARNING, "web full", "web: connection from %s refused: %s", watched.peer(),
                self.full_message,
            )  # fmt: skip
            return False
        self.open[transport] = watched
        return True

    def release(self, watched: _Watched) -> None:
        """A connection ended."""
        if watched.transport is not None:
            self.open.pop(watched.transport, None)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The request head is in: no head deadline while it is answered, but its body has one; then idle again."""
        watched = self.open.get(request.transport) if request.transport is not None else None
        if watched is None:  # served by another site (tests that call the app directly)
            return await handler(request)
        watched.busy += 1
        if request.body_exists:
            watched.expect(self.settings.body_timeout_s, "no whole request body", lambda: not request.content.is_eof())
        else:
            watched.cancel()
        try:
            return await handler(request)
        finally:
            watched.busy -= 1
            watched.expect(self.settings.idle_timeout_s, "no next request", lambda: watched.busy == 0)


def connection_cap(wanted: int, wyoming_connections: int) -> int:
    """`wanted`, or fewer when the process's file limit could not hold that many beside the Wyoming port's own."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        in_use = len(os.listdir("/proc/self/fd"))
    except (ImportError, OSError, ValueError):
        return wanted
    if soft == resource.RLIM_INFINITY:
        return wanted
    room = soft - in_use - wyoming_connections - FD_RESERVE
    if room >= wanted:
        return wanted
    cap = max(1, room)
    _LOGGER.warning(
        "web.max_connections lowered from %d to %d: the file limit (ulimit -n %d, %d in use) must also hold "
        "limits.max_connections (%d) Wyoming connections; raise the file limit to serve more",
        wanted, cap, soft, in_use, wyoming_connections,
    )  # fmt: skip
    return cap


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, throttle: LogThrottle) -> Callable[[], None]:
    """Log accept() failures for want of file descriptors as one line per window, not a traceback per attempt
    (asyncio retries every 0.1 s); every other loop error goes where it went before. Returns the undo."""
    previous = loop.get_exception_handler()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == ACCEPT_ERROR:
            throttle.log(
                _LOGGER, logging.ERROR, "accept", "cannot accept connections: %s (file descriptors used up?); "
                "retrying", context.get("exception"),
            )  # fmt: skip
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)
    return lambda: loop.set_exception_handler(previous)


def request_client(request: web.Request) -> str:
    """The client of an HTTP request, named as in every log line (`guard.client_name`)."""
    transport = request.transport
    return client_name(transport.get_extra_info("peername") if transport is not None else None)
