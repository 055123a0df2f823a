"""Builds the service from config and plugins, starts the Wyoming server, zeroconf, signals and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from functools import partial
from typing import Any, Optional
from urllib.parse import urlparse

from wyoming.event import async_get_stdin, async_get_stdout
from wyoming.server import AsyncServer

from .config import Config
from .engine import Engine
from .errors import EngineUnavailable, PluginError
from .handler import TtsEventHandler
from .plugins import Plugins
from .preparation import VoicePreparer
from .service import Service
from .sinks import server_tee
from .voices import VoiceCatalog

_LOGGER = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 10.0
"""How long in-flight requests may finish after SIGTERM/SIGINT before connections are closed."""


def build_catalog(config: Config, plugins: Plugins) -> VoiceCatalog:
    """Create every configured voice-profile provider and the catalog over them."""
    providers = [
        plugins.factory("voice_providers", name)(config.section("voice_providers", name))
        for name in config.voice_providers
    ]
    return VoiceCatalog(providers)


async def start_engine(config: Config, plugins: Plugins) -> tuple[Engine, str]:
    """Create and start the configured engine, or the fallback engine when it cannot start here."""
    name = config.engine.name
    try:
        engine = plugins.factory("engines", name)(config.section("engines", name))
        await engine.start()
        return engine, ""
    except (EngineUnavailable, PluginError) as err:
        fallback = config.engine.fallback
        if not fallback or fallback == name:
            raise
        _LOGGER.warning(
            "Engine %r unavailable (%s); serving with the embedded %r engine. To enable CosyVoice, set "
            "engines.cosyvoice.repo and engines.cosyvoice.model_dir in %s (README: 'GPU engine: CosyVoice').",
            name,
            err,
            fallback,
            config.source,
        )
        engine = plugins.factory("engines", fallback)(config.section("engines", fallback))
        await engine.start()
        return engine, f"fallback from {name}: {err}"


async def build_service(config: Config, plugins: Plugins) -> Service:
    """Voices, engine (started, voices prepared, warmed up) and admission, ready to serve."""
    catalog = build_catalog(config, plugins)
    tee = server_tee(config, plugins)  # before the engine: a bad sink setting fails fast
    engine, note = await start_engine(config, plugins)
    preparer = VoicePreparer(catalog, engine)
    await preparer.prepare_all()
    await engine.warmup()
    _LOGGER.info("Engine %s ready: %s", engine.name, engine.health())
    _LOGGER.info("Voices: %s (default: %s)", ", ".join(p.name for p in catalog.profiles) or "none",
                 catalog.default.name if catalog.default else "none")
    return Service(
        engine,
        catalog,
        max_concurrent=config.server.max_concurrent,
        streaming=config.server.streaming,
        engine_note=note,
        tee=tee,
        preparer=preparer,
    )


class Server:
    """A running Wyoming server over a Service; `serve_until_stopped` blocks until a signal or `request_stop`."""

    def __init__(self, service: Service, uri: str, *, zeroconf: bool = False, zeroconf_name: Optional[str] = None):
        self.service = service
        self.uri = uri
        self.zeroconf = zeroconf
        self.zeroconf_name = zeroconf_name
        self._wyoming: Optional[AsyncServer] = None
        self._zeroconf: Any = None
        self._stop = asyncio.Event()

    @property
    def port(self) -> Optional[int]:
        """The bound TCP port (useful with port 0)."""
        inner = getattr(self._wyoming, "_server", None)
        if inner is None or not inner.sockets:
            return None
        return inner.sockets[0].getsockname()[1]

    async def start(self) -> None:
        """Bind and start accepting connections."""
        self._wyoming = AsyncServer.from_uri(self.uri)
        await self._wyoming.start(partial(TtsEventHandler, service=self.service))
        if self.zeroconf:
            await self._announce()

    async def _announce(self) -> None:
        from wyoming.zeroconf import HomeAssistantZeroconf  # needs the zeroconf package

        parsed = urlparse(self.uri)
        if parsed.scheme != "tcp" or self.port is None:
            _LOGGER.warning("zeroconf needs a tcp:// URI; not announcing")
            return
        host = parsed.hostname if parsed.hostname not in ("0.0.0.0", "::", "") else None
        try:
            zc = HomeAssistantZeroconf(port=self.port, name=self.zeroconf_name, host=host)
            await zc.register_server()
        except OSError as err:  # no multicast route: serve anyway, Home Assistant can be pointed at host:port
            _LOGGER.warning("Zeroconf announcement failed (%s); add the server in Home Assistant by host and port", err)
            return
        self._zeroconf = zc
        _LOGGER.info("Zeroconf: announced %s as _wyoming._tcp.local. on port %s", zc.name, self.port)

    def request_stop(self) -> None:
        """Stop accepting, let in-flight requests finish (grace period), then close."""
        self._stop.set()

    async def serve_until_stopped(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Serve until SIGINT/SIGTERM (or request_stop), then shut down gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.request_stop)
        try:
            await self._stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)
        await self.shutdown(grace)

    async def shutdown(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Close the listener, wait up to `grace` s for busy connections, then close the rest and the engine."""
        wyoming = self._wyoming
        if wyoming is None:
            return
        inner = getattr(wyoming, "_server", None)
        if inner is not None:
            inner.close()
        deadline = time.monotonic() + grace
        while self.service.admission.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await wyoming.stop()
        if self._zeroconf is not None:
            await self._zeroconf._aiozc.async_close()  # unregisters the service
            self._zeroconf = None
        handlers = list(getattr(wyoming, "_handlers", {}))
        if handlers:
            await asyncio.wait(handlers, timeout=2.0)
        await self.service.close_sinks()
        await self.service.preparer.close()
        await self.service.engine.close()
        _LOGGER.info("Server stopped")


async def serve_stdio(service: Service) -> None:
    """Serve one client over standard input/output (for process-spawning clients and tests)."""
    reader = await async_get_stdin()
    writer = await async_get_stdout()
    handler = TtsEventHandler(reader, writer, service, finish_on_eof=True)
    await handler.run()
    await service.close_sinks()
    await service.engine.close()


async def run(config: Config, plugins: Plugins) -> None:
    """Build the service and serve on `config.server.uri` until stopped."""
    started = time.perf_counter()
    service = await build_service(config, plugins)
    if config.server.uri.startswith("stdio://"):
        await serve_stdio(service)
        return
    server = Server(
        service, config.server.uri, zeroconf=config.server.zeroconf, zeroconf_name=config.server.zeroconf_name
    )
    await server.start()
    _LOGGER.info("Ready on %s (engine %s, started in %.2f s)", config.server.uri, service.engine.name,
                 time.perf_counter() - started)
    await server.serve_until_stopped()
