"""The studio's aiohttp application: the page, its API routes, and the guard every request passes.

The guard: a page bound to a loopback address answers only loopback host names (no DNS rebinding); a request that
changes anything must come from the page's own origin (no cross-site form posts) and, when `web.token` is set, carry
the token (header `X-Studio-Token`, `Authorization: Bearer`, or form field `token`; compared in constant time).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import ipaddress
import logging
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional, TypeVar
from urllib.parse import urlsplit

from aiohttp import web

from ..aio import TaskSet
from ..config import WebSettings
from ..service import Service
from .connections import ConnectionWarden, connection_cap, quiet_accept_errors
from .forms import Form, FormError, read_form

_LOGGER = logging.getLogger(__name__)

TOKEN_ENV = "WYOMING_COSYVOICE_WEB_TOKEN"
"""Environment variable that sets the access token when `web.token` is null."""

CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
"""Methods that change something (or run the engine): origin-checked and token-protected."""

TOKEN_NEEDED = "this studio needs its access token (web.token) for changes"

UPLOAD_WAIT_S = 10.0
"""How long an upload waits for one of the `web.max_uploads` slots before it is answered 503."""

SELF_CHECKED = ("/v1/",)
"""Paths whose routes check their own keys and read their own bodies (web/openai_api.py)."""

_ASSETS = {
    "studio.js": "text/javascript",
    "studio.css": "text/css",
    "icon.svg": "image/svg+xml",
}
_INGRESS_PATH = re.compile(r"(?:/[A-Za-z0-9_.-]+){0,32}/?")
"""An absolute path of plain segments: never `//host` (a network-path reference to another site)."""
_ABSOLUTE = re.compile(r"(?<![\w.])(?:~|[A-Za-z]:)?(?:[/\\][^\s/\\:'\"(),]+)*[/\\]([^\s/\\:'\"(),]+)")
_LOOPBACK_NAMES = ("localhost", "localhost.")
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'self'"
)

STUDIO_KEY: "web.AppKey[Studio]" = web.AppKey("studio", object)  # type: ignore[arg-type]
FORM_KEY: Any = web.RequestKey("form", Form) if hasattr(web, "RequestKey") else "form"
"""Where the guard leaves a changing request's parsed body."""

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def problem(status: int, message: str, **extra: Any) -> web.Response:
    """A JSON error answer: `{"error": message, ...}`."""
    return web.json_response({"error": message, **extra}, status=status)


def is_loopback_host(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """The name part of a Host header (`[::1]:8080` -> `::1`, `example:80` -> `example`)."""
    return (urlsplit(f"//{host_header}").hostname or "").lower()


class Studio:
    """The studio web app over a running Service: start, serve, close."""

    def __init__(
        self,
        service: Service,
        settings: WebSettings,
        voices_dir: Path,
        *,
        config_dir: Optional[Path] = None,
        api: Callable[[web.UrlDispatcher], None] = lambda router: None,
    ) -> None:
        self.service = service
        self.api = api
        """Adds the /api routes (the package's `start_studio` passes them: their modules import this one)."""
        self.settings = settings
        self.voices_dir = Path(voices_dir)
        """Where voices are written: the folder provider's `voice_providers.folder.path`."""
        self.config_dir = config_dir
        self.token = settings.token or os.environ.get(TOKEN_ENV) or None
        self.write_lock = asyncio.Lock()
        """One change to the voices folder at a time."""
        self.loopback_only = is_loopback_host(settings.host)
        self._changes = TaskSet()
        self.warden = ConnectionWarden(settings)
        """The web port's connection cap and deadlines (connections.py): every route is served under them."""
        self.uploads = asyncio.Semaphore(settings.max_uploads)
        """Uploads read or held at once: memory stays under `max_uploads * max_upload_bytes`."""
        self._runner: Optional[web.AppRunner] = None
        self._listener: Optional[asyncio.Server] = None
        self._undo_quiet: Optional[Callable[[], None]] = None
        static = resources.files(__package__).joinpath("static")
        self._assets = {name: static.joinpath(name).read_bytes() for name in _ASSETS}
        self._index = static.joinpath("index.html").read_text(encoding="utf-8")

    def build_app(self) -> web.Application:
        """The aiohttp application with every route."""
        app = web.Application(
            middlewares=[self.warden.middleware, self._guard], client_max_size=self.settings.max_upload_bytes + 65536
        )
        app[STUDIO_KEY] = self
        app.on_response_prepare.append(self._headers)
        if self.settings.studio:
            app.router.add_get("/", self._page)
            app.router.add_get("/static/{name}", self._asset)
        self.api(app.router)
        return app

    async def start(self) -> None:
        """Bind `host:port` and start serving on the running loop."""
        # handler_cancellation: a browser that leaves cancels its request, so an audition stops the engine at once.
        self._runner = web.AppRunner(
            self.build_app(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=2.0,
            handler_cancellation=True,
            keepalive_timeout=self.settings.idle_timeout_s,
        )
        await self._runner.setup()
        assert self._runner.server is not None
        self.warden.max_connections = connection_cap(self.settings.max_connections, self.service.limits.max_connections)
        self.warden.write_timeout_s = self.service.limits.write_timeout_s
        try:
            self._listener = await self.warden.serve(self._runner.server, self.settings.host, self.settings.port)
        except OSError as err:
            await self._runner.cleanup()
            self._runner = None
            from ..errors import ConfigError

            raise ConfigError(
                f"web: cannot listen on {self.settings.host}:{self.settings.port} ({err.strerror or err})"
            ) from None
        _LOGGER.info(
            "%s on http://%s:%s/ (%s)",
            "Voice studio" if self.settings.studio else "Web port (OpenAI-compatible API only)",
            self.settings.host if ":" not in self.settings.host else f"[{self.settings.host}]",
            self.port,
            "token required for changes" if self.token else "no token set: anyone who reaches it can change voices",
        )
        self._undo_quiet = quiet_accept_errors(asyncio.get_running_loop(), self.service.log_throttle)

        if self.settings.openai.enabled:
            _LOGGER.info("OpenAI-compatible speech API on the same port under /v1 (docs/openai-api.md)")

    @property
    def port(self) -> Optional[int]:
        """The bound port (useful with port 0)."""
        sockets = self._listener.sockets if self._listener is not None else ()
        return sockets[0].getsockname()[1] if sockets else None

    async def close(self) -> None:
        """Stop serving (open audition streams are closed, their synthesis cancelled)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._undo_quiet is not None:
            self._undo_quiet()
            self._undo_quiet = None

    async def unhurried(self, change: Awaitable[T]) -> T:
        """Run a change to the voices folder to its end even when the browser leaves (its request is cancelled)."""
        return await asyncio.shield(self._changes.add(asyncio.ensure_future(change)))

    def redact(self, text: str) -> str:
        """`text` with server paths hidden: the voices folder as `voices/`, other absolute paths as their last part."""
        if not text:
            return text
        for root in {str(self.voices_dir.resolve()), str(self.voices_dir)}:
            text = text.replace(root + os.sep, "voices/").replace(root, "voices")
        if self.config_dir is not None:
            for root in {str(self.config_dir.resolve()), str(self.config_dir)}:
                text = text.replace(root + os.sep, "").replace(root, "config")
        return _ABSOLUTE.sub(lambda m: m.group(1), text)

    # -- the guard ---------------------------------------------------------------------------------------------

    def token_ok(self, request: web.Request, form: Optional[Form]) -> bool:
        """True when no token is set, or the request carries it (header, bearer or form field)."""
        if not self.token:
            return True
        given = request.headers.get("X-Studio-Token", "")
        auth = request.headers.get("Authorization", "")
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not given and form is not None:
            given = form.get("token")
        return hmac.compare_digest(given.encode("utf-8", "replace"), self.token.encode("utf-8"))

    def _cross_site(self, request: web.Request) -> Optional[str]:
        """Why a changing request is refused as coming from another site (None: it is the page's own)."""
        if request.headers.get("Sec-Fetch-Site", "") in ("cross-site", "same-site"):
            return "cross-site request refused"
        origin = request.headers.get("Origin")
        if origin and "Sec-Fetch-Site" not in request.headers and "X-Ingress-Path" not in request.headers:
            if origin == "null" or urlsplit(origin).netloc.lower() != request.host.lower():
                return "cross-origin request refused"
        return None

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.loopback_only and not is_loopback_host(host_name(request.host)):
            return problem(421, "this page answers only on localhost / 127.0.0.1 (web.host is a loopback address)")
        if request.method in CHANGING:
            refused = self._cross_site(request)
            if refused:
                return problem(403, refused)
            if request.path.startswith(SELF_CHECKED):  # the OpenAI API checks its own keys and reads its own bodies
                return await handler(request)
            has_header = bool(request.headers.get("X-Studio-Token") or request.headers.get("Authorization"))
            if self.token and has_header and not self.token_ok(request, None):
                return problem(401, "wrong access token")
            async with contextlib.AsyncExitStack() as held:  # an upload's slot is held until it is answered
                try:
                    form = await read_form(
                        request, self.settings.max_upload_bytes, before_upload=self._admit_upload(request, held)
                    )
                except FormError as err:
                    return problem(err.status, str(err))
                if not self.token_ok(request, form):
                    return problem(401, TOKEN_NEEDED)
                request[FORM_KEY] = form
                return await self._answer(request, handler)
        return await self._answer(request, handler)

    @staticmethod
    async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as err:
            return problem(err.status, err.reason)

    def _admit_upload(self, request: web.Request, held: contextlib.AsyncExitStack) -> Callable[[Form], Awaitable[None]]:
        """What `read_form` awaits before it reads an upload: the token first (nothing larger than a small form is
        read without it), then a free upload slot (bounded memory), held until the request is answered."""

        async def admit(form: Form) -> None:
            if not self.token_ok(request, form):
                raise FormError(401, f"{TOKEN_NEEDED}: send it as X-Studio-Token, or as a form field before the audio")
            try:
                await asyncio.wait_for(self.uploads.acquire(), UPLOAD_WAIT_S)
            except asyncio.TimeoutError:
                raise FormError(
                    503, f"{self.settings.max_uploads} uploads are being received (web.max_uploads); try again"
                ) from None
            held.callback(self.uploads.release)

        return admit

    @staticmethod
    async def _headers(request: web.Request, response: web.StreamResponse) -> None:
        """Every answer: no scripts or frames from elsewhere, no sniffing, no caching, no referrer."""
        response.headers.setdefault("Content-Security-Policy", _CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Cache-Control", "no-store")

    # -- the page ----------------------------------------------------------------------------------------------

    def base_href(self, request: web.Request) -> str:
        """Where the page's relative URLs start: Home Assistant's ingress path when proxied, else `./`."""
        ingress = request.headers.get("X-Ingress-Path", "")
        if not ingress or len(ingress) > 200 or not _INGRESS_PATH.fullmatch(ingress):
            return "./"
        if any(part in (".", "..") for part in ingress.split("/")):
            return "./"
        return ingress.rstrip("/") + "/"

    async def _page(self, request: web.Request) -> web.Response:
        page = self._index.replace("{{BASE}}", html.escape(self.base_href(request), quote=True))
        return web.Response(text=page, content_type="text/html", charset="utf-8")

    async def _asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _ASSETS:
            return problem(404, "not found")
        return web.Response(body=self._assets[name], content_type=_ASSETS[name])
