"""The voice studio: a web page to list, add, check, audition, edit and remove voices (docs/studio.md).

Served by aiohttp on the Wyoming server's own event loop when `web.enabled` (or `serve --web`). aiohttp is an
optional extra, so nothing here imports it at module level: `start_studio` imports the app on use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from aiohttp import web

    from ..config import MetricsSettings, WebSettings
    from ..service import Service
    from .app import Studio


def missing_dependency() -> Optional[str]:
    """One line saying what to install when the studio cannot run here (None: it can)."""
    from ..extras import install_hint

    try:
        import aiohttp  # noqa: F401  (only called when the studio is enabled)
    except ImportError:
        return f"the voice studio (web.enabled / serve --web) needs aiohttp: {install_hint('web')}"
    return None


async def start_studio(
    service: "Service",
    settings: "WebSettings",
    voices_dir: Path,
    *,
    config_dir: Optional[Path] = None,
    metrics: Optional["MetricsSettings"] = None,
) -> "Studio":
    """Start serving the studio page (and the OpenAI API, /metrics) on `settings.host:settings.port` in the running
    event loop."""
    from ..config import MetricsSettings
    from . import audition, engine_api, metrics_route, openai_api, voices_api
    from .app import Studio, is_loopback_host

    metrics = metrics or MetricsSettings()

    def api(router: "web.UrlDispatcher") -> None:
        if settings.studio:
            router.add_get("/api/status", audition.status)
            router.add_post("/api/audition", audition.audition)
            voices_api.add_routes(router)
            engine_api.add_routes(router)
        if settings.openai.enabled:
            openai_api.add_routes(router)
        token = metrics_route.scrape_token(metrics, studio.token)  # metrics off: it answers 503 with the reason
        router.add_get("/metrics", metrics_route.metrics_handler(service, token, is_loopback_host(settings.host)))

    studio = Studio(service, settings, voices_dir, config_dir=config_dir, api=api)
    await studio.start()
    return studio
