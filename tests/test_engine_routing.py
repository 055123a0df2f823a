"""A voice profile's `engine` field through a real server: engines at different rates, failures, fallback, reload."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import pytest
import yaml
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

from wyoming_cosyvoice.config import Config, load_config
from wyoming_cosyvoice.errors import EngineUnavailable
from wyoming_cosyvoice.hookspecs import hookimpl
from wyoming_cosyvoice.plugins import Plugins
from wyoming_cosyvoice.voices import VoiceProfile
from wyoming_cosyvoice_plugins import example_tone
from wyoming_cosyvoice_plugins.espeak_engine import EspeakEngine, EspeakSettings
from wyoming_cosyvoice_plugins.example_tone import ToneEngine, ToneSettings

from . import fault_engine
from .helpers import TIMEOUT, Reply, collect, connect, read, running_server, write_config

EVENTS: list[tuple[str, str, str]] = []
"""(engine, action, voice) in the order the recording engines saw them: prepare or forget."""


class RecordingTone(ToneEngine):
    """The tone engine, recording what it is asked to prepare and forget."""

    name = "tone-rec"

    async def prepare(self, profiles: Iterable[VoiceProfile]) -> None:
        EVENTS.extend((self.name, "prepare", p.name) for p in profiles)

    async def forget(self, profile_names: Iterable[str]) -> None:
        EVENTS.extend((self.name, "forget", n) for n in profile_names)


class RecordingEspeak(EspeakEngine):
    """The real espeak engine, recording what it is asked to prepare and forget."""

    name = "espeak-rec"

    async def prepare(self, profiles: Iterable[VoiceProfile]) -> None:
        profiles = list(profiles)
        EVENTS.extend((self.name, "prepare", p.name) for p in profiles)
        await super().prepare(profiles)

    async def forget(self, profile_names: Iterable[str]) -> None:
        EVENTS.extend((self.name, "forget", n) for n in profile_names)


class Unstartable(ToneEngine):
    """An engine whose start fails the way a missing model does."""

    name = "unstartable"
    closed = 0

    async def start(self) -> None:
        raise EngineUnavailable("unstartable engine: no device here")

    async def close(self) -> None:
        Unstartable.closed += 1
        await super().close()


class TestEngines:
    """Registers the recording and failing engines."""

    @staticmethod
    @hookimpl
    def register_engines(register: Callable[..., Any]) -> None:
        register("tone-rec", lambda section: RecordingTone(section.parse(ToneSettings)))
        register("espeak-rec", lambda section: RecordingEspeak(section.parse(EspeakSettings)))
        register("unstartable", lambda section: Unstartable(section.parse(ToneSettings)))


def plugins() -> Plugins:
    return Plugins(extra=(example_tone, fault_engine, TestEngines))


@pytest.fixture(autouse=True)
def _events() -> Any:
    EVENTS.clear()
    yield
    EVENTS.clear()


def _config(
    tmp_path: Path, voices: list[dict[str, Any]], main: str = "espeak", fallback: Optional[str] = None, **engines: Any
) -> Config:
    return load_config(
        write_config(
            tmp_path / "cfg",
            # These tests read why a voice is unavailable from its error (the default speaks it otherwise).
            server={"unknown_voice": "error"},
            voices=voices,
            engine={"name": main, "fallback": fallback},
            engines={
                "tone": {"sample_rate": 24000},
                "tone-rec": {"sample_rate": 48000},
                "fault": {"sample_rate": 16000},
                **engines,
            },
        )
    )


async def describe(server: Any) -> Info:
    async with connect(server) as client:
        await client.write_event(Describe().event())
        event = await read(client)
        assert event is not None and Info.is_type(event.type)
        return Info.from_event(event)


async def names(server: Any) -> list[str]:
    return [v.name for v in (await describe(server)).tts[0].voices]


async def speak(server: Any, voice: str, text: str = "One two three four.") -> Reply:
    async with connect(server) as client:
        await client.write_event(Synthesize(text=text, voice=SynthesizeVoice(name=voice)).event())
        return await collect(client)


async def until(check: Callable[[], bool]) -> None:
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.02)


def _write_voices(tmp_path: Path, voices: list[dict[str, Any]]) -> None:
    path = tmp_path / "cfg" / "voices.yaml"
    stamp = path.stat().st_mtime + 5  # a new mtime even on a coarse-clock file system
    path.write_text(yaml.safe_dump({"voices": voices}, sort_keys=False))
    os.utime(path, (stamp, stamp))


async def test_each_voice_is_served_by_its_engine_at_its_rate(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        [
            {"name": "robot", "languages": ["en-US"]},
            {"name": "beep", "engine": "tone"},
            {"name": "buzz", "engine": "fault"},
        ],
    )
    async with running_server(config, plugins()) as server:
        engines = server.service.engines
        assert list(engines.running) == ["espeak", "fault", "tone"] and engines.failed == {}
        info = await describe(server)
        assert [v.name for v in info.tts[0].voices] == ["robot", "beep", "buzz"]
        description = info.tts[0].description
        assert "(engine: espeak; " in description
        assert "also engine fault (16000 Hz)" in description and "also engine tone (24000 Hz)" in description

        robot, beep, buzz = await speak(server, "robot"), await speak(server, "beep"), await speak(server, "buzz")
        assert not (robot.errors or beep.errors or buzz.errors)
        assert (robot.rate, beep.rate, buzz.rate) == (22050, 24000, 16000)
        # Every chunk carries its engine's format too, and the audio is what that engine makes.
        assert {e.data["rate"] for e in beep.events if e.type == "audio-chunk"} == {24000}
        assert beep.seconds == pytest.approx(4 * 0.3)  # the tone engine: 300 ms per word
        assert buzz.seconds == pytest.approx(4 * 2 * 640 / 2 / 16000)  # fault: 2 chunks of 640 bytes per word

        # A stream uses one profile, so one audio-start in that profile's engine's format.
        async with connect(server) as client:
            await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="beep")).event())
            for piece in ("Beep beep. ", "Beep beep beep."):
                await client.write_event(SynthesizeChunk(text=piece).event())
            await client.write_event(SynthesizeStop().event())
            reply = await collect(client, until="synthesize-stopped")
        assert not reply.errors and [s.rate for s in reply.starts] == [24000]
        assert reply.seconds == pytest.approx(5 * 0.3)
    # Shutdown closed every engine (a ThreadedEngine drops its worker thread when closed).
    assert all(not engine._workers for engine in engines.running.values())  # type: ignore[attr-defined]


async def test_an_engine_that_cannot_start_breaks_only_its_voices(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(
        tmp_path,
        [
            {"name": "robot"},
            {"name": "beep", "engine": "tone-rec"},
            {"name": "dead", "engine": "unstartable"},
            {"name": "dead2", "engine": "unstartable"},
            {"name": "ghost", "engine": "nosuch"},
        ],
        main="espeak-rec",
    )
    voices_file = tmp_path / "cfg" / "voices.yaml"
    Unstartable.closed = 0
    with caplog.at_level(logging.WARNING):
        async with running_server(config, plugins()) as server:
            assert await names(server) == ["robot", "beep"]
            # Each profile was prepared by its own engine, and only by it.
            assert sorted(EVENTS) == [("espeak-rec", "prepare", "robot"), ("tone-rec", "prepare", "beep")]
            assert (await speak(server, "beep")).rate == 48000
            assert (await speak(server, "robot")).rate == 22050

            (error,) = (await speak(server, "dead")).errors
            assert error.code == "VoiceNotFound"
            assert error.text == (
                f"{voices_file}: voice 'dead': needs engine unstartable, which could not start here: "
                "unstartable engine: no device here (voice unavailable)"
            )
            (error,) = (await speak(server, "ghost")).errors
            assert error.code == "VoiceNotFound"
            assert "voice 'ghost': needs engine nosuch, which could not start here: " in error.text
            assert "no engine named 'nosuch' (registered: " in error.text
            problems = server.service.catalog.problems
            assert sum("could not start here" in p for p in problems) == 3
            for _ in range(3):
                await describe(server)
    assert Unstartable.closed == 1  # the failed engine was closed, not left half started
    started = [r.getMessage() for r in caplog.records if "could not start (" in r.getMessage()]
    assert len(started) == 2  # once per engine, not per voice or describe
    assert started[0].startswith("Engine 'nosuch' could not start (no engine named 'nosuch' (registered: ")
    assert started[1] == (
        "Engine 'unstartable' could not start (unstartable engine: no device here); the voices "
        "that name it are unavailable"
    )
    skipped = [r.getMessage() for r in caplog.records if "(voice skipped)" in r.getMessage()]
    assert len(skipped) == 3  # dead, dead2, ghost: once each, not on every describe


async def test_a_voice_needing_the_engine_that_fell_back_is_broken_not_served_by_the_fallback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    config = _config(
        tmp_path,
        [
            {"name": "robot"},
            {"name": "clone", "engine": "cosyvoice"},
            {"name": "plain", "engine": "espeak"},
        ],
        main="cosyvoice",
        fallback="espeak",
        cosyvoice={"model_dir": str(tmp_path / "no-model")},
    )
    async with running_server(config, plugins()) as server:
        assert list(server.service.engines.running) == ["espeak"]  # the fallback serves; no second espeak
        info = await describe(server)
        assert [v.name for v in info.tts[0].voices] == ["robot", "plain"]
        assert "[fallback from cosyvoice: cosyvoice engine: " in info.tts[0].description
        (error,) = (await speak(server, "clone")).errors
        assert error.code == "VoiceNotFound"
        assert "voice 'clone': needs engine cosyvoice, which could not start here: cosyvoice engine: " in error.text
        assert (await speak(server, "robot")).rate == 22050
        assert (await speak(server, "plain")).rate == 22050
    # Said once, by the fallback warning; cosyvoice was not tried a second time for the voice that names it.
    said = [r.getMessage() for r in caplog.records if r.name == "wyoming_cosyvoice.routing"]
    assert len(said) == 1 and said[0].startswith("Engine 'cosyvoice' unavailable (cosyvoice engine: ")


async def test_an_engine_never_set_up_falls_back_with_an_info_line_not_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A fresh install: cosyvoice has neither repo nor model_dir, so espeak serving is expected, not a problem."""
    caplog.set_level(logging.INFO)
    config = _config(tmp_path, [{"name": "robot"}], main="cosyvoice", fallback="espeak")
    async with running_server(config, plugins()) as server:
        assert list(server.service.engines.running) == ["espeak"]
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "wyoming_cosyvoice.routing"]
    assert len(said) == 1 and said[0][0] == "INFO"
    assert said[0][1].startswith("Engine 'cosyvoice' unavailable (cosyvoice engine: engines.cosyvoice.repo is not set")
    assert "To enable CosyVoice, set engines.cosyvoice.repo and engines.cosyvoice.model_dir" in said[0][1]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_hot_reload_routes_new_voices_and_never_starts_an_engine(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    voices = [{"name": "robot"}, {"name": "beep", "engine": "tone-rec"}]
    config = _config(tmp_path, voices, main="espeak-rec")
    async with running_server(config, plugins()) as server:
        assert await names(server) == ["robot", "beep"]
        caplog.set_level(logging.WARNING)
        _write_voices(tmp_path, [*voices, {"name": "beep2", "engine": "tone-rec"}, {"name": "late", "engine": "fault"}])
        # The very next describe: the new voice on a running engine is listed, the other is left out at once.
        assert await names(server) == ["robot", "beep", "beep2"]
        assert (await speak(server, "beep2")).rate == 48000
        (error,) = (await speak(server, "late")).errors
        assert error.code == "VoiceNotFound"
        assert error.text.endswith(
            "voice 'late': engine fault is not running (restart the server to start it) (voice unavailable)"
        )
        assert list(server.service.engines.running) == ["espeak-rec", "tone-rec"]  # nothing started at runtime
        await describe(server)
        assert sum("voice 'late'" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records) == 1


async def test_removed_and_changed_voices_are_forgotten_by_the_engine_that_prepared_them(tmp_path: Path) -> None:
    voices = [{"name": "robot"}, {"name": "beep", "engine": "tone-rec"}, {"name": "moved"}]
    config = _config(tmp_path, voices, main="espeak-rec")
    async with running_server(config, plugins()) as server:
        preparer = server.service.preparer
        assert await names(server) == ["robot", "beep", "moved"]
        EVENTS.clear()

        # beep changes (forgotten, then prepared again), moved switches engine, robot goes away.
        _write_voices(
            tmp_path, [{"name": "beep", "engine": "tone-rec", "speed": 1.5}, {"name": "moved", "engine": "tone-rec"}]
        )
        assert await names(server) == ["beep", "moved"]
        await preparer.wait_idle()
        assert ("espeak-rec", "forget", "robot") in EVENTS
        beep = [e for e in EVENTS if e[2] == "beep"]
        assert beep == [("tone-rec", "forget", "beep"), ("tone-rec", "prepare", "beep")]
        moved = [e for e in EVENTS if e[2] == "moved"]
        assert moved == [("espeak-rec", "forget", "moved"), ("tone-rec", "prepare", "moved")]
        assert len(EVENTS) == 5
        assert (await speak(server, "moved")).rate == 48000

        EVENTS.clear()
        for _ in range(3):
            await describe(server)  # unchanged: nothing forgotten or prepared
        await preparer.wait_idle()
        assert EVENTS == []
