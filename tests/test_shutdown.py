"""SIGTERM on a real `python -m wyoming_cosyvoice serve` process: stop accepting, finish in-flight audio, exit 0."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path

import pytest
from wyoming.client import AsyncTcpClient
from wyoming.tts import Synthesize

from .helpers import TIMEOUT, collect, start_server, write_config

ROOT = Path(__file__).resolve().parents[1]


def archived(folder: Path) -> list[float]:
    """Durations of the WAVs a server-side wav sink left; no temporary (partial) file may remain."""
    import soundfile

    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if not n.endswith(".wav")], f"partial files left: {names}"
    return [soundfile.info(str(folder / n)).duration for n in names]


async def test_sigterm_finishes_in_flight_audio_then_exits_0(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    config = write_config(tmp_path, limits={"shutdown_grace_s": 20.0}, sinks={"wav": {"dir": str(archive)}})
    proc, port = start_server(config)
    try:
        long_text = "This is a long answer that is still being spoken when the server is told to stop. " * 12
        client = AsyncTcpClient("127.0.0.1", port)
        await asyncio.wait_for(client.connect(), TIMEOUT)
        await client.write_event(Synthesize(text=long_text).event())
        first = await asyncio.wait_for(client.read_event(), TIMEOUT)
        assert first is not None and first.type == "audio-start"
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        # No new connections once stopping.
        with pytest.raises(OSError):
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
        # The request in flight still gets all of its audio.
        reply = await collect(client, timeout=60)
        await client.disconnect()
        assert not reply.errors and reply.stops == 1
        seconds = len(reply.audio) / 2 / first.data["rate"]
        assert seconds > 40, f"only {seconds:.1f} s of audio"
        assert await asyncio.to_thread(proc.wait, 60) == 0
        assert proc.stderr is not None
        log = proc.stderr.read()
        assert "Server stopped" in log and "Traceback" not in log
        # The synthesis really was in flight at SIGTERM: its summary line is logged after "Stopping".
        assert log.index("Stopping") < re.search(r"request \d+: voice=", log).start(), log
        # The server-side archive holds the whole reply, complete and valid.
        durations = archived(archive)
        assert len(durations) == 1 and abs(durations[0] - seconds) < 0.01
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_grace_period_over_closes_connections_and_exits_0(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    config = write_config(tmp_path, limits={"shutdown_grace_s": 0.5}, sinks={"wav": {"dir": str(archive)}})
    proc, port = start_server(config)
    try:
        client = AsyncTcpClient("127.0.0.1", port)
        await asyncio.wait_for(client.connect(), TIMEOUT)
        # ~9600 characters, about 10 minutes of speech: espeak needs seconds for it, far more than the 0.5 s grace.
        await client.write_event(Synthesize(text="A very long text that will not finish in time. " * 200).event())
        assert (await asyncio.wait_for(client.read_event(), TIMEOUT)).type == "audio-start"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        reply = await collect(client, timeout=30)
        await client.disconnect()
        assert reply.stops == 0, "cut off at the end of the grace period"
        assert await asyncio.to_thread(proc.wait, 30) == 0
        assert time.monotonic() - started < 10
        # The cut-off reply is archived as a valid WAV of what was made; no partial file remains.
        durations = archived(archive)
        assert len(durations) == 1 and durations[0] > 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
