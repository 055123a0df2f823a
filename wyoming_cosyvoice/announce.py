"""The zeroconf (mDNS) announcement Home Assistant discovers the server by: `_wyoming._tcp.local.`."""

from __future__ import annotations

import socket
import uuid
from typing import Any, Optional

_SERVICE_TYPE = "_wyoming._tcp.local."
_MDNS_TARGET_IP = "224.0.0.251"


class Announcement:
    """The server announced under `name` (default: this machine's MAC address, as wyoming-piper does) until `close`.

    Made with the zeroconf package's public API rather than wyoming's `HomeAssistantZeroconf`, which can register
    but offers no public way to unregister (only its private `_aiozc`).
    """

    def __init__(self, port: int, name: Optional[str] = None, host: Optional[str] = None) -> None:
        self.port = port
        self.name = name or _mac_address()
        self.host = host or _outgoing_address()
        self._zeroconf: Any = None

    async def register(self) -> None:
        """Announce the service (OSError without a multicast route)."""
        from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf  # needs the zeroconf package

        zeroconf = AsyncZeroconf()
        info = AsyncServiceInfo(
            _SERVICE_TYPE,
            f"{self.name}.{_SERVICE_TYPE}",
            addresses=[socket.inet_aton(self.host)],
            port=self.port,
        )
        try:
            await zeroconf.async_register_service(info)
        except BaseException:
            await zeroconf.async_close()
            raise
        self._zeroconf = zeroconf

    async def close(self) -> None:
        """Unregister the service and close the responder."""
        zeroconf, self._zeroconf = self._zeroconf, None
        if zeroconf is not None:
            await zeroconf.async_close()


def _outgoing_address() -> str:
    """The address this machine sends multicast from (no packet is sent: a UDP connect only picks the route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.setblocking(False)
        probe.connect((_MDNS_TARGET_IP, 1))
        return str(probe.getsockname()[0])


def _mac_address() -> str:
    """This machine's MAC address as hex without colons."""
    node = uuid.getnode()
    return "".join(f"{(node >> shift) & 0xFF:02x}" for shift in range(40, -8, -8))
