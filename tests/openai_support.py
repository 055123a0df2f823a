"""Test support for the OpenAI-compatible API: a real server with its web port on 127.0.0.1:0, and the real client."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import openai

from wyoming_cosyvoice.config import Config, OpenAISettings, load_config
from wyoming_cosyvoice.plugins import Plugins
from wyoming_cosyvoice.server import Server
from wyoming_cosyvoice.voice_store import voices_folder
from wyoming_cosyvoice.web import start_studio
from wyoming_cosyvoice.web.app import Studio

from . import fault_engine
from .helpers import running_server, write_config
from .studio_support import GateEngine, GatePlugin


@dataclass
class ApiServer:
    """A running Wyoming server and its web port."""

    server: Server
    web: Studio
    config: Config

    @property
    def base_url(self) -> str:
        """The API's base URL, as clients are configured with it."""
        return f"http://127.0.0.1:{self.web.port}/v1"

    def client(self, api_key: str = "sk-anything") -> openai.AsyncOpenAI:
        """The real OpenAI client, pointed here (no retries: a refusal must show as it is)."""
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=20.0)

    @property
    def gate(self) -> GateEngine:
        """The gate engine (servers started with engine='gate')."""
        engine = self.server.service.engines.running["gate"]
        assert isinstance(engine, GateEngine)
        return engine


@contextlib.asynccontextmanager
async def api_server(
    directory: Path,
    *,
    engine: str = "espeak",
    server: Optional[dict[str, Any]] = None,
    openai_settings: Optional[OpenAISettings] = None,
    sections: Optional[dict[str, Any]] = None,
    **web_settings: Any,
) -> AsyncIterator[ApiServer]:
    """The project's own Server on port 0 with its web port on 127.0.0.1:0 (same loop)."""
    path = write_config(
        directory,
        server={"max_concurrent": 8, **(server or {})},
        **{
            "engine": {"name": engine, "fallback": None},
            "voice_providers": {"yaml": {"path": "voices.yaml"}, "folder": {"path": "voices"}},
            **(sections or {}),
        },
    )
    config = load_config(path)
    web = dataclasses.replace(
        config.web, enabled=True, port=0, openai=openai_settings or OpenAISettings(), **web_settings
    )
    async with running_server(config, Plugins(extra=(GatePlugin, fault_engine))) as running:
        studio = await start_studio(running.service, web, voices_folder(config), config_dir=config.base_dir)
        try:
            yield ApiServer(running, studio, config)
        finally:
            await studio.close()
