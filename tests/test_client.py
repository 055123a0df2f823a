"""The Wyoming TTS client and the `say`/`describe` commands, against our real server and a foreign one."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import AsyncIterator

import numpy as np
import pytest
import soundfile

from wyoming_cosyvoice.audio import AudioFormat, PcmConverter
from wyoming_cosyvoice.client import AudioPiece, ReplyStats, TtsClient
from wyoming_cosyvoice.commands.describe import parse_health
from wyoming_cosyvoice.config import Config
from wyoming_cosyvoice.errors import ClientError, RemoteError

from .helpers import TIMEOUT, assert_speech, cli, refusing_unknown_voices, running_server
from .peers import ForeignTts, serve


async def gather(pieces: AsyncIterator[AudioPiece]) -> bytes:
    out = bytearray()
    async for piece in pieces:
        out += piece.pcm
    return bytes(out)


async def lines(*texts: str, delay: float = 0.0) -> AsyncIterator[str]:
    for text in texts:
        if delay:
            await asyncio.sleep(delay)
        yield text


async def wait_for_file(pattern_dir: Path, glob: str, min_bytes: int) -> Path:
    """Poll until a file matching `glob` has at least `min_bytes` (audio reached the sink)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for path in pattern_dir.glob(glob):
            if path.stat().st_size >= min_bytes:
                return path
        await asyncio.sleep(0.02)
    raise AssertionError(f"no {glob} of {min_bytes} bytes in {pattern_dir}: {list(pattern_dir.iterdir())}")


# ------------------------------------------------------------------------------------------ our server


async def test_client_one_shot_against_our_server(config: Config) -> None:
    async with running_server(refusing_unknown_voices(config)) as server:
        async with TtsClient(f"tcp://127.0.0.1:{server.port}") as client:
            stats = ReplyStats()
            audio = await gather(client.synthesize("Hello there, how are you today?", stats=stats))
            assert stats.fmt is not None and stats.fmt.rate == 22050 and stats.audio_starts == 1
            assert_speech(np.frombuffer(audio, "<i2") / 32768.0, 22050, 6)
            assert stats.first_audio is not None and 0 < stats.first_audio <= stats.total
            assert stats.rtf is not None and stats.audio_seconds == pytest.approx(len(audio) / 2 / 22050)
            # The same connection serves another request (and the voice/language fields reach the server).
            again = await gather(client.synthesize("Hallo", voice="anna"))
            assert again
            with pytest.raises(RemoteError, match=r"server error \(VoiceNotFound\): .*nobody"):
                await gather(client.synthesize("Hi", voice="nobody"))


async def test_client_streaming_sends_text_before_the_input_ends(config: Config) -> None:
    async with running_server(config) as server:
        async with TtsClient(f"tcp://127.0.0.1:{server.port}") as client:
            assert await client.supports_streaming()
            gate = asyncio.Event()

            async def texts() -> AsyncIterator[str]:
                yield "The first sentence is complete. "
                await gate.wait()  # the rest of the input only comes after audio arrived
                yield "And here is the second one."

            stats = ReplyStats()
            audio = bytearray()
            async for piece in client.synthesize_stream(texts(), stats=stats):
                audio += piece.pcm
                gate.set()
            assert stats.first_audio is not None and stats.input_closed is not None
            assert stats.first_audio < stats.input_closed
            assert_speech(np.frombuffer(bytes(audio), "<i2") / 32768.0, 22050, 10)


async def test_connection_refused_is_one_line() -> None:
    async with serve(ForeignTts().factory()) as port:
        pass
    with pytest.raises(ClientError, match=rf"cannot connect to tcp://127.0.0.1:{port}: "):
        async with TtsClient(f"tcp://127.0.0.1:{port}"):
            pass


# ------------------------------------------------------------------------------------------ foreign servers


async def test_foreign_server_several_audio_starts_one_shot() -> None:
    tts = ForeignTts(rate=16000, runs=3, chunks_per_run=2)
    async with serve(tts.factory()) as port:
        async with TtsClient(f"tcp://127.0.0.1:{port}") as client:
            stats = ReplyStats()
            audio = await gather(client.synthesize("hello", stats=stats))
    assert audio == bytes(tts.sent) and stats.audio_starts == 3 and stats.fmt.rate == 16000  # type: ignore[union-attr]
    assert tts.requests == ["hello"]


async def test_foreign_server_without_audio_start() -> None:
    tts = ForeignTts(rate=11025, runs=1, chunks_per_run=4, send_start=False)
    async with serve(tts.factory()) as port:
        async with TtsClient(f"tcp://127.0.0.1:{port}") as client:
            stats = ReplyStats()
            audio = await gather(client.synthesize("hello", stats=stats))
    assert audio == bytes(tts.sent) and stats.audio_starts == 0 and stats.fmt.rate == 11025  # type: ignore[union-attr]


async def test_foreign_server_changing_format_mid_reply_is_converted() -> None:
    tts = ForeignTts(runs=2, chunks_per_run=3, rates=[16000, 24000])
    async with serve(tts.factory()) as port:
        async with TtsClient(f"tcp://127.0.0.1:{port}") as client:
            stats = ReplyStats()
            audio = await gather(client.synthesize("hello", stats=stats))
    first = bytes(tts.sent[: 3 * 1600 * 2])
    second = bytes(tts.sent[len(first) :])
    assert stats.fmt.rate == 16000 and audio[: len(first)] == first  # type: ignore[union-attr]
    converted = PcmConverter(AudioFormat(24000, 2, 1), AudioFormat(16000, 2, 1))
    expected = b"".join(converted.convert(second[i : i + 4800]) for i in range(0, len(second), 4800))
    assert audio[len(first) :] == expected


async def test_foreign_streaming_server_with_a_run_per_sentence() -> None:
    tts = ForeignTts(rate=16000, runs=2, chunks_per_run=2, streaming=True)
    async with serve(tts.factory()) as port:
        async with TtsClient(f"tcp://127.0.0.1:{port}") as client:
            stats = ReplyStats()
            audio = await gather(client.synthesize_stream(lines("One.\n", "Two.\n"), stats=stats))
    assert audio == bytes(tts.sent) and stats.audio_starts == 2
    assert tts.requests == ["One.\nTwo.\n"]


async def test_non_streaming_server_gets_one_synthesize_per_line() -> None:
    tts = ForeignTts(rate=16000, runs=1, chunks_per_run=2, streaming=False)
    async with serve(tts.factory()) as port:
        async with TtsClient(f"tcp://127.0.0.1:{port}") as client:
            audio = await gather(client.synthesize_stream(lines("One.\n", "\n", "Two.\n")))
    assert tts.requests == ["One.", "Two."]
    assert audio == bytes(tts.sent) and len(audio) == 2 * 2 * 1600 * 2


async def test_server_that_never_answers_times_out() -> None:
    tts = ForeignTts(hang_after_chunks=1)
    async with serve(tts.factory()) as port:
        async with TtsClient(f"tcp://127.0.0.1:{port}", read_timeout=0.5) as client:
            with pytest.raises(ClientError, match="no answer within 0.5 s"):
                await gather(client.synthesize("hello"))
        tts.release.set()


# ------------------------------------------------------------------------------------------ say command


async def test_say_against_a_foreign_server_saves_a_wav(tmp_path: Path) -> None:
    tts = ForeignTts(rate=16000, runs=2, chunks_per_run=3)
    out = tmp_path / "reply.wav"
    async with serve(tts.factory()) as port:
        rc, stdout, err = await cli("say", "Hello there", "--uri", f"tcp://127.0.0.1:{port}", "--out", str(out))
        assert rc == 0, err
        data, rate = soundfile.read(out, dtype="int16")
        assert rate == 16000 and data.tobytes() == bytes(tts.sent)
        assert "time to first audio:" in stdout and "real-time factor:" in stdout
        assert f"wav:{out}: wrote {out} (0.60 s)" in stdout
        rc, stdout, err = await cli("say", "Again", "--uri", f"tcp://127.0.0.1:{port}", "--out", str(out))
        assert rc == 2 and err.strip() == f"error: {out} exists; pass --overwrite (or overwrite: true) to replace it"
        assert tts.requests == ["Hello there"], "the existing file is refused before anything is synthesized"


async def test_say_dropped_connection_keeps_a_valid_wav(tmp_path: Path) -> None:
    tts = ForeignTts(rate=16000, runs=1, chunks_per_run=10, drop_after_chunks=4)
    out = tmp_path / "cut.wav"
    async with serve(tts.factory()) as port:
        rc, stdout, err = await cli("say", "Hello", "--uri", f"tcp://127.0.0.1:{port}", "--out", str(out))
    assert rc == 1
    assert "server closed the connection before the reply ended" in err
    data, rate = soundfile.read(out, dtype="int16")
    assert data.tobytes() == bytes(tts.sent) and len(data) == 4 * 1600
    assert "interrupted" in stdout


async def test_say_ctrl_c_keeps_a_valid_wav(tmp_path: Path) -> None:
    tts = ForeignTts(rate=16000, runs=1, chunks_per_run=10, hang_after_chunks=3)
    out = tmp_path / "stopped.wav"
    async with serve(tts.factory()) as port:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "wyoming_cosyvoice",
            "say",
            "Hello",
            "--uri",
            f"tcp://127.0.0.1:{port}",
            "--out",
            str(out),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        await wait_for_file(tmp_path, ".stopped.wav.*.part", 44 + 3 * 1600 * 2)
        proc.send_signal(signal.SIGINT)
        stdout, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
        tts.release.set()
    assert proc.returncode == 130, err
    data, rate = soundfile.read(out, dtype="int16")
    assert data.tobytes() == bytes(tts.sent) and len(data) == 3 * 1600
    assert not list(tmp_path.glob("*.part"))


async def test_say_stream_audio_begins_before_stdin_closes(config: Config, tmp_path: Path) -> None:
    out = tmp_path / "streamed.wav"
    async with running_server(config) as server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "wyoming_cosyvoice",
            "say",
            "--stream",
            "--uri",
            f"tcp://127.0.0.1:{server.port}",
            "--out",
            str(out),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None
        proc.stdin.write(b"This first line is spoken while the input stays open.\n")
        await proc.stdin.drain()
        # Audio of the first line reaches the WAV file while standard input is still open.
        part = await wait_for_file(tmp_path, ".streamed.wav.*.part", 44 + 22050)
        assert proc.returncode is None and not out.exists()
        proc.stdin.write(b"Then a second line arrives, and the input ends.\n")
        proc.stdin.close()
        stdout, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode == 0, err
    assert not part.exists()
    data, rate = soundfile.read(out, dtype="float32")
    assert_speech(data, rate, 20)
    assert "first audio before the input ended" in stdout.decode()


async def test_say_stream_reads_a_file(config: Config, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("Line one.\nLine two is here.\n")
    async with running_server(config) as server:
        rc, stdout, err = await cli(
            "say",
            "--stream",
            "--file",
            str(text),
            "--uri",
            f"tcp://127.0.0.1:{server.port}",
            "--out",
            str(tmp_path / "f.wav"),
        )
    assert rc == 0, err
    data, rate = soundfile.read(tmp_path / "f.wav", dtype="float32")
    assert_speech(data, rate, 6)


async def test_say_usage_errors() -> None:
    rc, _, err = await cli("say", "--uri", "tcp://127.0.0.1:9", "--out", "/tmp/x.wav")
    assert rc == 2 and err.strip() == "error: nothing to say: give TEXT, '-' to read standard input, or --stream"
    rc, _, err = await cli("say", "Hi", "--uri", "tcp://127.0.0.1:9", "--sink", "wav:x.txt")
    assert rc == 2 and "--sink wav.path: expected a .wav file name" in err
    rc, _, err = await cli("say", "Hi", "--uri", "tcp://127.0.0.1:9", "--out", "/tmp/never-written.wav", "--overwrite")
    assert rc == 1 and "error: cannot connect to tcp://127.0.0.1:9" in err


# ------------------------------------------------------------------------------------------ describe command


async def test_describe_our_server(config: Config) -> None:
    async with running_server(config) as server:
        rc, out, err = await cli("describe", "--uri", f"tcp://127.0.0.1:{server.port}")
        assert rc == 0, err
        assert "tts program: cosyvoice" in out and "streaming: yes" in out
        assert "tars [en-US] - TARS" in out and "anna [de-DE] - Anna (German)" in out
        assert "languages: de-DE, en-US" in out
        assert "health: engine=espeak" in out
        rc, out, err = await cli("describe", "--uri", f"tcp://127.0.0.1:{server.port}", "--json")
    data = json.loads(out)
    (program,) = data["tts"]
    assert program["health"]["engine"] == "espeak" and program["health"]["state"] == "ready"
    assert [v["name"] for v in program["voices"]] == ["tars", "anna"]


async def test_describe_a_foreign_server() -> None:
    tts = ForeignTts()
    async with serve(tts.factory()) as port:
        rc, out, err = await cli("describe", "--uri", f"tcp://127.0.0.1:{port}")
    assert rc == 0, err
    assert "tts program: foreign-tts 9.9" in out and "en_US-test [en_US]" in out and "health" not in out


def test_parse_health() -> None:
    text = "CosyVoice voice cloning TTS (engine: cosyvoice; gpu=NVIDIA H200, state=ready) [fallback from x: y]"
    assert parse_health(text) == {
        "engine": "cosyvoice",
        "gpu": "NVIDIA H200",
        "state": "ready",
        "note": "fallback from x: y",
    }
    assert parse_health("Piper TTS") is None
    nested = "X (engine: cosyvoice; lifecycle=parked (host), concurrency=1 (auto: 1, on the CPU), state=ready) [n]"
    assert parse_health(nested) == {
        "engine": "cosyvoice",
        "lifecycle": "parked (host)",
        "concurrency": "1 (auto: 1, on the CPU)",
        "state": "ready",
        "note": "n",
    }
