"""Voice hot reload seen through a real `describe` on a running server; broken voices are skipped, not fatal."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable

import pytest
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeVoice

from wyoming_cosyvoice.config import Config, load_config
from wyoming_cosyvoice.engine import PcmChunk
from wyoming_cosyvoice.errors import EngineError
from wyoming_cosyvoice.hookspecs import hookimpl
from wyoming_cosyvoice.plugins import Plugins
from wyoming_cosyvoice.voices import VoiceProfile
from wyoming_cosyvoice_plugins.espeak_engine import EspeakEngine, EspeakSettings

from . import audiogen
from .helpers import TIMEOUT, Reply, collect, connect, read, running_server, write_config


class RecordingEspeak(EspeakEngine):
    """The real espeak engine, recording which voices it was asked to prepare; refuses `options.refuse` voices."""

    name = "espeak-recording"

    def __init__(self, settings: EspeakSettings) -> None:
        super().__init__(settings)
        self.prepared: list[str] = []
        self.events: list[tuple[str, str]] = []

    async def prepare(self, profiles: Iterable[VoiceProfile]) -> None:
        for profile in profiles:
            self.prepared.append(profile.name)
            if profile.options.get("refuse"):
                raise EngineError(f"cannot use reference {profile.reference_audio}")
            await asyncio.sleep(float(profile.options.get("prepare_seconds", 0)))  # a slow model's prompt work
            self.events.append(("prepared", profile.name))
        await super().prepare(profiles)

    async def synthesize(self, text: str, profile: VoiceProfile, options: Any) -> AsyncIterator[PcmChunk]:
        self.events.append(("synthesized", profile.name))
        async for chunk in super().synthesize(text, profile, options):
            yield chunk


class RecordingPlugin:
    """Registers the recording engine."""

    @staticmethod
    @hookimpl
    def register_engines(register: Callable[..., Any]) -> None:
        register("espeak-recording", lambda section: RecordingEspeak(section.parse(EspeakSettings)))


def _config(tmp_path: Path, voices: list[dict[str, Any]], default: str | None = None) -> Config:
    audiogen.write(tmp_path / "cfg" / "robot.wav", 3.0, 22050)
    return load_config(
        write_config(
            tmp_path / "cfg",
            voices=voices,
            default=default,
            server={"unknown_voice": "error"},  # these tests read why a voice is not served from its error
            engine={"name": "espeak-recording", "fallback": None},
            voice_providers={"yaml": {"path": "voices.yaml"}, "folder": {"path": "voices"}},
        )
    )


async def describe(server: Any) -> list[str]:
    """Voice names of a real `describe`."""
    async with connect(server) as client:
        await client.write_event(Describe().event())
        event = await read(client)
        assert event is not None and Info.is_type(event.type)
        return [v.name for v in Info.from_event(event).tts[0].voices]


async def until_described(server: Any, check: Callable[[list[str]], bool]) -> list[str]:
    """Describe every 50 ms until `check(names)` holds (background preparation), within TIMEOUT."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while True:
        names = await describe(server)
        if check(names):
            return names
        assert loop.time() < deadline, f"describe never satisfied the check; last: {names}"
        await asyncio.sleep(0.05)


async def speak(server: Any, voice: str | None, text: str = "Hello there, how are you?") -> Reply:
    """One `synthesize` request on its own connection."""
    async with connect(server) as client:
        await client.write_event(Synthesize(text=text, voice=SynthesizeVoice(name=voice) if voice else None).event())
        return await collect(client)


def _place_voice(root: Path, lang: str, name: str, **write: Any) -> Path:
    """Write a voice folder beside its final place, then rename it in (as `voices add` does)."""
    staging = root / lang / f".staging-{name}"
    audiogen.write(staging / "reference.wav", **write)
    target = root / lang / name
    staging.rename(target)
    return target


async def test_voice_added_changed_broken_fixed_removed_while_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(tmp_path, [{"name": "robot", "reference_audio": "robot.wav", "languages": ["en-US"]}])
    root = tmp_path / "cfg" / "voices"
    plugins = Plugins(extra=(RecordingPlugin,))
    async with running_server(config, plugins) as server:
        engine = server.service.engine
        assert await describe(server) == ["robot"]

        folder = _place_voice(root, "en_US", "alice", seconds=3.0, rate=44100)
        assert await describe(server) == ["robot", "alice"]  # the very next describe shows it
        reply = await speak(server, "alice")
        assert not reply.errors and reply.seconds > 0.5
        for _ in range(3):
            await describe(server)
        assert engine.prepared == ["robot", "alice"]  # unchanged voices are not prepared again

        # Broken: an 8 kHz recording replaces the reference (atomically, as an editor's save would).
        caplog.set_level(logging.WARNING)
        audiogen.write(tmp_path / "phone.wav", 3.0, 8000)
        os.replace(tmp_path / "phone.wav", folder / "reference.wav")
        assert await until_described(server, lambda names: "alice" not in names) == ["robot"]
        reply = await speak(server, "alice")
        (error,) = reply.errors
        assert error.code == "VoiceNotFound"
        assert (
            f"{folder}: voice 'alice': reference audio {folder.resolve() / 'reference.wav'}: sample rate 8000 Hz"
            in error.text
        )
        assert not (await speak(server, "robot")).errors  # the others keep working
        for _ in range(3):
            await describe(server)
        skipped = [r for r in caplog.records if "voice 'alice'" in r.getMessage() and "voice skipped" in r.getMessage()]
        assert len(skipped) == 1  # reported once, not on every describe

        # Fixed, then removed.
        audiogen.write(tmp_path / "good.wav", 2.5, 24000, subtype="FLOAT")
        os.replace(tmp_path / "good.wav", folder / "reference.wav")
        await until_described(server, lambda names: names == ["robot", "alice"])
        assert not (await speak(server, "alice")).errors
        assert engine.prepared == ["robot", "alice", "alice"]
        shutil.rmtree(folder)
        assert await describe(server) == ["robot"]
        assert (await speak(server, "alice")).errors[0].code == "VoiceNotFound"


async def test_yaml_edit_is_seen_by_the_next_describe(tmp_path: Path) -> None:
    config = _config(tmp_path, [{"name": "robot", "reference_audio": "robot.wav"}])
    voices = tmp_path / "cfg" / "voices.yaml"
    async with running_server(config, Plugins(extra=(RecordingPlugin,))) as server:
        assert await describe(server) == ["robot"]
        voices.write_text(
            voices.read_text()
            + "- name: anna\n  description: Anna\n  languages: [de-DE]\n  reference_audio: robot.wav\n"
        )
        stamp = voices.stat().st_mtime + 5
        os.utime(voices, (stamp, stamp))
        assert await describe(server) == ["robot", "anna"]
        reply = await speak(server, "Anna")  # by description, ignoring case
        assert not reply.errors and reply.seconds > 0.5


async def test_engine_refusal_and_broken_default_do_not_stop_the_server(tmp_path: Path) -> None:
    audiogen.write(tmp_path / "cfg" / "eight.wav", 3.0, 8000)
    config = _config(
        tmp_path,
        [
            {"name": "picky", "reference_audio": "robot.wav", "options": {"refuse": True}},
            {"name": "phone", "reference_audio": "eight.wav"},
            {"name": "robot", "reference_audio": "robot.wav"},
        ],
        default="picky",
    )
    async with running_server(config, Plugins(extra=(RecordingPlugin,))) as server:
        assert await describe(server) == ["robot"]
        problems = server.service.catalog.problems
        assert any(
            p.endswith("voice 'picky': cannot use reference " + str(tmp_path / "cfg" / "robot.wav")) for p in problems
        )
        assert any("voice 'phone': reference audio" in p and "8000 Hz" in p for p in problems)
        reply = await speak(server, None)  # the default is broken: the first usable voice speaks
        assert not reply.errors and reply.seconds > 0.5
        assert server.service.engine.prepared == ["picky", "robot"]  # phone failed validation before the engine


async def test_path_like_voice_names_are_just_unknown_names(tmp_path: Path) -> None:
    config = _config(tmp_path, [{"name": "robot", "reference_audio": "robot.wav"}])
    _place_voice(tmp_path / "cfg" / "voices", "en_US", "alice")
    async with running_server(config, Plugins(extra=(RecordingPlugin,))) as server:
        for name in ("../../etc/passwd", "/etc/passwd", "en_US/alice", "voices/en_US/alice/reference.wav"):
            reply = await speak(server, name)
            (error,) = reply.errors
            assert error.code == "VoiceNotFound" and "unknown voice" in error.text
        assert not (await speak(server, "alice")).errors


async def test_a_request_right_after_a_change_waits_for_the_preparation(tmp_path: Path) -> None:
    config = _config(tmp_path, [{"name": "robot", "reference_audio": "robot.wav"}])
    async with running_server(config, Plugins(extra=(RecordingPlugin,))) as server:
        staging = tmp_path / "cfg" / "voices" / "en_US" / ".staging"
        audiogen.write(staging / "reference.wav")
        (staging / "profile.yaml").write_text("options: {prepare_seconds: 0.5}\n")
        staging.rename(staging.parent / "slow")
        assert await describe(server) == ["robot", "slow"]
        reply = await speak(server, "slow")
        assert not reply.errors and reply.seconds > 0.5
        assert server.service.engine.events[-2:] == [("prepared", "slow"), ("synthesized", "slow")]
