"""The worker-to-loop hand-off (one request's chunks), the slots several requests hold, and a ThreadedEngine with
several requests in flight: overlap, order, a hung request replaced without stopping the others."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Iterator

import pytest

from wyoming_cosyvoice.engine import SynthesisOptions, ThreadedEngine
from wyoming_cosyvoice.errors import EngineTimeout
from wyoming_cosyvoice.handoff import Handoff, HandoffKind, RequestCancelled
from wyoming_cosyvoice.voices import VoiceProfile
from wyoming_cosyvoice.workers import Slots

PROFILE = VoiceProfile(name="v")


async def test_items_come_in_order_with_one_wake_up_for_a_burst() -> None:
    loop = asyncio.get_running_loop()
    handoff = Handoff(loop, limit=10_000)
    wakes = 0
    wake = handoff._wake

    def counted() -> None:
        nonlocal wakes
        wakes += 1
        wake()

    handoff._wake = counted  # type: ignore[method-assign]
    thread = threading.Thread(target=lambda: [handoff.emit(bytes([n]) * 10) for n in range(50)])
    thread.start()
    thread.join()
    got = [await handoff.take(5) for _ in range(50)]
    assert [item[0] for _, item in got] == list(range(50))
    assert wakes < 50, "a worker that runs ahead does not wake the loop once per chunk"


async def test_alive_items_are_never_handed_out_and_nothing_is_a_timeout() -> None:
    handoff = Handoff(asyncio.get_running_loop(), limit=10_000)
    handoff.post(HandoffKind.ALIVE)
    handoff.post(HandoffKind.CHUNK, b"ab")
    assert await handoff.take(5) == ("chunk", b"ab")
    with pytest.raises(asyncio.TimeoutError):
        await handoff.take(0.05)


async def test_backpressure_waits_at_the_limit_and_resumes_under_half() -> None:
    handoff = Handoff(asyncio.get_running_loop(), limit=100)
    made = []

    def worker() -> None:
        try:
            for n in range(30):
                handoff.emit(b"x" * 10)
                made.append(n)
        except RequestCancelled:
            made.append(-1)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while len(made) < 10 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # a worker that did not stop at the limit would show it now (can only miss a bug)
    assert len(made) == 10, "the worker stops 100 bytes ahead"
    for _ in range(4):  # 60 bytes still ahead: above the low-water mark (50)
        kind, item = await handoff.take(5)
        handoff.taken(len(item))
    await asyncio.sleep(0.05)
    assert len(made) == 10, "no trickle of one chunk per chunk taken"
    kind, item = await handoff.take(5)
    handoff.taken(len(item))  # 50 ahead: it resumes, in a burst up to the limit
    while len(made) < 15 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert len(made) == 15
    handoff.cancel.set()
    thread.join(5)
    assert not thread.is_alive() and made[-1] == -1, "a cancelled worker waiting for room stops"


def test_a_cancelled_consumer_stops_the_worker_at_its_next_chunk() -> None:
    loop = asyncio.new_event_loop()
    try:
        handoff = Handoff(loop, limit=100)
        handoff.cancel.set()
        with pytest.raises(RequestCancelled):
            handoff.emit(b"x")
    finally:
        loop.close()


async def test_slots_first_come_first_served_and_exclusive_calls_wait_for_all() -> None:
    slots = Slots(2)
    a, b = await slots.acquire(), await slots.acquire()
    assert {a, b} == {0, 1} and slots.held == 2
    order: list[str] = []

    async def request(name: str) -> None:
        slot = await slots.acquire()
        order.append(name)
        await asyncio.sleep(0)
        slots.release(slot)

    async def exclusive() -> None:
        await slots.acquire_all()
        order.append("exclusive")
        assert slots.held == 2
        slots.release_all()

    tasks = [asyncio.ensure_future(c) for c in (request("r1"), exclusive(), request("r2"))]
    await asyncio.sleep(0.01)
    assert order == [] and slots.waiting == 3
    slots.release(a)
    await asyncio.sleep(0.01)
    assert order == ["r1"], "the exclusive call waits for every slot; r2 arrived after it and waits behind it"
    slots.release(b)
    await asyncio.gather(*tasks)
    assert order == ["r1", "exclusive", "r2"] and slots.held == 0


async def test_a_waiter_that_gives_up_leaves_no_slot_behind() -> None:
    slots = Slots(1)
    held = await slots.acquire()
    waiter = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    slots.release(held)
    assert await asyncio.wait_for(slots.acquire(), 1) == 0
    with pytest.raises(RuntimeError, match="resized while held"):
        slots.resize(3)


class MeetingEngine(ThreadedEngine):
    """Each request waits for `meet` requests to be in `generate` at once (a barrier), then makes `text` chunks;
    "HANG" blocks without looking at the cancel flag."""

    name = "meeting"

    def __init__(self, meet: int, concurrency: int) -> None:
        super().__init__()
        self.sample_rate = 16000
        self.set_concurrency(concurrency)
        self.barrier = threading.Barrier(meet, timeout=30)
        self.release = threading.Event()
        self.threads: set[str] = set()

    def generate(
        self, text: str, profile: VoiceProfile, options: SynthesisOptions, cancel: threading.Event
    ) -> Iterator[bytes]:
        self.threads.add(threading.current_thread().name)
        if text == "HANG":
            self.release.wait(60)
            return
        self.barrier.wait()
        for _ in range(int(text)):
            time.sleep(0.002)
            yield b"\x01\x00" * 160


async def count(engine: ThreadedEngine, text: str, timeout: float | None = None) -> int:
    return len([c async for c in engine.synthesize(text, PROFILE, SynthesisOptions(timeout=timeout))])


async def test_requests_run_at_once_up_to_the_concurrency_each_on_its_own_thread() -> None:
    engine = MeetingEngine(meet=3, concurrency=3)
    try:
        # All three must be in generate() at the same time to pass the barrier.
        assert await asyncio.wait_for(asyncio.gather(*(count(engine, "20") for _ in range(3))), 60) == [20] * 3
        assert len(engine.threads) == 3 and engine.in_flight == engine.queued == 0
    finally:
        await engine.close()


async def test_requests_beyond_the_concurrency_queue_in_order() -> None:
    engine = MeetingEngine(meet=1, concurrency=2)
    try:
        tasks = [asyncio.ensure_future(count(engine, "200")) for _ in range(4)]
        deadline = time.monotonic() + 30
        while engine.in_flight + engine.queued < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert engine.in_flight <= 2 and engine.in_flight + engine.queued == 4
        assert await asyncio.wait_for(asyncio.gather(*tasks), 60) == [200] * 4
    finally:
        await engine.close()


async def test_a_hung_request_is_replaced_without_stopping_the_others() -> None:
    engine = MeetingEngine(meet=1, concurrency=2)
    try:
        hung = asyncio.ensure_future(count(engine, "HANG", timeout=1.0))
        others = [await asyncio.wait_for(count(engine, "50", timeout=30), 60) for _ in range(3)]
        assert others == [50, 50, 50], "the other slot serves while one thread hangs"
        with pytest.raises(EngineTimeout):
            await asyncio.wait_for(hung, 30)
        assert engine.restarts == 1
        # Both slots serve again (the hung slot on a fresh thread).
        engine.barrier = threading.Barrier(2, timeout=30)
        assert await asyncio.wait_for(asyncio.gather(count(engine, "5"), count(engine, "5")), 60) == [5, 5]
    finally:
        engine.release.set()
        await engine.close()
