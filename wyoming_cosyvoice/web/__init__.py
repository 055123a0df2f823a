"""The voice studio: a web page to list, add, check, audition, edit and remove voices (docs/studio.md).

Served by aiohttp on the Wyoming server's own event loop when `web.enabled` (or `serve --web`). aiohttp is an
optional extra, so nothing here imports it at module level: `start_studio` imports the app on use.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from aiohttp import web

    from ..config import WebSettings
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
    service: "Service", settings: "WebSettings", voices_dir: Path, *, config_dir: Optional[Path] = None
) -> "Studio":
    """Start serving the studio page on `settings.host:settings.port` in the running event loop."""
    from . import audition, voices_api
    from .app import Studio

    def api(router: "web.UrlDispatcher") -> None:
        router.add_get("/api/status", audition.status)
        router.add_post("/api/audition", audition.audition)
        voices_api.add_routes(router)

    studio = Studio(service, settings, voices_dir, config_dir=config_dir, api=api)
    await studio.start()
    return studio
