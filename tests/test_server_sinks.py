"""Server-side tee: config `sinks:` archive every reply as WAV and forward it to a Wyoming sound service."""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

from wyoming_cosyvoice.config import load_config
from wyoming_cosyvoice.errors import ConfigError
from wyoming_cosyvoice.plugins import Plugins
from wyoming_cosyvoice.server import build_service

from .helpers import TIMEOUT, collect, connect, running_server, write_config
from .peers import SoundReceiver, serve


async def wait_until(condition: "object", what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_every_reply_is_archived_and_forwarded(tmp_path: Path) -> None:
    receiver = SoundReceiver()
    archive = tmp_path / "archive"
    async with serve(receiver.factory()) as port:
        config = load_config(
            write_config(
                tmp_path / "cfg",
                sinks={"wav": {"dir": str(archive)}, "wyoming": {"uri": f"tcp://127.0.0.1:{port}", "rate": 16000}},
            )
        )
        async with running_server(config) as server:
            async with connect(server) as client:
                await client.write_event(Synthesize(text="Archive this reply.").event())
                one_shot = await collect(client)
                await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="anna")).event())
                for text in ("Erster Satz. ", "Zweiter Satz."):
                    await client.write_event(SynthesizeChunk(text=text).event())
                await client.write_event(SynthesizeStop().event())
                streamed = await collect(client, until="synthesize-stopped")
            await wait_until(
                lambda: (
                    len(list(archive.glob("*.wav"))) == 2
                    and len(receiver.streams) == 2
                    and all(s.stopped for s in receiver.streams)
                ),
                "both replies in both sinks",
            )
    files = sorted(archive.glob("*.wav"), key=lambda p: p.name)
    assert "-tars" in files[0].name and "-anna" in files[1].name
    for path, reply in zip(files, (one_shot, streamed), strict=False):
        data, rate = soundfile.read(path, dtype="int16")
        assert rate == 22050 and data.tobytes() == reply.audio  # exactly what the client got
    for got, reply in zip(receiver.streams, (one_shot, streamed), strict=False):
        assert got.start.rate == 16000  # converted to the receiver's configured rate
        expected = len(reply.audio) / 2 * 16000 / 22050
        assert abs(len(got.audio) / 2 - expected) <= 50
    assert not list(archive.glob("*.part"))


async def test_a_stalled_receiver_does_not_slow_the_client(tmp_path: Path) -> None:
    stalled = SoundReceiver(hold=asyncio.Event())
    archive = tmp_path / "archive"
    # 192 kHz, 32-bit stereo makes the copy ~35 times the reply: far more than the socket buffers take, so the
    # stalled receiver really blocks its sink while the client is being served.
    wide = {"uri": "", "rate": 192000, "width": 4, "channels": 2}
    text = " ".join(["The receiver is stuck, but the client is served at full speed all the same."] * 3)
    async with serve(stalled.factory()) as port:
        sinks = {"wyoming": {**wide, "uri": f"tcp://127.0.0.1:{port}"}, "wav": {"dir": str(archive)}}
        config = load_config(write_config(tmp_path / "cfg", sinks=sinks))
        async with running_server(config) as server:
            async with connect(server) as client:
                await client.write_event(Synthesize(text=text).event())
                reply = await collect(client)
                assert reply.stops == 1 and reply.seconds > 5 and not stalled.streams[0].stopped
                assert len(reply.audio) * 16 > 8 * 2**20
            await wait_until(lambda: list(archive.glob("*.wav")), "the archive")
            assert not stalled.streams[0].stopped
            stalled.hold.set()  # once it reads again, it gets the whole reply
            await wait_until(lambda: stalled.streams[0].stopped, "the receiver to catch up")
    (path,) = archive.glob("*.wav")
    assert soundfile.read(path, dtype="int16")[0].tobytes() == reply.audio
    assert abs(len(stalled.streams[0].audio) / 8 - len(reply.audio) / 2 * 192000 / 22050) < 200


async def test_a_receiver_that_is_down_only_fails_its_sink(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with serve(SoundReceiver().factory()) as port:
        pass
    archive = tmp_path / "archive"
    config = load_config(
        write_config(
            tmp_path / "cfg",
            sinks={"wyoming": {"uri": f"tcp://127.0.0.1:{port}"}, "wav": {"dir": str(archive)}},
        )
    )
    async with running_server(config) as server:
        async with connect(server) as client:
            await client.write_event(Synthesize(text="Hello.").event())
            reply = await collect(client)
        await wait_until(lambda: list(archive.glob("*.wav")), "the archive")
    assert reply.audio and not reply.errors
    assert f"cannot connect to tcp://127.0.0.1:{port}" in caplog.text


async def test_bad_sink_config_fails_at_startup(tmp_path: Path) -> None:
    path = write_config(tmp_path / "cfg", sinks={"wav": {"path": "x.wav", "dir": "d"}})
    with pytest.raises(ConfigError, match=r"server.yaml:sinks.wav.path: set exactly one"):
        await build_service(load_config(path), Plugins())
    path = write_config(tmp_path / "cfg2", sinks={"loudspeaker": {}})
    with pytest.raises(Exception, match="no sink named 'loudspeaker'"):
        await build_service(load_config(path), Plugins())


async def test_archive_sweeps_partial_files_left_by_a_killed_server(tmp_path: Path) -> None:
    """`.part` files a SIGKILLed server left behind are removed when the next one starts; live ones are kept."""
    archive = tmp_path / "archive"
    archive.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = archive / f".20260101-000000-r7-tars.wav.{int(dead.stdout)}.part"  # its writer has exited
    left.write_bytes(b"RIFF" + b"\0" * 100)
    old = archive / f".20260101-000000-r8-tars.wav.{os.getpid()}.part"  # nobody wrote to it for an hour
    old.write_bytes(b"RIFF" + b"\0" * 100)
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    live = archive / f".20260101-000000-r9-tars.wav.{os.getppid()}.part"  # a running process, just written
    live.write_bytes(b"RIFF" + b"\0" * 100)
    config = load_config(write_config(tmp_path / "cfg", sinks={"wav": {"dir": str(archive)}}))
    async with running_server(config):
        assert sorted(p.name for p in archive.iterdir()) == [live.name]


async def test_archive_write_failure_leaves_no_partial_file(tmp_path: Path) -> None:
    """A write that fails (here: the file size limit, as on a full disk) removes the archive's partial file."""
    archive = tmp_path / "archive"
    config = load_config(write_config(tmp_path / "cfg", sinks={"wav": {"dir": str(archive)}}))
    async with running_server(config) as server:
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))  # Python ignores SIGXFSZ: writes fail (EFBIG)
        try:
            async with connect(server) as client:
                await client.write_event(Synthesize(text="A long reply that fills the tiny disk. " * 6).event())
                reply = await collect(client)
            await server.service.close_sinks()
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert not reply.errors and reply.seconds > 5, "the client is not affected"
        assert list(archive.iterdir()) == [], "no partial .part or truncated .wav is left"
