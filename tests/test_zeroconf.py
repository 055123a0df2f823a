"""Optional zeroconf announcement: Home Assistant finds the server as _wyoming._tcp.local."""

from __future__ import annotations

import uuid

from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from wyoming_cosyvoice.config import Config
from wyoming_cosyvoice.plugins import Plugins
from wyoming_cosyvoice.server import Server, build_service


async def test_zeroconf_announces_service(config: Config) -> None:
    service = await build_service(config, Plugins())
    name = f"cosyvoice-test-{uuid.uuid4().hex[:8]}"
    server = Server(service, "tcp://127.0.0.1:0", zeroconf=True, zeroconf_name=name)
    await server.start()
    browser = AsyncZeroconf(interfaces=["127.0.0.1"])
    try:
        info = AsyncServiceInfo("_wyoming._tcp.local.", f"{name}._wyoming._tcp.local.")
        assert await info.async_request(browser.zeroconf, 5000)
        assert info.port == server.port
        assert info.parsed_addresses() == ["127.0.0.1"]
    finally:
        await browser.async_close()
        await server.shutdown(grace=1.0)
