"""Speaker playback through a real PortAudio device: an ALSA `file` PCM records what was played.

ALSA reads its configuration once per process, so each case runs `wyoming-cosyvoice say` in a subprocess whose
ALSA_CONFIG_PATH points at a config written here; sounddevice is imported only there.
"""

from __future__ import annotations

import ctypes.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile

from wyoming_cosyvoice.audio import AudioFormat, PcmConverter
from wyoming_cosyvoice_plugins.speaker_sink import choose_rate

from .helpers import TIMEOUT, cli, collect, start_server, write_config
from .peers import ForeignTts, serve

pytestmark = pytest.mark.skipif(
    ctypes.util.find_library("portaudio") is None, reason="libportaudio2 not installed (script/setup installs it)"
)

ALSA_CONFIG = """
pcm.!default {{
  type file
  slave.pcm "nullsink"
  file "{default}"
  format "raw"
}}
pcm.capture {{
  type file
  slave.pcm "nullsink"
  file "{capture}"
  format "raw"
}}
pcm.nullsink {{
  type null
}}
"""


@dataclass
class Alsa:
    """An ALSA configuration with two recording devices: `default` and `capture`."""

    env: dict[str, str]
    default: Path
    capture: Path


@pytest.fixture
def alsa(tmp_path: Path) -> Alsa:
    default, capture = tmp_path / "default.raw", tmp_path / "capture.raw"
    conf = tmp_path / "asound.conf"
    conf.write_text(ALSA_CONFIG.format(default=default, capture=capture))
    return Alsa({**os.environ, "ALSA_CONFIG_PATH": str(conf)}, default, capture)


async def test_speaker_plays_exactly_what_was_streamed(alsa: Alsa, tmp_path: Path) -> None:
    tts = ForeignTts(rate=16000, runs=2, chunks_per_run=5)
    async with serve(tts.factory()) as port:
        rc, out, err = await cli(
            "say",
            "Hello there",
            "--uri",
            f"tcp://127.0.0.1:{port}",
            "--sink",
            "speaker",
            "--sink",
            f"wav:{tmp_path / 'copy.wav'}",
            env=alsa.env,
        )
    assert rc == 0, err
    played = alsa.default.read_bytes()
    assert len(played) == len(tts.sent) == 2 * 5 * 1600 * 2
    assert played == bytes(tts.sent)
    assert soundfile.read(tmp_path / "copy.wav", dtype="int16")[0].tobytes() == played
    assert re.search(r"speaker:default: played 1\.00 s at 16000 Hz, sound after \d+ ms, underruns: 0", out), out
    assert "time to first audio:" in out and "real-time factor:" in out


async def test_speaker_resamples_when_asked_for_another_device_rate(alsa: Alsa) -> None:
    tts = ForeignTts(rate=16000, runs=1, chunks_per_run=8)
    async with serve(tts.factory()) as port:
        rc, out, err = await cli(
            "say", "Hi", "--uri", f"tcp://127.0.0.1:{port}", "--device-rate", "48000", env=alsa.env
        )
    assert rc == 0, err
    played = np.frombuffer(alsa.default.read_bytes(), "<i2")
    converter = PcmConverter(AudioFormat(16000, 2, 1), AudioFormat(48000, 2, 1))
    expected = np.frombuffer(converter.convert(bytes(tts.sent)), "<i2")
    assert abs(len(played) - 3 * len(tts.sent) // 2) <= 8
    n = min(len(played), len(expected))
    assert np.abs(played[:n].astype(int) - expected[:n]).max() <= 1  # same resampler, chunk by chunk
    assert "at 48000 Hz" in out


async def test_speaker_device_by_name_and_by_index(alsa: Alsa) -> None:
    tts = ForeignTts(rate=22050, runs=1, chunks_per_run=3)
    async with serve(tts.factory()) as port:
        rc, out, err = await cli("say", "Hi", "--uri", f"tcp://127.0.0.1:{port}", "--device", "capture", env=alsa.env)
        assert rc == 0, err
        assert alsa.capture.read_bytes() == bytes(tts.sent)
        assert not alsa.default.exists() or alsa.default.stat().st_size == 0
        alsa.capture.unlink()
        rc, listing, err = await cli("say", "Hi", "--uri", f"tcp://127.0.0.1:{port}", "--device", "nope", env=alsa.env)
        assert rc == 2 and "no output device matching 'nope'" in err and "capture" in err, err
        index = re.search(r"(\d+): capture", err)
        assert index, err
        rc, out, err = await cli(
            "say", "Hi", "--uri", f"tcp://127.0.0.1:{port}", "--sink", f"speaker:{index.group(1)}", env=alsa.env
        )
        assert rc == 0, err
        assert alsa.capture.read_bytes() == bytes(tts.sent)[: len(alsa.capture.read_bytes())]
        assert alsa.capture.stat().st_size == len(tts.sent) // 2


async def test_jitter_buffer_delays_the_first_sound(alsa: Alsa) -> None:
    tts = ForeignTts(rate=16000, runs=1, chunks_per_run=6, chunk_delay=0.1)
    async with serve(tts.factory()) as port:
        rc, out, err = await cli("say", "Hi", "--uri", f"tcp://127.0.0.1:{port}", "--jitter-ms", "300", env=alsa.env)
        assert rc == 0, err
        buffered = int(re.search(r"sound after (\d+) ms", out).group(1))  # type: ignore[union-attr]
        assert buffered >= 150, out  # three 100 ms chunks had to arrive first (~200 ms after the first)
        alsa.default.unlink()
        rc, out, err = await cli("say", "Hi", "--uri", f"tcp://127.0.0.1:{port}", "--jitter-ms", "0", env=alsa.env)
        assert rc == 0, err
        immediate = int(re.search(r"sound after (\d+) ms", out).group(1))  # type: ignore[union-attr]
    assert immediate < buffered
    assert alsa.default.stat().st_size == 6 * 1600 * 2


async def test_no_audio_device_is_a_clear_error(tmp_path: Path) -> None:
    conf = tmp_path / "headless.conf"
    # What a machine without a sound card looks like to ALSA: the default device names a card that is not there.
    conf.write_text("pcm.!default {\n type hw\n card 99\n}\nctl.!default {\n type hw\n card 99\n}\n")
    env = {**os.environ, "ALSA_CONFIG_PATH": str(conf)}
    rc, out, err = await cli("say", "Hello", "--uri", "tcp://127.0.0.1:9", env=env)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert lines[-1].startswith("error: speaker: no audio output device available")
    assert "use --out FILE.wav" in lines[-1]
    assert "Traceback" not in err
    rc, out, err = await cli("say", "Hello", "--uri", "tcp://127.0.0.1:9", "--device", "nothing", env=env)
    assert rc == 2 and "no output device matching 'nothing' (output devices: none)" in err, err


def test_choose_rate() -> None:
    assert choose_rate(22050, None, lambda r: True, 48000) == 22050
    assert choose_rate(22050, None, lambda r: r == 48000, 48000) == 48000
    assert choose_rate(22050, 44100, lambda r: True, 48000) == 44100


async def test_server_side_speaker_plays_each_reply(alsa: Alsa, tmp_path: Path) -> None:
    """`sinks: {speaker: ...}` in server.yaml: the server also plays every reply on its own audio device."""
    import asyncio
    import signal

    from wyoming.client import AsyncTcpClient
    from wyoming.tts import Synthesize

    config = write_config(tmp_path / "cfg", sinks={"speaker": {"device": "capture", "jitter_ms": 50}})
    proc, port = await asyncio.to_thread(start_server, config, alsa.env)
    try:
        client = AsyncTcpClient("127.0.0.1", port)
        await asyncio.wait_for(client.connect(), TIMEOUT)
        await client.write_event(Synthesize(text="Hello from the server's own speaker.").event())
        reply = await collect(client)
        await client.disconnect()
        assert not reply.errors and reply.stops == 1 and len(reply.audio) > 22050
        proc.send_signal(signal.SIGTERM)  # shutdown waits for sinks to finish their replies
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    log = proc.stderr.read()
    assert "Traceback" not in log, log
    played = alsa.capture.read_bytes()
    assert played == bytes(reply.audio), (len(played), len(reply.audio))
