"""Who may connect and how many at once: the client-network allow-list and the connection bound."""

from __future__ import annotations

import ipaddress
from typing import Any, Optional, Union

from .config import Limits

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def client_name(peername: Any) -> str:
    """The client as every log line names it: host:port ("local" for unix sockets and pipes)."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        return f"{peername[0]}:{peername[1]}"
    return str(peername) if peername else "local"


def peer_address(peername: Any) -> Optional[Address]:
    """The client's IP address from `get_extra_info("peername")`; None for unix sockets and pipes."""
    if not isinstance(peername, tuple) or not peername:
        return None
    host = str(peername[0]).split("%", 1)[0]  # drop an IPv6 zone id
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d
    return address


class ConnectionGuard:
    """Decides whether a new connection is served: allow-list first, then the connection bound."""

    def __init__(self, limits: Limits) -> None:
        self.networks: list[Network] = [ipaddress.ip_network(n, strict=False) for n in limits.allowed_networks]
        self.max_connections = limits.max_connections
        self.open = 0
        """Connections currently being served."""

    def allowed(self, peername: Any) -> bool:
        """True when the allow-list is empty, the peer is local (unix socket, pipe) or inside a listed network."""
        if not self.networks:
            return True
        address = peer_address(peername)
        if address is None:
            return not (isinstance(peername, tuple) and peername)  # unparsable TCP peer: refuse
        return any(address.version == net.version and address in net for net in self.networks)

    def full(self) -> bool:
        """True when `max_connections` are already open."""
        return self.open >= self.max_connections
