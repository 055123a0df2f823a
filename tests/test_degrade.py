"""Degrade, don't refuse (docs/reliability.md), through the real server and the `wyoming` client: a busy engine makes
requests wait in order, then the fallback engine (real espeak) speaks; an engine failure before the first audio is
tried once more when it may pass, else spoken by the fallback; a failure in the middle of a stream gets the rest
spoken; fallback audio comes in the format the reply announced. The voice's engine is the `fault` test engine."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop

from wyoming_cosyvoice.config import Config, load_config

from .helpers import TIMEOUT, assert_speech, collect, connect, fault_plugins, running_server, write_config

CHUNK = 640
"""Bytes per chunk of the fault engine (2 per word)."""


def config(tmp_path: Path, engine: dict[str, Any] | None = None, **server: Any) -> Config:
    return load_config(
        write_config(
            tmp_path / "cfg",
            server=server,
            engine={"name": "fault", "fallback": "espeak"},
            engines={"fault": engine or {}},
        )
    )


async def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def speak(server: Any, text: str) -> Any:
    async with connect(server) as client:
        await client.write_event(Synthesize(text=text).event())
        return await collect(client)


async def test_a_failure_before_the_first_audio_is_spoken_by_the_fallback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wyoming_cosyvoice")
    async with running_server(config(tmp_path), fault_plugins()) as server:
        assert server.service.engines.fallback is not None
        reply = await speak(server, "FAIL to say the weather today")
        assert not reply.errors and reply.stops == 1
        assert [start.rate for start in reply.starts] == [16000]  # the fault engine's, announced before it failed
        assert_speech(reply.samples(), 16000, 6)  # espeak's speech, resampled from 22050 Hz
        # A failure after the first chunk: the piece is spoken again whole, after the chunk that was sent.
        cut = await speak(server, "RAISE after one chunk please")
        assert not cut.errors and bytes(cut.audio[:CHUNK]) == bytes((await speak(server, "one")).audio[:CHUNK])
        assert_speech(cut.samples()[CHUNK // 2 :], 16000, 5)
        assert server.service.degraded.counts() == {"waited": 0, "fallback": 2, "default_voice": 0, "retried": 0}
    assert re.search(
        r"simulated engine failure; piece 1 of the reply \('FAIL to say.*'\) and the rest spoken by "
        r"the espeak engine",
        caplog.text,
    )
    assert "after 0.02 s of its audio (spoken again whole)" in caplog.text
    assert re.search(r"request \d+: voice=tars .* end=done degraded=fallback espeak", caplog.text)


async def test_a_failure_in_the_middle_of_a_stream_gets_the_rest_spoken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="wyoming_cosyvoice")
    async with running_server(config(tmp_path), fault_plugins()) as server, connect(server) as client:
        engine = server.service.engine
        await client.write_event(SynthesizeStart().event())
        await client.write_event(SynthesizeChunk(text="One two three. FAIL four five six. ").event())
        await client.write_event(SynthesizeChunk(text="Seven eight nine ten.").event())
        await client.write_event(SynthesizeStop().event())
        reply = await collect(client, until="synthesize-stopped")
        assert not reply.errors and reply.stopped and reply.stops == 1
        assert [start.rate for start in reply.starts] == [16000]  # one format for the whole reply
        assert bytes(reply.audio[: 6 * CHUNK]) == bytes((await speak(server, "One two three.")).audio)
        assert_speech(reply.samples()[3 * CHUNK :], 16000, 8)  # the rest, spoken by espeak
        assert engine.calls[:2] == ["One two three.", "FAIL four five six."]  # the last piece went to espeak
        assert "piece 2 of the reply ('FAIL four five six.') and the rest spoken by the espeak engine" in caplog.text


async def test_a_passing_failure_is_tried_once_more_on_the_same_engine(tmp_path: Path) -> None:
    async with running_server(config(tmp_path), fault_plugins()) as server:
        engine = server.service.engine
        reply = await speak(server, "OOM ONCE please")
        assert not reply.errors and len(reply.audio) == 3 * 2 * CHUNK  # the fault engine's audio, not espeak's
        assert engine.memory_released == 1 and engine.calls == ["OOM ONCE please"] * 2
        assert server.service.degraded.counts()["retried"] == 1


async def test_a_busy_engine_serves_waiting_requests_in_order(tmp_path: Path) -> None:
    async with running_server(config(tmp_path, {"room_for": 1}, busy_wait_s=60), fault_plugins()) as server:
        engine, queue = server.service.engine, server.service.room_queue(server.service.engine)
        assert queue is not None
        try:
            first = asyncio.ensure_future(speak(server, "HANG holds the engine"))
            await wait_for(lambda: engine.calls == ["HANG holds the engine"])
            later = []
            for n, text in enumerate(("second one", "third one here"), 1):
                later.append(asyncio.ensure_future(speak(server, text)))
                await wait_for(lambda n=n: queue.waiting == n)  # type: ignore[misc]
            assert engine.room() is not None and not any(task.done() for task in later)
        finally:
            engine.release.set()
        await first
        second, third = await asyncio.gather(*later)
        assert not second.errors and len(second.audio) == 2 * 2 * CHUNK
        assert not third.errors and len(third.audio) == 3 * 2 * CHUNK
        assert engine.calls == ["HANG holds the engine", "second one", "third one here"]
        assert server.service.degraded.counts()["waited"] == 2


@pytest.mark.parametrize("when_busy", ["wait", "error"])
async def test_past_the_wait_the_fallback_speaks_or_the_client_asked_for_an_error(
    tmp_path: Path, when_busy: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wyoming_cosyvoice")
    cfg = config(tmp_path, {"room_for": 1}, busy_wait_s=0.2, when_busy=when_busy)
    async with running_server(cfg, fault_plugins()) as server:
        engine = server.service.engine
        try:
            first = asyncio.ensure_future(speak(server, "HANG holds the engine"))
            await wait_for(lambda: engine.calls == ["HANG holds the engine"])
            reply = await speak(server, "Still an answer for you")
        finally:
            engine.release.set()
        assert not (await first).errors
    assert engine.calls == ["HANG holds the engine"]
    if when_busy == "error":
        assert [e.code for e in reply.errors] == ["ServerBusy"] and "at capacity" in reply.errors[0].text
        return
    assert not reply.errors and [start.rate for start in reply.starts] == [16000]
    assert_speech(reply.samples(), 16000, 5)
    assert re.search(
        r"fault engine still at capacity: 1 requests \(room_for 1\) after \d\.\d\d s \(server.busy_wait_s\)",
        caplog.text,
    )
    assert re.search(r"request \d+: voice=tars chars=23 .*end=done degraded=fallback espeak", caplog.text)


async def test_the_next_piece_of_a_reply_already_playing_goes_before_new_requests(tmp_path: Path) -> None:
    async with running_server(config(tmp_path, {"room_for": 1}, busy_wait_s=60), fault_plugins()) as server:
        engine, queue = server.service.engine, server.service.room_queue(server.service.engine)
        assert queue is not None
        async with connect(server) as stream:
            await stream.write_event(SynthesizeStart().event())
            await stream.write_event(SynthesizeChunk(text="One two. ").event())
            await wait_for(lambda: engine.calls == ["One two."] and engine.room() is None)
            try:
                holder = asyncio.ensure_future(speak(server, "HANG holds the engine"))
                await wait_for(lambda: engine.calls[-1:] == ["HANG holds the engine"])
                newcomer = asyncio.ensure_future(speak(server, "newcomer here"))
                await wait_for(lambda: queue.waiting == 1)
                await stream.write_event(SynthesizeChunk(text="Three four. ").event())
                await wait_for(lambda: queue.waiting == 2)
            finally:
                engine.release.set()
            await stream.write_event(SynthesizeStop().event())
            reply = await collect(stream, until="synthesize-stopped")
        assert not reply.errors and len(reply.audio) == 2 * 2 * 2 * CHUNK
        assert not (await holder).errors and not (await newcomer).errors
        assert engine.calls == ["One two.", "HANG holds the engine", "Three four.", "newcomer here"]
