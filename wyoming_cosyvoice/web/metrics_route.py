"""`GET /metrics` (Prometheus text format) on the studio's app, and a listener that serves it alone (`metrics.port`).

Protected like the studio: with a token (`metrics.token`, else the studio's), a scrape must carry it (`Authorization:
Bearer`, as Prometheus sends it); without one, /metrics answers only on a loopback address (and, as the studio,
only to loopback host names: no DNS rebinding).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from typing import Awaitable, Callable, Optional

from aiohttp import web

from ..config import MetricsSettings, WebSettings
from ..errors import ConfigError
from ..metrics import missing_dependency
from ..service import Service
from .app import host_name, is_loopback_host, problem
from .connections import ConnectionWarden, connection_cap

_LOGGER = logging.getLogger(__name__)

METRICS_TOKEN_ENV = "WYOMING_COSYVOICE_METRICS_TOKEN"
"""Environment variable that sets the scrape token when `metrics.token` is null."""


def scrape_token(settings: MetricsSettings, studio_token: Optional[str]) -> Optional[str]:
    """The token a scrape must carry: `metrics.token`, its environment variable, else the studio's (None: none)."""
    return settings.token or os.environ.get(METRICS_TOKEN_ENV) or studio_token or None


def _given(request: web.Request) -> str:
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("X-Studio-Token", "")


def metrics_handler(
    service: Service, token: Optional[str], loopback_only: bool
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The `/metrics` route over `service`'s recorder, with the token rule above."""

    async def metrics(request: web.Request) -> web.Response:
        if token:
            if not hmac.compare_digest(_given(request).encode("utf-8", "replace"), token.encode("utf-8")):
                response = problem(401, "/metrics needs the access token (Authorization: Bearer ...)")
                response.headers["WWW-Authenticate"] = 'Bearer realm="metrics"'
                return response
        elif not loopback_only:
            return problem(403, "/metrics off loopback needs a token: set metrics.token or web.token")
        if not service.metrics.enabled:
            return problem(503, f"metrics are off ({missing_dependency() or 'metrics.enabled: false'})")
        body, content_type = service.metrics.exposition()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type  # has a version parameter: not settable as content_type
        return response

    return metrics


class MetricsListener:
    """`metrics.port`: an HTTP listener that serves `/metrics` only (for a Prometheus container), on the loop, under
    the web port's connection cap and deadlines (`web.max_connections`, `web.*_timeout_s`: web/connections.py)."""

    def __init__(
        self,
        service: Service,
        settings: MetricsSettings,
        studio_token: Optional[str] = None,
        web_settings: Optional[WebSettings] = None,
    ) -> None:
        self.settings = settings
        self.loopback_only = is_loopback_host(settings.host)
        self.token = scrape_token(settings, studio_token)
        self._handler = metrics_handler(service, self.token, self.loopback_only)
        self._runner: Optional[web.AppRunner] = None
        self._listener: Optional[asyncio.Server] = None
        self.warden = ConnectionWarden(web_settings or WebSettings())
        self.warden.write_timeout_s = service.limits.write_timeout_s
        self._wyoming_connections = service.limits.max_connections

    @web.middleware
    async def _hosts(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if self.loopback_only and not is_loopback_host(host_name(request.host)):
            return problem(421, "/metrics answers only on localhost / 127.0.0.1 (metrics.host is a loopback address)")
        return await handler(request)

    async def start(self) -> None:
        """Bind `metrics.host:metrics.port`."""
        app = web.Application(middlewares=[self.warden.middleware, self._hosts])
        app.router.add_get("/metrics", self._handler)
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=1.0,
            keepalive_timeout=self.warden.settings.idle_timeout_s,
        )
        await self._runner.setup()
        assert self._runner.server is not None and self.settings.port is not None, "metrics.port is not set"
        self.warden.max_connections = connection_cap(self.warden.settings.max_connections, self._wyoming_connections)
        try:
            self._listener = await self.warden.serve(self._runner.server, self.settings.host, self.settings.port)
        except OSError as err:
            await self._runner.cleanup()
            self._runner = None
            raise ConfigError(
                f"metrics: cannot listen on {self.settings.host}:{self.settings.port} ({err.strerror or err})"
            ) from None
        _LOGGER.info(
            "Metrics on http://%s:%s/metrics (%s)",
            self.settings.host if ":" not in self.settings.host else f"[{self.settings.host}]",
            self.port,
            "token required" if self.token else "loopback only, no token",
        )

    @property
    def port(self) -> Optional[int]:
        """The bound port (useful with port 0)."""
        sockets = self._listener.sockets if self._listener is not None else ()
        return sockets[0].getsockname()[1] if sockets else None

    async def close(self) -> None:
        """Stop serving."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
