"""Sinks: the Tee's isolation, WAV files read back with soundfile, and a real Wyoming sound receiver over TCP."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from wyoming_cosyvoice.audio import AudioFormat, PcmConverter
from wyoming_cosyvoice.config import Section
from wyoming_cosyvoice.errors import ConfigError, PluginError, SinkError
from wyoming_cosyvoice.plugins import Plugins
from wyoming_cosyvoice.sinks import StreamInfo, Tee, parse_spec, sink_from_spec

from .helpers import TIMEOUT
from .peers import SoundReceiver, serve, tone

FMT = AudioFormat(22050, 2, 1)


def chunks_of(pcm: bytes, n: int = 4410) -> list[bytes]:
    return [pcm[i : i + n] for i in range(0, len(pcm), n)]


@pytest.fixture(scope="module")
def plugins() -> Plugins:
    return Plugins()


def section(name: str, **data: object) -> Section:
    return Section(name=name, data=data, source="test.yaml", key=f"sinks.{name}", base_dir=Path("."))


class FailingSink:
    """A sink (our Sink protocol) that breaks after a few chunks: the Tee must isolate it."""

    name = "failing"

    def __init__(self, after: int) -> None:
        self.after = after

    async def open(self, fmt: AudioFormat, info: StreamInfo) -> "FailingSink":
        return self

    async def write(self, pcm: bytes) -> None:
        self.after -= 1
        if self.after < 0:
            raise RuntimeError("disk on fire")

    async def close(self, ok: bool) -> str:
        return "closed"


# ------------------------------------------------------------------------------------------ specs and config


def test_parse_spec(plugins: Plugins) -> None:
    assert parse_spec(plugins, "speaker") == ("speaker", {})
    assert parse_spec(plugins, "speaker:2") == ("speaker", {"device": "2"})
    assert parse_spec(plugins, "wav:out/reply.wav") == ("wav", {"path": "out/reply.wav"})
    assert parse_spec(plugins, "wyoming:tcp://kitchen:10601") == ("wyoming", {"uri": "tcp://kitchen:10601"})
    assert parse_spec(plugins, "custom:x") == ("custom", {"target": "x"})
    with pytest.raises(SinkError, match="NAME"):
        parse_spec(plugins, ":x")
    with pytest.raises(SinkError, match="nothing after"):
        parse_spec(plugins, "wav:")


def test_unknown_sink_and_bad_settings_are_one_line_errors(plugins: Plugins) -> None:
    with pytest.raises(PluginError, match="no sink named 'nope'"):
        sink_from_spec(plugins, "nope:x")
    with pytest.raises(ConfigError, match=r"test.yaml:sinks.wav.path: set exactly one"):
        plugins.factory("sinks", "wav")(section("wav"))
    with pytest.raises(ConfigError, match=r"sinks.wyoming.uri: expected tcp://"):
        plugins.factory("sinks", "wyoming")(section("wyoming", uri="http://x"))
    with pytest.raises(ConfigError, match=r"sinks.wav.colour: unknown key"):
        plugins.factory("sinks", "wav")(section("wav", dir="x", colour="red"))


# ------------------------------------------------------------------------------------------ wav


async def test_wav_sink_writes_what_arrived_and_renames_on_finish(tmp_path: Path, plugins: Plugins) -> None:
    pcm = tone(1.0, FMT.rate)
    out = tmp_path / "reply.wav"
    sink = sink_from_spec(plugins, f"wav:{out}")
    stream = await sink.open(FMT, StreamInfo())
    for piece in chunks_of(pcm)[:3]:
        await stream.write(piece)
    assert not out.exists(), "the final name appears only when the file is complete"
    partials = list(tmp_path.glob(".reply.wav.*.part"))
    assert len(partials) == 1
    for piece in chunks_of(pcm)[3:]:
        await stream.write(piece)
    summary = await stream.close(True)
    assert "wrote" in summary and "1.00 s" in summary
    assert not list(tmp_path.glob("*.part"))
    data, rate = soundfile.read(out, dtype="int16")
    assert rate == FMT.rate
    assert data.tobytes() == pcm


async def test_wav_sink_interrupted_stream_is_a_valid_file(tmp_path: Path, plugins: Plugins) -> None:
    pcm = tone(1.0, FMT.rate)
    out = tmp_path / "cut.wav"
    stream = await sink_from_spec(plugins, f"wav:{out}").open(FMT, StreamInfo())
    for piece in chunks_of(pcm)[:4]:
        await stream.write(piece)
    summary = await stream.close(False)
    assert "interrupted" in summary
    data, rate = soundfile.read(out, dtype="int16")
    assert data.tobytes() == pcm[: 4 * 4410]


async def test_wav_sink_refuses_to_overwrite_unless_asked(tmp_path: Path, plugins: Plugins) -> None:
    out = tmp_path / "keep.wav"
    out.write_bytes(b"precious")
    with pytest.raises(SinkError, match="keep.wav exists; pass --overwrite"):
        sink_from_spec(plugins, f"wav:{out}")
    assert out.read_bytes() == b"precious"
    stream = await sink_from_spec(plugins, f"wav:{out}", {"overwrite": True}).open(FMT, StreamInfo())
    await stream.write(tone(0.1, FMT.rate))
    await stream.close(True)
    assert soundfile.info(str(out)).frames == int(0.1 * FMT.rate)


async def test_wav_sink_keeps_audio_if_the_name_appears_while_writing(tmp_path: Path, plugins: Plugins) -> None:
    out = tmp_path / "race.wav"
    stream = await sink_from_spec(plugins, f"wav:{out}").open(FMT, StreamInfo())
    await stream.write(tone(0.1, FMT.rate))
    out.write_bytes(b"someone else")
    with pytest.raises(SinkError, match="audio kept in"):
        await stream.close(True)
    assert out.read_bytes() == b"someone else"
    (kept,) = tmp_path.glob("*.part")
    assert soundfile.info(str(kept)).frames == int(0.1 * FMT.rate)


@pytest.mark.parametrize("fmt", [AudioFormat(16000, 2, 2), AudioFormat(24000, 4, 1), AudioFormat(8000, 1, 1)])
async def test_wav_sink_formats(tmp_path: Path, plugins: Plugins, fmt: AudioFormat) -> None:
    pcm = PcmConverter(AudioFormat(fmt.rate, 2, 1), fmt).convert(tone(0.5, fmt.rate))
    stream = await sink_from_spec(plugins, f"wav:{tmp_path / 'f.wav'}").open(fmt, StreamInfo())
    await stream.write(pcm)
    await stream.close(True)
    info = soundfile.info(str(tmp_path / "f.wav"))
    assert (info.samplerate, info.channels, info.frames) == (fmt.rate, fmt.channels, len(pcm) // fmt.frame_bytes)
    dtype = {1: "int16", 2: "int16", 4: "int32"}[fmt.width]
    data, _ = soundfile.read(tmp_path / "f.wav", dtype=dtype, always_2d=True)
    if fmt.width == 1:
        expected = (np.frombuffer(pcm, np.uint8).astype(np.int16) - 128) << 8
    else:
        expected = np.frombuffer(pcm, {2: "<i2", 4: "<i4"}[fmt.width])
    assert np.array_equal(data.reshape(-1), expected)


async def test_wav_dir_mode_writes_one_file_per_stream(tmp_path: Path, plugins: Plugins) -> None:
    sink = plugins.factory("sinks", "wav")(section("wav", dir=str(tmp_path / "archive")))
    for _ in range(3):
        stream = await sink.open(FMT, StreamInfo(label="r1", voice="tars", started=0.0))
        await stream.write(tone(0.2, FMT.rate))
        await stream.close(True)
    files = sorted((tmp_path / "archive").glob("*.wav"))
    assert len(files) == 3, files
    assert all("-r1-tars" in f.name for f in files)


# ------------------------------------------------------------------------------------------ tee


async def test_tee_isolates_a_failing_sink(tmp_path: Path, plugins: Plugins) -> None:
    pcm = tone(1.0, FMT.rate)
    out = tmp_path / "a.wav"
    tee = Tee([FailingSink(after=2), sink_from_spec(plugins, f"wav:{out}")])
    stream = tee.open(FMT)
    for piece in chunks_of(pcm):
        stream.write(piece)
        await asyncio.sleep(0)
    results = await asyncio.wait_for(stream.close(True), TIMEOUT)
    failing, wav = results
    assert not failing.ok and "RuntimeError: disk on fire" in failing.detail
    assert wav.ok, wav.line()
    assert soundfile.read(out, dtype="int16")[0].tobytes() == pcm


async def test_tee_drops_a_sink_that_falls_too_far_behind(tmp_path: Path, plugins: Plugins) -> None:
    receiver = SoundReceiver(hold=asyncio.Event())
    async with serve(receiver.factory()) as port:
        out = tmp_path / "b.wav"
        tee = Tee(
            [sink_from_spec(plugins, f"wyoming:tcp://127.0.0.1:{port}"), sink_from_spec(plugins, f"wav:{out}")],
            max_lag_seconds=5.0,
        )
        stream = tee.open(AudioFormat(48000, 2, 2))
        pcm = tone(60.0, 48000, channels=2)  # ~11 MB: more than loopback socket buffers hold
        in_write = 0.0
        for piece in chunks_of(pcm, 96000):
            started = time.perf_counter()
            stream.write(piece)  # never waits, whatever the sinks do
            in_write += time.perf_counter() - started
            await asyncio.sleep(0.005)  # audio arrives over time, as from a server
        assert in_write < 0.5
        results = await asyncio.wait_for(stream.close(True, timeout=5.0), TIMEOUT)
        receiver.hold.set()
    net, wav = results
    assert not net.ok and "behind" in net.detail, net.line()
    assert wav.ok and soundfile.read(out, dtype="int16")[0].tobytes() == pcm


# ------------------------------------------------------------------------------------------ wyoming network sink


async def test_wyoming_sink_delivers_exact_audio_and_waits_for_played(plugins: Plugins) -> None:
    receiver = SoundReceiver()
    pcm = tone(1.5, FMT.rate)
    async with serve(receiver.factory()) as port:
        sink = sink_from_spec(plugins, f"wyoming:tcp://127.0.0.1:{port}")
        stream = await sink.open(FMT, StreamInfo())
        for piece in chunks_of(pcm):
            await stream.write(piece)
        summary = await asyncio.wait_for(stream.close(True), TIMEOUT)
    assert "played" in summary
    (got,) = receiver.streams
    assert (got.start.rate, got.start.width, got.start.channels) == (22050, 2, 1)
    assert got.stopped and bytes(got.audio) == pcm and got.chunks == len(chunks_of(pcm))


async def test_wyoming_sink_converts_to_the_receivers_format(plugins: Plugins) -> None:
    receiver = SoundReceiver(send_played=False)
    pcm = tone(1.0, FMT.rate)
    async with serve(receiver.factory()) as port:
        sink = plugins.factory("sinks", "wyoming")(
            section("wyoming", uri=f"tcp://127.0.0.1:{port}", rate=48000, width=2, channels=2, played_grace=0.2)
        )
        stream = await sink.open(FMT, StreamInfo())
        for piece in chunks_of(pcm):
            await stream.write(piece)
        summary = await asyncio.wait_for(stream.close(True), TIMEOUT)
    assert "no played event" in summary  # `played` is optional
    (got,) = receiver.streams
    assert (got.start.rate, got.start.width, got.start.channels) == (48000, 2, 2)
    frames = np.frombuffer(bytes(got.audio), "<i2").reshape(-1, 2)
    assert abs(len(frames) - len(pcm) // 2 * 48000 / 22050) <= 2 * len(chunks_of(pcm))
    assert np.array_equal(frames[:, 0], frames[:, 1])
    expected = PcmConverter(AudioFormat(22050, 2, 1), AudioFormat(48000, 2, 1)).convert(pcm)
    src = np.frombuffer(expected, "<i2")[:4000].astype(float)
    assert np.corrcoef(src, frames[: len(src), 0].astype(float))[0, 1] > 0.99


async def test_wyoming_sink_receiver_down_fails_alone(tmp_path: Path, plugins: Plugins) -> None:
    async with serve(SoundReceiver().factory()) as port:
        pass  # the port is now closed: nobody listens there
    out = tmp_path / "c.wav"
    tee = Tee([sink_from_spec(plugins, f"wyoming:tcp://127.0.0.1:{port}"), sink_from_spec(plugins, f"wav:{out}")])
    stream = tee.open(FMT)
    pcm = tone(0.5, FMT.rate)
    for piece in chunks_of(pcm):
        stream.write(piece)
    net, wav = await asyncio.wait_for(stream.close(True), TIMEOUT)
    assert not net.ok and f"cannot connect to tcp://127.0.0.1:{port}" in net.detail
    assert wav.ok and soundfile.read(out, dtype="int16")[0].tobytes() == pcm


async def test_wyoming_slow_receiver_never_stalls_the_others(tmp_path: Path, plugins: Plugins) -> None:
    stalled = SoundReceiver(hold=asyncio.Event())
    fast = SoundReceiver()
    pcm = tone(60.0, 48000, channels=2)  # ~11 MB: more than loopback socket buffers hold
    fmt = AudioFormat(48000, 2, 2)
    async with serve(stalled.factory()) as slow_port, serve(fast.factory()) as fast_port:
        out = tmp_path / "d.wav"
        tee = Tee(
            [
                sink_from_spec(plugins, f"wyoming:tcp://127.0.0.1:{slow_port}"),
                sink_from_spec(plugins, f"wyoming:tcp://127.0.0.1:{fast_port}"),
                sink_from_spec(plugins, f"wav:{out}"),
            ]
        )
        stream = tee.open(fmt)
        for piece in chunks_of(pcm, 19200):
            stream.write(piece)
        deadline = time.monotonic() + TIMEOUT
        while not (fast.streams and len(fast.streams[0].audio) == len(pcm)) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert bytes(fast.streams[0].audio) == pcm  # all of it, while the other receiver is stuck
        results = await asyncio.wait_for(stream.close(True, timeout=3.0), TIMEOUT)
        stalled.hold.set()
    slow_result, fast_result, wav_result = results
    assert fast_result.ok and wav_result.ok, [r.line() for r in results]
    assert not slow_result.ok and "did not finish within 3.0 s" in slow_result.detail
    assert len(stalled.streams[0].audio) < len(pcm)
    assert fast.streams[0].stopped
    info = soundfile.info(str(out))
    assert info.frames == len(pcm) // 4
