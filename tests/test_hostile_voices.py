"""Hostile and half-written voice folders against a live server: options that name files, preparation that never
ends, YAML alias bombs, huge and growing reference files. The other voices must keep working throughout."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest
from wyoming.info import Describe, Info
from wyoming.ping import Ping
from wyoming.tts import Synthesize, SynthesizeVoice

from wyoming_cosyvoice.config import Config, load_config
from wyoming_cosyvoice.hookspecs import hookimpl
from wyoming_cosyvoice.plugins import Plugins
from wyoming_cosyvoice.voices import VoiceProfile

from . import audiogen
from .fault_engine import FaultEngine, FaultSettings
from .helpers import TIMEOUT, Reply, collect, connect, read, running_server, write_config


def _config(tmp_path: Path, engine: str = "espeak", **limits: Any) -> Config:
    """A server with one YAML voice (`robot`, the default) and a voices folder at cfg/voices."""
    audiogen.write(tmp_path / "cfg" / "robot.wav", 3.0, 22050)
    return load_config(
        write_config(
            tmp_path / "cfg",
            voices=[{"name": "robot", "reference_audio": "robot.wav", "languages": ["en-US"]}],
            server={"unknown_voice": "error"},  # these tests read why a voice is refused from its error
            engine={"name": engine, "fallback": None},
            voice_providers={"yaml": {"path": "voices.yaml"}, "folder": {"path": "voices"}},
            limits=limits,
        )
    )


def _voice_folder(root: Path, name: str, profile_yaml: str | None = None, lang: str = "en_US") -> Path:
    """A voice folder, staged in a hidden folder and renamed into place (as `voices add` does)."""
    staging = root / lang / f".staging-{name}"
    audiogen.write(staging / "reference.wav", 2.0, 16000)
    if profile_yaml is not None:
        (staging / "profile.yaml").write_text(profile_yaml)
    staging.rename(root / lang / name)
    return root / lang / name


async def describe(server: Any) -> list[str]:
    """Voice names of a real `describe`."""
    async with connect(server) as client:
        await client.write_event(Describe().event())
        event = await read(client)
        assert event is not None and Info.is_type(event.type)
        return [v.name for v in Info.from_event(event).tts[0].voices]


async def speak(server: Any, voice: str | None, text: str = "Hello there.") -> Reply:
    """One `synthesize` request on its own connection."""
    async with connect(server) as client:
        await client.write_event(Synthesize(text=text, voice=SynthesizeVoice(name=voice) if voice else None).event())
        return await collect(client)


async def poll(condition: Callable[[], Any], timeout: float = TIMEOUT) -> None:
    """Wait until `condition()` holds (fails after a generous `timeout`)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------------------------- options


async def test_profile_options_never_become_file_paths(tmp_path: Path) -> None:
    """`options.espeak_voice` that is a path (the espeak library opened /dev/zero and hung) is refused."""
    root = tmp_path / "cfg" / "voices"
    async with running_server(_config(tmp_path)) as server:
        _voice_folder(root, "zero", "options:\n  espeak_voice: " + "../" * 10 + "dev/zero\n")
        _voice_folder(root, "passwd", "options: {espeak_voice: ../../etc/passwd}\n")
        _voice_folder(root, "nested", "options: {espeak_voice: {file: /etc/passwd}}\n")
        _voice_folder(root, "fine", "options: {espeak_voice: en-us+f3}\n")
        await describe(server)
        await asyncio.wait_for(server.service.preparer.wait_idle(), TIMEOUT)
        assert await describe(server) == ["robot", "fine"]
        problems = "\n".join(server.service.catalog.problems)
        for name in ("zero", "passwd", "nested"):
            assert f"voice '{name}': profile.yaml:options.espeak_voice:" in problems, problems
        reply = await speak(server, "zero")
        assert [e.code for e in reply.errors] == ["VoiceNotFound"]
        for voice in ("robot", "fine"):
            reply = await speak(server, voice)
            assert not reply.errors and reply.seconds > 0.3


def test_espeak_voice_names_are_identifiers() -> None:
    """The espeak engine itself refuses voice names that could name a file, wherever the profile came from."""
    from wyoming_cosyvoice.errors import VoiceError
    from wyoming_cosyvoice_plugins.espeak_engine import espeak_voice_for

    assert espeak_voice_for(VoiceProfile(name="a", options={"espeak_voice": "en-us+f3"})) == "en-us+f3"
    assert espeak_voice_for(VoiceProfile(name="a", languages=("de-DE",))) == "de-de"
    for bad in ("../../etc/passwd", "/dev/zero", "en/../../x", "..", "a" * 80, "en us", 5):
        with pytest.raises(VoiceError, match="espeak_voice"):
            espeak_voice_for(VoiceProfile(name="a", options={"espeak_voice": bad}))


class StuckPrepareEngine(FaultEngine):
    """The fault engine whose voice preparation wedges (on its worker thread) for voices described "STUCK"."""

    name = "stuck"

    def __init__(self, settings: FaultSettings) -> None:
        super().__init__(settings)
        self.prepared: list[str] = []
        """Voices prepared, in order."""

    async def prepare(self, profiles: Iterable[VoiceProfile]) -> None:
        for profile in profiles:
            self.prepared.append(profile.name)
            await self.run_in_worker(self._prepare_one, profile)

    def _prepare_one(self, profile: VoiceProfile) -> None:
        if "STUCK" in profile.description:
            self.release.wait(60)


class StuckPlugin:
    """Registers the `stuck` engine."""

    @staticmethod
    @hookimpl
    def register_engines(register: Callable[..., Any]) -> None:
        register("stuck", lambda section: StuckPrepareEngine(section.parse(FaultSettings)))


async def test_voice_preparation_that_never_ends_times_out(tmp_path: Path) -> None:
    """A preparation stuck on the worker thread marks its voice broken after engine_timeout_s; the worker is
    replaced, so the other voices are served."""
    root = tmp_path / "cfg" / "voices"
    config = _config(tmp_path, engine="stuck", engine_timeout_s=1.0)
    async with running_server(config, Plugins(extra=(StuckPlugin,))) as server:
        engine = server.service.engine
        try:
            _voice_folder(root, "wedge", "description: STUCK in preparation\n")
            assert await describe(server) == ["robot", "wedge"]  # listed while it is prepared
            reply = await speak(server, "robot")  # queued behind the stuck preparation
            assert not reply.errors and len(reply.audio) == 2 * 2 * 640
            await poll(lambda: "wedge" in server.service.catalog.broken)
            assert "did not finish within 1 s" in server.service.catalog.broken["wedge"]
            assert engine.restarts == 1
            assert await describe(server) == ["robot"]
        finally:
            engine.release.set()


# ---------------------------------------------------------------------------------------------- YAML


def alias_bomb(levels: int) -> str:
    """A flow mapping of a few hundred bytes that expands to 10**levels values through anchors and aliases."""
    parts = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        parts.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    return "{" + ", ".join(parts) + "}"


async def test_yaml_alias_bombs_are_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Anchors and aliases are refused in the user-editable YAML files (an alias bomb in voices.yaml `options` made
    every describe build its repr on the event loop: seconds per describe, hundreds of MB)."""
    root = tmp_path / "cfg" / "voices"
    voices = tmp_path / "cfg" / "voices.yaml"
    async with running_server(_config(tmp_path)) as server:
        voices.write_text(
            voices.read_text() + f"- name: boom\n  reference_audio: robot.wav\n  options: {alias_bomb(6)}\n"
        )
        _voice_folder(root, "boom2", f"description: {alias_bomb(6)}\n")
        assert await describe(server) == ["robot"]  # the voices loaded before the bad edit are kept
        assert (
            "voices.yaml:line 8: invalid YAML: anchors and aliases (&name, *name) are not allowed here" in caplog.text
        )
        problems = "\n".join(server.service.catalog.problems)
        assert "voice 'boom2': " in problems and "profile.yaml:line 1: invalid YAML: anchors and aliases" in problems
        assert not (await speak(server, "robot")).errors


class BlockingProvider:
    """A voice provider whose scan blocks until released (a slow disk, a huge folder)."""

    scanning = threading.Event()
    """Set when a blocking scan started."""
    in_scan = threading.Event()
    """Set while a scan is blocked."""
    release = threading.Event()

    def load(self) -> list[VoiceProfile]:
        if BlockingProvider.release.is_set():
            return [VoiceProfile(name="slow", languages=("en-US",))]
        BlockingProvider.scanning.set()
        BlockingProvider.in_scan.set()
        try:
            BlockingProvider.release.wait(10)  # the safety valve: a blocked event loop cannot release it
        finally:
            BlockingProvider.in_scan.clear()
        return [VoiceProfile(name="slow", languages=("en-US",))]


class BlockingPlugin:
    """Registers the `blocking` voice provider."""

    @staticmethod
    @hookimpl
    def register_voice_providers(register: Callable[..., Any]) -> None:
        register("blocking", lambda section: BlockingProvider())


async def test_voice_scans_run_off_the_event_loop(tmp_path: Path) -> None:
    """While a describe waits for a slow voice scan, other clients are answered (the scan runs in a thread)."""
    config = load_config(
        write_config(tmp_path / "cfg", voice_providers={"yaml": {"path": "voices.yaml"}, "blocking": {}})
    )
    BlockingProvider.release.set()  # startup scans freely
    async with running_server(config, Plugins(extra=(BlockingPlugin,))) as server:
        BlockingProvider.release.clear()
        BlockingProvider.scanning.clear()
        try:
            async with connect(server) as slow, connect(server) as other:
                await slow.write_event(Describe().event())
                await poll(BlockingProvider.scanning.is_set)
                await other.write_event(Ping(text="still there?").event())
                pong = await read(other)
                answered_during_scan = BlockingProvider.in_scan.is_set()
                BlockingProvider.release.set()
                assert pong is not None and pong.type == "pong"
                assert answered_during_scan, "the ping was answered only after the scan: the scan blocked the loop"
                event = await read(slow)
                assert event is not None and [v.name for v in Info.from_event(event).tts[0].voices][-1] == "slow"
        finally:
            BlockingProvider.release.set()


# ---------------------------------------------------------------------------------------------- reference size


def sparse_wav(path: Path, data_bytes: int, rate: int = 16000) -> Path:
    """A 16-bit mono WAV whose header announces `data_bytes` of audio, written as a sparse file (no disk used)."""
    header = (
        b"RIFF"
        + (36 + data_bytes).to_bytes(4, "little")
        + b"WAVEfmt "
        + (16).to_bytes(4, "little")
        + (1).to_bytes(2, "little")
        + (1).to_bytes(2, "little")
        + rate.to_bytes(4, "little")
        + (rate * 2).to_bytes(4, "little")
        + (2).to_bytes(2, "little")
        + (16).to_bytes(2, "little")
        + b"data"
        + data_bytes.to_bytes(4, "little")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(header)
        handle.truncate(len(header) + data_bytes)
    return path


async def test_reference_audio_over_the_cap_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """The header's length is checked before the file is read: a 512 MiB sparse reference.wav took RSS to 1.1 GB."""
    root = tmp_path / "cfg" / "voices"
    async with running_server(_config(tmp_path, max_reference_seconds=20.0)) as server:
        sparse_wav(root / "en_US" / ".huge" / "reference.wav", 512 * 1024 * 1024).parent.rename(root / "en_US" / "huge")
        long = root / "en_US" / ".long"
        audiogen.write(long / "reference.wav", 25.0, 16000)  # real sound, but longer than the cap
        long.rename(root / "en_US" / "long")
        lying = root / "en_US" / ".lying"
        audiogen.write(lying / "reference.wav", 2.0, 16000)
        with open(lying / "reference.wav", "ab") as handle:  # 8 MB beyond what the header describes
            handle.truncate((lying / "reference.wav").stat().st_size + 8 * 1024 * 1024)
        lying.rename(root / "en_US" / "lying")
        await describe(server)
        await asyncio.wait_for(server.service.preparer.wait_idle(), TIMEOUT)
        assert await describe(server) == ["robot"]
        broken = server.service.catalog.broken
        assert "16777 s long; the limit is 20 s (limits.max_reference_seconds)" in broken["huge"], broken
        assert "25 s long; the limit is 20 s (limits.max_reference_seconds)" in broken["long"], broken
        assert "larger than the audio its header describes" in broken["lying"], broken
        assert not (await speak(server, "robot")).errors


# ---------------------------------------------------------------------------------------------- changing files


def cache_entries(cache: Path) -> set[str]:
    """Normalized references in the cache (`<digest>.wav`, with its `<digest>.json`)."""
    return {p.stem for p in (cache / "references").glob("*.wav")}


async def test_reference_written_slowly_is_used_once_it_settles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reference.wav still being written is neither listed nor prepared; it is prepared once, complete."""
    monkeypatch.setenv("WYOMING_COSYVOICE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "cfg" / "voices"
    async with running_server(_config(tmp_path, engine="stuck"), Plugins(extra=(StuckPlugin,))) as server:
        engine = server.service.engine
        before = cache_entries(tmp_path / "cache")
        complete = audiogen.write(tmp_path / "complete.wav", 4.0, 16000).read_bytes()
        folder = root / "en_US" / "slow"
        folder.mkdir(parents=True)
        done = threading.Event()

        def write_slowly() -> None:  # 40 pieces, 50 ms apart: about 2 s, as over a slow network share
            with open(folder / "reference.wav", "wb") as handle:
                step = len(complete) // 40 + 1
                for start in range(0, len(complete), step):
                    handle.write(complete[start : start + step])
                    handle.flush()
                    time.sleep(0.05)
            done.set()

        writer = asyncio.ensure_future(asyncio.to_thread(write_slowly))
        listed_while_writing = 0
        while not done.is_set():
            names = await describe(server)
            listed_while_writing += "slow" in names and not done.is_set()
            await asyncio.sleep(0.03)
        await writer
        deadline = time.monotonic() + TIMEOUT
        while "slow" not in await describe(server):
            assert time.monotonic() < deadline, "the finished file was never used"
            await asyncio.sleep(0.05)
        await server.service.preparer.wait_idle()
        assert listed_while_writing == 0
        assert engine.prepared.count("slow") == 1, engine.prepared
        assert len(cache_entries(tmp_path / "cache") - before) == 1
        reply = await speak(server, "slow")
        assert not reply.errors


async def test_cache_entries_no_voice_uses_are_pruned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replaced or removed reference leaves no normalized copy behind in the cache."""
    monkeypatch.setenv("WYOMING_COSYVOICE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "cfg" / "voices"
    cache = tmp_path / "cache"
    async with running_server(_config(tmp_path, engine="stuck"), Plugins(extra=(StuckPlugin,))) as server:
        robot = cache_entries(cache)
        assert len(robot) == 1
        folder = _voice_folder(root, "alice")
        await describe(server)
        await server.service.preparer.wait_idle()
        first = cache_entries(cache) - robot
        assert len(first) == 1
        audiogen.write(tmp_path / "other.wav", 3.0, 24000)  # a new recording replaces the old one
        (tmp_path / "other.wav").replace(folder / "reference.wav")
        await poll_describe(server, lambda: cache_entries(cache) - robot - first)
        assert cache_entries(cache) & first == set(), "the old recording's copy was pruned"
        assert len(cache_entries(cache) - robot) == 1
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()
        await poll_describe(server, lambda: cache_entries(cache) == robot)
        assert sorted(p.suffix for p in (cache / "references").iterdir()) == [".json", ".wav"]


async def poll_describe(server: Any, condition: Callable[[], Any]) -> None:
    """Describe (which rescans the voices) until `condition()` holds and no preparation runs (generous timeout)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        await describe(server)
        await server.service.preparer.wait_idle()
        if condition():
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)
