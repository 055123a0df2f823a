"""A reference cache that cannot be written (not a folder, read-only, full) is said once at start-up and breaks no
voice; a voice broken by the machine is tried again and comes back once the cause is fixed."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from pathlib import Path

import pytest
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeVoice

from wyoming_cosyvoice import preparation
from wyoming_cosyvoice.config import Config, load_config
from wyoming_cosyvoice.server import Server

from . import audiogen
from .helpers import TIMEOUT, collect, connect, read, running_server, write_config


def _config(tmp_path: Path) -> Config:
    audiogen.write(tmp_path / "cfg" / "robot.wav", 3.0, 24000)
    voices = [{"name": "robot", "reference_audio": "robot.wav", "languages": ["en-US"]}]
    return load_config(write_config(tmp_path / "cfg", voices=voices))


def _blocked(tmp_path: Path, name: str) -> Path:
    """A path under a regular file: nothing can ever be created there (the errno a read-only folder gives root)."""
    blocker = tmp_path / name
    blocker.write_text("a file where a folder should be")
    return blocker


async def _voices(server: Server) -> list[str]:
    async with connect(server) as client:
        await client.write_event(Describe().event())
        event = await read(client)
    assert event is not None and Info.is_type(event.type)
    return [voice.name for voice in Info.from_event(event).tts[0].voices or []]


async def _say(server: Server) -> tuple[int, list[str]]:
    """(bytes of audio, error texts) of one request for the voice."""
    async with connect(server) as client:
        await client.write_event(Synthesize(text="Hello there.", voice=SynthesizeVoice(name="robot")).event())
        reply = await collect(client)
    return len(reply.audio), [error.text for error in reply.errors]


async def test_unwritable_cache_is_said_once_and_every_voice_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache = _blocked(tmp_path, "blocker") / "cache"
    monkeypatch.setenv("WYOMING_COSYVOICE_CACHE", str(cache))
    with caplog.at_level(logging.WARNING):
        async with running_server(_config(tmp_path)) as server:
            assert await _voices(server) == ["robot"]
            audio, errors = await _say(server)
            assert errors == [] and audio > 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"Reference cache {cache / 'references'} cannot be written (Not a directory)")


async def test_voice_broken_by_the_machine_is_tried_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = _blocked(tmp_path, "blocker")
    monkeypatch.setenv("WYOMING_COSYVOICE_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(_blocked(tmp_path, "no-temp") / "tmp"))  # no stand-in either
    monkeypatch.setattr(preparation, "RETRY_FIRST_S", 0.05)
    async with running_server(_config(tmp_path)) as server:
        assert await _voices(server) == []
        audio, errors = await _say(server)
        assert audio == 0 and len(errors) == 1
        assert "cannot be written (Not a directory)" in errors[0] and "tried again in" in errors[0]
        blocker.unlink()  # the administrator fixes the folder
        deadline = time.monotonic() + TIMEOUT
        while "robot" in server.service.catalog.broken:
            assert time.monotonic() < deadline, server.service.catalog.broken
            await asyncio.sleep(0.02)
        assert await _voices(server) == ["robot"]
        audio, errors = await _say(server)
        assert errors == [] and audio > 0
