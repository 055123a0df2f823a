"""Test support for the voice studio: a real server with the page on port 0, a gated engine, an ingress proxy."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Optional

from aiohttp import ClientSession, web

from wyoming_cosyvoice.config import Config, Section, load_config
from wyoming_cosyvoice.engine import SynthesisOptions, ThreadedEngine
from wyoming_cosyvoice.hookspecs import hookimpl
from wyoming_cosyvoice.plugins import Plugins
from wyoming_cosyvoice.server import Server
from wyoming_cosyvoice.voice_store import voices_folder
from wyoming_cosyvoice.voices import VoiceProfile
from wyoming_cosyvoice.web import start_studio
from wyoming_cosyvoice.web.app import Studio

from .helpers import running_server, write_config


def artifacts_dir() -> Path:
    """Where the studio tests keep screenshots: $WYOMING_COSYVOICE_ARTIFACTS/studio, else
    <tmp>/wyoming-cosyvoice-artifacts/studio."""
    root = os.environ.get("WYOMING_COSYVOICE_ARTIFACTS") or str(
        Path(tempfile.gettempdir()) / "wyoming-cosyvoice-artifacts"
    )
    path = Path(root) / "studio"
    path.mkdir(parents=True, exist_ok=True)
    return path


class GateEngine(ThreadedEngine):
    """Makes one chunk, then waits for `gate` before the rest: proves audio is sent before synthesis ends."""

    name = "gate"
    sample_rate = 16000

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.outcomes: list[str] = []

    def generate(
        self, text: str, profile: VoiceProfile, options: SynthesisOptions, cancel: threading.Event
    ) -> Iterator[bytes]:
        """A first chunk at once; the others only after `gate` is set (or `cancelled` when the client left)."""
        outcome = "cancelled"
        try:
            yield b"\x00\x10" * 1600
            while not self.gate.wait(0.02):
                if cancel.is_set():
                    return
            for _ in range(3):
                yield b"\x00\x20" * 1600
            outcome = "done"
        finally:
            self.outcomes.append(outcome)


class GatePlugin:
    """Registers the `gate` engine."""

    @staticmethod
    @hookimpl
    def register_engines(register: Callable[[str, Callable[[Section], Any]], None]) -> None:
        """Register the `gate` engine."""
        register("gate", lambda section: GateEngine())


@dataclass
class StudioServer:
    """A running Wyoming server and its studio page."""

    server: Server
    studio: Studio
    config: Config
    voices: Path

    @property
    def url(self) -> str:
        """Base URL of the page."""
        return f"http://127.0.0.1:{self.studio.port}/"

    def files(self) -> list[str]:
        """Everything under the voices folder (hidden entries included), relative."""
        if not self.voices.exists():
            return []
        return sorted(str(p.relative_to(self.voices)) for p in self.voices.rglob("*"))


@contextlib.asynccontextmanager
async def studio_server(
    directory: Path, *, engine: str = "espeak", max_concurrent: int = 4, **web_settings: Any
) -> AsyncIterator[StudioServer]:
    """The project's own Server on port 0 with the studio on 127.0.0.1:0 (same loop), voices in `directory/voices`."""
    path = write_config(
        directory,
        server={"max_concurrent": max_concurrent},
        voice_providers={"yaml": {"path": "voices.yaml"}, "folder": {"path": "voices"}},
        engine={"name": engine, "fallback": None},
    )
    config = load_config(path)
    web = dataclasses.replace(config.web, enabled=True, port=0, **web_settings)
    plugins = Plugins(extra=(GatePlugin,))
    async with running_server(config, plugins) as server:
        studio = await start_studio(server.service, web, voices_folder(config), config_dir=config.base_dir)
        try:
            yield StudioServer(server, studio, config, voices_folder(config))
        finally:
            await studio.close()


@contextlib.asynccontextmanager
async def ingress_proxy(target: str, prefix: str = "/api/hassio_ingress/t0k3n") -> AsyncIterator[str]:
    """A stand-in for Home Assistant's ingress: serves `target` under `prefix`, strips it, adds X-Ingress-Path."""
    session = ClientSession(auto_decompress=False)

    async def forward(request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        headers["X-Ingress-Path"] = prefix
        body = await request.read()
        async with session.request(
            request.method, target.rstrip("/") + "/" + tail, headers=headers, data=body or None, params=request.query
        ) as upstream:
            response = web.StreamResponse(status=upstream.status)
            for key, value in upstream.headers.items():
                if key.lower() not in ("content-length", "transfer-encoding", "date", "server"):
                    response.headers[key] = value
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.router.add_route("*", prefix + "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}{prefix}"
    finally:
        await runner.cleanup()
        await session.close()


async def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll `condition` (sync or async) until it returns something truthy; fail after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def gate_engine(server: StudioServer) -> Optional[GateEngine]:
    """The running gate engine, if the server runs one."""
    engine = server.server.service.engines.running.get("gate")
    return engine if isinstance(engine, GateEngine) else None
