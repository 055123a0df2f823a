"""The worker-thread bridge: chunks flow as made, one request at a time, cancellation between chunks, errors."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable, Iterator

import pytest

from wyoming_cosyvoice.engine import SynthesisOptions, ThreadedEngine
from wyoming_cosyvoice.errors import EngineError
from wyoming_cosyvoice.voices import VoiceProfile

PROFILE = VoiceProfile(name="v")


class CountingEngine(ThreadedEngine):
    """Emits `text` as a number of 10 ms chunks, sleeping `delay` per chunk, and records what it did."""

    name = "counting"

    def __init__(self, delay: float = 0.01) -> None:
        super().__init__()
        self.sample_rate = 16000
        self.delay = delay
        self.produced = 0
        self.intervals: list[tuple[float, float]] = []
        self.threads: set[str] = set()

    def generate(
        self, text: str, profile: VoiceProfile, options: SynthesisOptions, cancel: threading.Event
    ) -> Iterator[bytes]:
        start = time.monotonic()
        self.threads.add(threading.current_thread().name)
        try:
            if text == "fail":
                raise RuntimeError("CUDA out of memory")
            for _ in range(int(text)):
                time.sleep(self.delay)
                self.produced += 1
                yield b"\x01\x00" * 160
        finally:
            self.intervals.append((start, time.monotonic()))


async def test_chunks_arrive_while_generating() -> None:
    engine = CountingEngine(delay=0.05)
    arrivals = []
    t0 = time.monotonic()
    async for chunk in engine.synthesize("5", PROFILE, SynthesisOptions()):
        arrivals.append(time.monotonic() - t0)
        assert chunk.rate == 16000 and chunk.samples == 160
    assert len(arrivals) == 5
    assert arrivals[0] < arrivals[-1] - 0.1, "first chunk came before the last was made"
    await engine.close()


async def test_requests_run_one_at_a_time_on_one_thread() -> None:
    engine = CountingEngine(delay=0.005)

    async def run() -> int:
        return sum([1 async for _ in engine.synthesize("10", PROFILE, SynthesisOptions())])

    assert await asyncio.gather(run(), run(), run()) == [10, 10, 10]
    assert len(engine.threads) == 1
    spans = sorted(engine.intervals)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end, "two requests overlapped on the model"
    await engine.close()


async def test_closing_the_iterator_cancels_between_chunks() -> None:
    engine = CountingEngine(delay=0.01)
    stream = engine.synthesize("1000", PROFILE, SynthesisOptions())
    async for _ in stream:
        break
    await stream.aclose()
    await asyncio.sleep(0.1)
    produced = engine.produced
    assert produced < 30, f"engine kept going after cancel: {produced} chunks"
    await asyncio.sleep(0.1)
    assert engine.produced == produced, "engine still producing after cancel"
    # The worker is free for the next request.
    assert sum([1 async for _ in engine.synthesize("3", PROFILE, SynthesisOptions())]) == 3
    await engine.close()


async def test_engine_exception_becomes_engine_error_and_engine_recovers() -> None:
    engine = CountingEngine()
    # An out-of-memory error is an EngineError too (EngineOutOfMemory, after cached memory is released).
    with pytest.raises(EngineError, match="counting engine ran out of memory .*CUDA out of memory"):
        async for _ in engine.synthesize("fail", PROFILE, SynthesisOptions()):
            pass
    assert sum([1 async for _ in engine.synthesize("2", PROFILE, SynthesisOptions())]) == 2
    await engine.close()


async def test_disconnect_cancels_engine_work_through_server(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A client that leaves mid-synthesis: the engine stops within a chunk or two."""
    import types

    from wyoming.tts import Synthesize

    from wyoming_cosyvoice.config import load_config
    from wyoming_cosyvoice.hookspecs import hookimpl
    from wyoming_cosyvoice.plugins import Plugins

    from .helpers import connect, read, running_server, write_config

    engine = CountingEngine(delay=0.01)

    @hookimpl
    def register_engines(register):  # type: ignore[no-untyped-def]
        register("counting", lambda section: engine)

    module = types.ModuleType("counting_plugin")
    module.register_engines = register_engines  # type: ignore[attr-defined]
    config = load_config(write_config(tmp_path, engine={"name": "counting", "fallback": None}))
    async with running_server(config, Plugins(extra=(module,))) as server:
        async with connect(server) as client:
            await client.write_event(Synthesize(text="100000").event())
            assert (await read(client)).type == "audio-start"
            assert (await read(client)).type == "audio-chunk"
        for _ in range(100):
            if server.service.concurrency_limit.active == 0 and not engine.busy:
                break
            await asyncio.sleep(0.02)
        assert not engine.busy and server.service.concurrency_limit.active == 0
        stopped_at = engine.produced
        assert stopped_at < 200
        await asyncio.sleep(0.1)
        assert engine.produced == stopped_at


async def test_slow_reader_does_not_hold_up_the_next_request() -> None:
    """The worker moves on once a request's audio is made; a consumer that has not read it yet blocks nobody."""
    engine = CountingEngine(delay=0.0)
    first = engine.synthesize("50", PROFILE, SynthesisOptions())
    await first.__anext__()  # then this consumer stops reading for a while

    async def second() -> int:
        return len([chunk async for chunk in engine.synthesize("5", PROFILE, SynthesisOptions())])

    assert await asyncio.wait_for(second(), 10) == 5
    rest = [chunk async for chunk in first]
    assert len(rest) == 49, "the paused request still gets all of its audio"
    await engine.close()


async def test_worker_waits_when_consumer_is_far_behind() -> None:
    """Audio made ahead of the consumer is bounded (MAX_AHEAD_SECONDS), so a stalled reader holds bounded memory."""
    engine = CountingEngine(delay=0.0)
    per_chunk = 320  # bytes
    limit_chunks = engine.max_ahead_bytes() // per_chunk
    stream = engine.synthesize(str(limit_chunks * 3), PROFILE, SynthesisOptions())
    await stream.__anext__()
    # Poll for the bound (a loaded machine takes longer than any fixed sleep to make 3000 chunks)...
    assert await until(lambda: engine.produced >= limit_chunks), "the worker runs ahead up to the bound"
    # ...then give a worker that did not stop there time to show it (this wait can only miss a bug, never fail).
    await asyncio.sleep(0.1)
    assert limit_chunks <= engine.produced <= limit_chunks + 2
    await stream.aclose()
    await engine.close()


async def until(condition: Callable[[], bool], limit: float = 10.0) -> bool:
    """Poll `condition` every 10 ms for up to `limit` s; its last value."""
    deadline = time.monotonic() + limit
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return condition()


async def test_waiting_worker_resumes_in_bursts_and_delivers_everything() -> None:
    """A worker stopped at the bound waits until the consumer is back under half of it, then goes on in a burst."""
    engine = CountingEngine(delay=0.0)
    limit_chunks = engine.max_ahead_bytes() // 320
    total = limit_chunks * 3
    stream = engine.synthesize(str(total), PROFILE, SynthesisOptions(timeout=10.0))
    taken = 1
    await stream.__anext__()
    assert await until(lambda: engine.produced >= limit_chunks), "the worker runs ahead up to the bound"
    await asyncio.sleep(0.3)
    stopped_at = engine.produced
    assert stopped_at <= limit_chunks + 2, "and stops there"
    for _ in range(limit_chunks // 2 - 10):  # still above half the bound: the worker stays put
        await stream.__anext__()
        taken += 1
    await asyncio.sleep(0.3)
    assert engine.produced == stopped_at, "no trickle of one chunk per chunk taken"
    for _ in range(12):  # now under half: it resumes and fills up to the bound again
        await stream.__anext__()
        taken += 1
    assert await until(lambda: engine.produced >= taken + limit_chunks - 2), "resumed with a burst"
    rest = [chunk async for chunk in stream]
    assert taken + len(rest) == total == engine.produced
    await engine.close()
