"""SIGTERM on a real `python -m wyoming_cosyvoice serve` process: stop accepting, finish in-flight audio, exit 0."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from wyoming.client import AsyncTcpClient
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop

from .helpers import TIMEOUT, collect, start_server, write_config

ROOT = Path(__file__).resolve().parents[1]


def archived(folder: Path) -> list[float]:
    """Durations of the WAVs a server-side wav sink left; no temporary (partial) file may remain."""
    import soundfile

    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if not n.endswith(".wav")], f"partial files left: {names}"
    return [soundfile.info(str(folder / n)).duration for n in names]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
async def test_sigterm_finishes_in_flight_audio_then_exits_0(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGHUP (a closed terminal, `kill -HUP`) stops the same way: it used to kill the process, cutting the reply."""
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
        proc.send_signal(sig)
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


class StderrLines:
    """The server's log lines, read in a thread (the test polls them instead of sleeping)."""

    def __init__(self, proc: "subprocess.Popen[str]") -> None:
        self.lines: list[str] = []
        assert proc.stderr is not None
        self._thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)


async def poll(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Wait until `condition()` holds (fails after a generous `timeout`)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def refused(port: int) -> bool:
    """True once the server no longer accepts connections."""
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    except OSError:
        return True
    writer.close()
    return False


async def test_sigterm_lets_an_open_stream_finish_between_sentences(tmp_path: Path) -> None:
    """A stream waiting for its next sentence at SIGTERM may finish within the grace period; a new one is refused."""
    proc, port = start_server(write_config(tmp_path, limits={"shutdown_grace_s": 20.0}))
    log = StderrLines(proc)
    try:
        client = AsyncTcpClient("127.0.0.1", port)
        await asyncio.wait_for(client.connect(), TIMEOUT)
        await client.write_event(SynthesizeStart().event())
        await client.write_event(SynthesizeChunk(text="The first sentence. ").event())
        start = await asyncio.wait_for(client.read_event(), TIMEOUT)
        assert start is not None and start.type == "audio-start"
        # The first sentence is done (its request line is logged): the stream now waits for more text.
        await poll(lambda: re.search(r"request \d+: voice=", log.text()) is not None)
        proc.send_signal(signal.SIGTERM)
        while not await refused(port):  # the server is stopping
            await asyncio.sleep(0.05)
        await client.write_event(SynthesizeChunk(text="And the second one.").event())
        await client.write_event(SynthesizeStop().event())
        reply = await collect(client, until="synthesize-stopped", timeout=60)
        assert not reply.errors and reply.stopped and reply.stops == 1
        seconds = len(reply.audio) / 2 / start.data["rate"]
        assert seconds > 1.0, f"only {seconds:.2f} s of audio after SIGTERM"
        # The stream is over: a new one on the same connection is refused.
        with contextlib.suppress(ConnectionError):
            await client.write_event(SynthesizeStart().event())
            refusal = await collect(client, timeout=10)
            assert [e.code for e in refusal.errors] in (["ServerBusy"], [])
        await client.disconnect()
        assert await asyncio.to_thread(proc.wait, 60) == 0
        await poll(lambda: "Server stopped" in log.text())
        assert len(re.findall(r"request \d+: voice=", log.text())) == 2, log.text()
        assert "Traceback" not in log.text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_sighup_ignored_by_nohup_stays_ignored(tmp_path: Path) -> None:
    proc, port = start_server(write_config(tmp_path), preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        proc.send_signal(signal.SIGHUP)
        client = AsyncTcpClient("127.0.0.1", port)
        await asyncio.wait_for(client.connect(), TIMEOUT)
        await client.write_event(Synthesize(text="Still here.").event())
        reply = await collect(client)
        await client.disconnect()
        assert not reply.errors and reply.stops == 1 and proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
