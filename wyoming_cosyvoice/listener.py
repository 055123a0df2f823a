"""The Wyoming port, bound before the engine loads: a busy port or a missing socket folder is one line in a second,
not a traceback after minutes of model loading."""

from __future__ import annotations

import asyncio
import errno
from typing import Any, Awaitable, Callable, Optional
from urllib.parse import urlparse

from .errors import ConfigError

Accept = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

_REASONS = {
    errno.EADDRINUSE: "the address is already in use (another server on this port: a second wyoming-cosyvoice, "
    "wyoming-piper?)",
    errno.EACCES: "permission denied (ports below 1024 need privileges; or the socket folder is not writable)",
    errno.EADDRNOTAVAIL: "the address is not one of this machine's",
    errno.ENOENT: "the folder does not exist",
}


def _reason(err: OSError) -> str:
    return _REASONS.get(err.errno or 0) or err.strerror or str(err)


class Listener:
    """A bound (not yet accepting) listening socket; `serve(accept)` starts accepting connections."""

    def __init__(self, uri: str, server: asyncio.AbstractServer) -> None:
        self.uri = uri
        self.server = server
        self._accept: Optional[Accept] = None

    @classmethod
    async def bind(cls, uri: str, max_header_bytes: int) -> "Listener":
        """Bind `uri` (tcp:// or unix://); a ConfigError naming the address and why when it cannot be."""
        parsed = urlparse(uri)
        # The reader's buffer limit is what bounds a header line (readuntil fails beyond it).
        limit = max_header_bytes + 1
        holder: list[Listener] = []

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await holder[0].dispatch(reader, writer)

        try:
            if parsed.scheme == "tcp":
                if parsed.hostname is None or parsed.port is None:
                    raise ConfigError(f"server.uri: a tcp:// URI needs a host and a port, got {uri!r}")
                server: Any = await asyncio.start_server(
                    accept, parsed.hostname, parsed.port, limit=limit, start_serving=False
                )
            elif parsed.scheme == "unix":
                server = await asyncio.start_unix_server(accept, parsed.path, limit=limit, start_serving=False)
            else:
                raise ConfigError(f"server.uri: cannot listen on {uri!r} (use tcp:// or unix://)")
        except ValueError as err:  # a port that is not a number or out of range
            raise ConfigError(f"server.uri: cannot listen on {uri}: {err}") from None
        except OSError as err:
            raise ConfigError(f"server.uri: cannot listen on {uri}: {_reason(err)}") from None
        holder.append(cls(uri, server))
        return holder[0]

    async def dispatch(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One accepted connection, handed to the `accept` given to `serve`."""
        assert self._accept is not None  # no connection is accepted before serve()
        await self._accept(reader, writer)

    async def serve(self, accept: Accept) -> None:
        """Start accepting; each connection runs `accept(reader, writer)` in its own task."""
        self._accept = accept
        await self.server.start_serving()

    @property
    def port(self) -> Optional[int]:
        """The bound TCP port (useful with port 0); None for a unix socket."""
        sockets = getattr(self.server, "sockets", None)
        if not sockets:
            return None
        address = sockets[0].getsockname()
        return address[1] if isinstance(address, tuple) else None

    def close(self) -> None:
        """Stop listening (connections already accepted are not touched)."""
        self.server.close()

    async def wait_closed(self) -> None:
        """Wait until the listening socket is closed."""
        await self.server.wait_closed()
