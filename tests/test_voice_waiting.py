"""A request waiting for a voice being prepared follows the voice: changed meanwhile, it is spoken in the new
version once that is prepared; removed meanwhile, it gets VoiceNotFound at once (not silence, then ClientTimeout)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable

import pytest
from wyoming.info import Describe
from wyoming.tts import Synthesize, SynthesizeVoice

from wyoming_cosyvoice.config import Config, load_config
from wyoming_cosyvoice.engine import PcmChunk
from wyoming_cosyvoice.hookspecs import hookimpl
from wyoming_cosyvoice.plugins import Plugins
from wyoming_cosyvoice.server import Server
from wyoming_cosyvoice.voices import VoiceProfile
from wyoming_cosyvoice_plugins.espeak_engine import EspeakEngine, EspeakSettings

from . import audiogen
from .helpers import TIMEOUT, Reply, collect, connect, read, running_server, write_config

REPLY_WITHIN = 5.0
"""The reply must come this soon after the preparation it waited for ends (before the fix: nothing for 60 s)."""


class GatedEspeak(EspeakEngine):
    """The real espeak engine, whose preparation of an `options.gated` voice waits for `gate`."""

    name = "espeak-gated"

    def __init__(self, settings: EspeakSettings) -> None:
        super().__init__(settings)
        self.gate = asyncio.Event()
        self.spoken: list[str] = []
        """The description of each voice version synthesized."""

    async def prepare(self, profiles: Iterable[VoiceProfile]) -> None:
        profiles = list(profiles)
        if any(p.options.get("gated") for p in profiles):
            await self.gate.wait()
        await super().prepare(profiles)

    async def synthesize(self, text: str, profile: VoiceProfile, options: Any) -> AsyncIterator[PcmChunk]:
        self.spoken.append(profile.description)
        async for chunk in super().synthesize(text, profile, options):
            yield chunk


class GatedPlugin:
    """Registers the gated engine."""

    @staticmethod
    @hookimpl
    def register_engines(register: Callable[..., Any]) -> None:
        register("espeak-gated", lambda section: GatedEspeak(section.parse(EspeakSettings)))


def _config(tmp_path: Path) -> Config:
    audiogen.write(tmp_path / "cfg" / "robot.wav", 3.0, 22050)
    return load_config(
        write_config(
            tmp_path / "cfg",
            voices=[{"name": "robot", "reference_audio": "robot.wav"}],
            engine={"name": "espeak-gated", "fallback": None},
            voice_providers={"yaml": {"path": "voices.yaml"}, "folder": {"path": "voices"}},
        )
    )


async def _describe(server: Server) -> None:
    """A describe: the server rescans the voices (what makes it see a change)."""
    async with connect(server) as client:
        await client.write_event(Describe().event())
        assert await read(client) is not None


async def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def _waiting_request(tmp_path: Path, server: Server) -> tuple[Path, "asyncio.Task[Reply]"]:
    """Add the gated voice `slow` and start a request for it; returns once the request waits for its preparation."""
    folder = tmp_path / "cfg" / "voices" / "en_US" / "slow"
    staging = folder.parent / ".staging"
    audiogen.write(staging / "reference.wav")
    (staging / "profile.yaml").write_text("description: Slow one\noptions: {gated: true}\n")
    staging.rename(folder)
    await _describe(server)
    assert server.service.preparer.preparing() == {"slow"}

    async def request() -> Reply:
        async with connect(server) as client:
            await client.write_event(Synthesize(text="Hello there.", voice=SynthesizeVoice(name="slow")).event())
            return await collect(client, timeout=TIMEOUT)

    task = asyncio.create_task(request())
    await _until(lambda: server.service.concurrency_limit.active == 1)  # admitted: waiting in `ready`
    return folder, task


async def test_request_follows_a_voice_changed_while_it_waits(tmp_path: Path) -> None:
    async with running_server(_config(tmp_path), Plugins(extra=(GatedPlugin,))) as server:
        engine = server.service.engine
        assert isinstance(engine, GatedEspeak)
        folder, task = await _waiting_request(tmp_path, server)
        (folder / "profile.yaml").write_text("description: Slow two\noptions: {gated: true}\n")
        await _describe(server)  # the studio's edit does the same: the first preparation is cancelled
        await asyncio.sleep(0)
        assert not task.done()  # still waiting: now for the new version
        engine.gate.set()
        reply = await asyncio.wait_for(task, REPLY_WITHIN)
        assert not reply.errors and reply.seconds > 0.3
        assert engine.spoken == ["Slow two"]


async def test_request_for_a_voice_removed_while_it_waits_gets_voice_not_found(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_server(_config(tmp_path), Plugins(extra=(GatedPlugin,))) as server:
        folder, task = await _waiting_request(tmp_path, server)
        with caplog.at_level(logging.INFO):
            shutil.rmtree(folder)
            await _describe(server)
            reply = await asyncio.wait_for(task, REPLY_WITHIN)
        assert [(e.code, e.text) for e in reply.errors] == [
            ("VoiceNotFound", "voice 'slow' was removed while the request waited for it")
        ]
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request ")]
        assert len(lines) == 1 and "voice=slow" in lines[0] and lines[0].endswith("end=VoiceNotFound")
