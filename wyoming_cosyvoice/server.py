"""Builds the service from config and plugins, starts the Wyoming server, zeroconf, signals and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Optional
from urllib.parse import urlparse

from wyoming.error import Error
from wyoming.event import async_get_stdout, async_write_event

from .announce import Announcement
from .config import Config
from .errors import ConfigError, ServerBusy
from .guard import ConnectionGuard, client_name
from .handler import TtsEventHandler
from .listener import Listener
from .metrics import create_metrics
from .plugins import Plugins
from .preparation import VoicePreparer
from .routing import Engines
from .service import Service
from .sinks import server_tee
from .voices import VoiceCatalog

_LOGGER = logging.getLogger(__name__)


def build_catalog(config: Config, plugins: Plugins) -> VoiceCatalog:
    """Create every configured voice-profile provider and the catalog over them."""
    providers = [
        plugins.factory("voice_providers", name)(config.section("voice_providers", name))
        for name in config.voice_providers
    ]
    return VoiceCatalog(providers)


async def build_service(config: Config, plugins: Plugins) -> Service:
    """Voices, engines (started, voices prepared, warmed up) and admission, ready to serve."""
    catalog = await asyncio.to_thread(build_catalog, config, plugins)  # file scans and YAML, off the loop
    tee = server_tee(config, plugins)  # before the engines: a bad sink setting fails fast
    engines = await Engines.start(config, plugins, [p.engine for p in catalog.all_profiles if p.engine])
    metrics = create_metrics(config.metrics.enabled)
    preparer = VoicePreparer(
        catalog,
        engines,
        timeout=config.limits.engine_timeout_s,
        max_reference_seconds=config.limits.max_reference_seconds,
        metrics=metrics,
    )
    await preparer.prepare_all()
    await engines.warmup()
    preparer.recheck()  # an extra engine that failed its warm-up takes its voices with it
    for name, engine in engines.running.items():
        _LOGGER.info("Engine %s ready: %s", name, engine.health())
    _LOGGER.info(
        "Voices: %s (default: %s)",
        ", ".join(p.name for p in catalog.profiles) or "none",
        catalog.default.name if catalog.default else "none",
    )
    return Service(
        engines,
        catalog,
        max_concurrent=config.server.max_concurrent,
        streaming=config.server.streaming,
        first_clause_words=config.server.first_clause_words,
        settings=config.server,
        tee=tee,
        limits=config.limits,
        preparer=preparer,
        metrics=metrics,
    )


class Server:
    """A running Wyoming server over a Service; `serve_until_stopped` blocks until a signal or `request_stop`."""

    def __init__(
        self,
        service: Service,
        uri: str,
        *,
        zeroconf: bool = False,
        zeroconf_name: Optional[str] = None,
        listener: Optional[Listener] = None,
    ):
        self.service = service
        self.uri = uri
        self.zeroconf = zeroconf
        self.zeroconf_name = zeroconf_name
        self.limits = service.limits
        self.guard = ConnectionGuard(self.limits)
        self._bound = listener  # bound before the engine loaded (run); else bound by start()
        self._listener: Optional[Listener] = None
        self._connections: dict["asyncio.Task[Any]", TtsEventHandler] = {}
        self._zeroconf: Optional[Announcement] = None
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self.studio: Any = None
        """The voice studio page served on this loop (web.enabled), closed first at shutdown."""
        self.metrics_listener: Any = None
        """The /metrics-only listener (metrics.port), closed with the studio."""

    @property
    def port(self) -> Optional[int]:
        """The bound TCP port (useful with port 0)."""
        return None if self._listener is None else self._listener.port

    async def start(self) -> None:
        """Bind (unless bound already) and start accepting connections."""
        listener, self._bound = self._bound, None
        if listener is None:
            listener = await Listener.bind(self.uri, self.limits.max_header_bytes)
        self._listener = listener
        await listener.serve(self._serve)
        if self.zeroconf:
            await self._announce()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection, in its own task: allow-list, connection bound, then the protocol handler."""
        peername = writer.get_extra_info("peername")
        client = client_name(peername)
        throttle = self.service.log_throttle
        if not self.guard.allowed(peername):
            self.service.metrics.refused("not_allowed")
            throttle.warning(
                _LOGGER, "not allowed", "connection from %s refused: not in limits.allowed_networks", client
            )
            writer.transport.abort()
            return
        if self.guard.full() or self.service.closing:
            busy = ServerBusy(
                "server is shutting down"
                if self.service.closing
                else f"too many connections (limits.max_connections = {self.guard.max_connections})"
            )
            self.service.metrics.refused("shutting_down" if self.service.closing else "connections")
            throttle.warning(_LOGGER, "refused busy", "connection from %s refused: %s", client, busy)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(async_write_event(Error(text=str(busy), code=busy.code).event(), writer), 1.0)
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        handler = TtsEventHandler(reader, writer, self.service)
        self.guard.open += 1
        self._connections[task] = handler
        try:
            await handler.run()
        except asyncio.CancelledError:
            # End quietly: this is the connection's own top-level task, and asyncio's stream callback (3.11) logs
            # a spurious error for a cancelled one.
            writer.transport.abort()
        except Exception:  # a bug in one connection must never take the server down
            _LOGGER.exception("connection from %s failed", client)
            writer.transport.abort()
        finally:
            self.guard.open -= 1
            self._connections.pop(task, None)

    async def _announce(self) -> None:
        parsed = urlparse(self.uri)
        if parsed.scheme != "tcp" or self.port is None:
            _LOGGER.warning("zeroconf needs a tcp:// URI; not announcing")
            return
        host = parsed.hostname if parsed.hostname not in ("0.0.0.0", "::", "") else None
        try:
            announcement = Announcement(self.port, self.zeroconf_name, host)
            await announcement.register()
        except OSError as err:  # no multicast route: serve anyway, Home Assistant can be pointed at host:port
            _LOGGER.warning("Zeroconf announcement failed (%s); add the server in Home Assistant by host and port", err)
            return
        self._zeroconf = announcement
        _LOGGER.info("Zeroconf: announced %s as _wyoming._tcp.local. on port %s", announcement.name, self.port)

    def request_stop(self) -> None:
        """Stop accepting, let in-flight requests finish (grace period), then close; a second call skips the grace."""
        if self._stop.is_set():
            self._force.set()
        self._stop.set()

    async def serve_until_stopped(self, grace: Optional[float] = None) -> None:
        """Serve until SIGINT/SIGTERM/SIGHUP (or request_stop), then shut down gracefully."""
        loop = asyncio.get_running_loop()
        handled = _stop_signals()
        for sig in handled:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.request_stop)
        try:
            await self._stop.wait()
            _LOGGER.info("Stopping: no new connections; in-flight requests may finish")
            await self.shutdown(grace)
        finally:
            for sig in handled:
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)

    def busy_connections(self) -> int:
        """Connections with an unfinished reply: synthesis queued or running, or a stream still open."""
        return sum(1 for handler in self._connections.values() if handler.in_progress())

    async def shutdown(self, grace: Optional[float] = None) -> None:
        """Close the listener, wait up to `grace` s for unfinished replies (open streams too), then close the rest."""
        if grace is None:
            grace = self.limits.shutdown_grace_s
        listener = self._listener
        if listener is None:
            return
        self._listener = None
        self.service.begin_shutdown()
        listener.close()
        if self.studio is not None:  # auditions end with the page; Wyoming clients get their grace period
            studio, self.studio = self.studio, None
            await studio.close()
        if self.metrics_listener is not None:
            metrics_listener, self.metrics_listener = self.metrics_listener, None
            await metrics_listener.close()
        deadline = time.monotonic() + grace
        while self.busy_connections() and time.monotonic() < deadline and not self._force.is_set():
            await asyncio.sleep(0.05)
        if self.busy_connections():
            _LOGGER.warning("Grace period over: closing %d busy connection(s)", self.busy_connections())
        tasks = list(self._connections)
        for handler in self._connections.values():
            handler.abort()  # ends the handler's read loop; its synthesis is cancelled
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=2.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2.0)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(listener.wait_closed(), 2.0)
        if self._zeroconf is not None:
            zeroconf, self._zeroconf = self._zeroconf, None
            await zeroconf.close()  # unregisters the service
        await self.service.close()
        _LOGGER.info("Server stopped")


def _stop_signals() -> list[signal.Signals]:
    """SIGINT, SIGTERM and SIGHUP (its default would kill the process, cutting open streams; voices reload by
    themselves, so there is nothing for it to reload): each stops the server gracefully. A SIGHUP that is ignored
    already (`nohup`) stays ignored."""
    handled = [signal.SIGINT, signal.SIGTERM]
    hangup = getattr(signal, "SIGHUP", None)  # not on Windows
    if hangup is not None and signal.getsignal(hangup) is not signal.SIG_IGN:
        handled.append(hangup)
    return handled


async def serve_stdio(service: Service) -> None:
    """Serve one client over standard input/output (for process-spawning clients and tests)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=service.limits.max_header_bytes + 1)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    writer = await async_get_stdout()
    # The spawning process owns this connection's lifetime: no idle timeout on a pipe.
    limits = dataclasses.replace(service.limits, idle_timeout_s=math.inf)
    handler = TtsEventHandler(reader, writer, service, finish_on_eof=True, limits=limits)
    await handler.run()
    await service.close()


async def _start_studio(config: Config, service: Service) -> Any:
    """The voice studio page on this loop when `web.enabled` (None otherwise); aiohttp is imported only then."""
    if not config.web.enabled:
        return None
    from .voice_store import voices_folder
    from .web import start_studio

    # Without the studio nothing writes voices: the API alone needs no folder provider.
    voices_dir = voices_folder(config) if config.web.studio else config.base_dir / "voices"
    return await start_studio(service, config.web, voices_dir, config_dir=config.base_dir, metrics=config.metrics)


async def start_metrics_listener(config: Config, service: Service) -> Any:
    """The /metrics-only listener when `metrics.port` is set (None otherwise)."""
    if config.metrics.port is None or not config.metrics.enabled:
        return None
    from .web.app import TOKEN_ENV
    from .web.metrics_route import MetricsListener

    listener = MetricsListener(service, config.metrics, config.web.token or os.environ.get(TOKEN_ENV), config.web)
    await listener.start()
    return listener


async def run(config: Config, plugins: Plugins) -> None:
    """Build the service and serve on `config.server.uri` (and the studio page when enabled) until stopped."""
    started = time.perf_counter()
    if config.web.enabled:
        from .web import missing_dependency

        missing = missing_dependency()  # before the engine loads: a missing extra should not cost a model load
        if missing:
            raise ConfigError(f"{config.source}:web.enabled: {missing}")
    if config.metrics.enabled and config.metrics.port is not None:
        from .metrics import missing_dependency as metrics_missing
        from .web import missing_dependency

        missing = metrics_missing() or missing_dependency()
        if missing:
            raise ConfigError(f"{config.source}:metrics.port: {missing}")
    listener = None
    if not config.server.uri.startswith("stdio://"):
        # Before the engine loads (minutes with CosyVoice): a busy port is one line now, not a traceback then.
        listener = await Listener.bind(config.server.uri, config.limits.max_header_bytes)
    try:
        service = await build_service(config, plugins)
    except BaseException:
        if listener is not None:
            listener.close()
        raise
    if listener is None:
        studio = await _start_studio(config, service)
        metrics_listener = await start_metrics_listener(config, service)
        try:
            await serve_stdio(service)
        finally:
            for site in (studio, metrics_listener):
                if site is not None:
                    await site.close()
        return
    server = Server(
        service,
        config.server.uri,
        zeroconf=config.server.zeroconf,
        zeroconf_name=config.server.zeroconf_name,
        listener=listener,
    )
    await server.start()
    server.studio = await _start_studio(config, service)
    server.metrics_listener = await start_metrics_listener(config, service)
    where = config.server.uri
    if server.port is not None:
        where = f"tcp://{urlparse(where).hostname}:{server.port}"
    _LOGGER.info(
        "Ready on %s (engines %s, started in %.2f s)", where, service.engines.summary(), time.perf_counter() - started
    )
    await server.serve_until_stopped()
