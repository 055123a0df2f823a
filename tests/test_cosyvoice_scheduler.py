"""The CosyVoice scheduler's choices (pure; a fake clock): which stream runs the shared flow + vocoder next, when an
LLM thread steps aside, whether one more stream fits, and where a stream ahead of playback cuts its next chunk."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Optional

import pytest

from wyoming_cosyvoice_plugins.cosyvoice.chunking import ChunkGrid, cut_due, grid_floor, grown_end, on_grid
from wyoming_cosyvoice_plugins.cosyvoice.scheduler import (
    BATCH_PROBE_EVERY,
    Batch,
    BatchFailed,
    Costs,
    FlowScheduler,
    Stream,
    load,
    pick,
    real_time_overload,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def started(first_out: float, sent: float, cost: float = 0.2) -> Stream:
    return Stream(arrived=first_out - 1, first_out=first_out, sent=sent, cost=cost, waiting=True)


def fresh(arrived: float, cost: float = 0.2) -> Stream:
    return Stream(arrived=arrived, cost=cost, waiting=True)


def test_the_stream_closest_to_running_dry_goes_first() -> None:
    now = 100.0
    a = started(first_out=95.0, sent=9.0)  # dry at 104: 4 s ahead
    b = started(first_out=98.0, sent=2.5)  # dry at 100.5
    c = started(first_out=90.0, sent=12.0)  # dry at 102
    assert pick([a, b, c], now) is b
    assert pick([a, c], now) is c
    assert pick([], now) is None


def test_a_new_request_goes_ahead_of_streams_with_seconds_buffered() -> None:
    now = 100.0
    buffered = started(first_out=95.0, sent=9.0)  # 4 s ahead
    new, newer = fresh(arrived=99.0), fresh(arrived=99.5)
    assert pick([buffered, newer, new], now) is new, "first come, first served among new requests"
    # A stream that would run dry if the new one's pass ran first keeps its turn: 0.5 s ahead, its own pass 0.2 s,
    # the new one's 0.2 s: 0.1 s left, under the 0.3 s margin.
    close = started(first_out=98.0, sent=2.5)
    assert pick([close, new], now) is close
    # ...and once it has run, the new one is next.
    assert pick([buffered, new], now) is new
    # A new request whose pass is long waits for a stream that would not survive it.
    slow = fresh(arrived=99.0, cost=3.9)
    assert pick([buffered, slow], now) is buffered


def test_only_one_pass_runs_at_a_time_in_pick_order() -> None:
    clock = Clock()
    sched = FlowScheduler(1, clock)
    first, second, third = sched.open(), sched.open(), sched.open()
    assert sched.acquire(first, 0.1, lambda: False)
    order: list[str] = []

    def wait(stream: Stream, name: str) -> None:
        assert sched.acquire(stream, 0.1, lambda: False, poll=0.01)
        order.append(name)
        sched.release(stream, 1.0)

    # `second` has played audio and is about to run dry; `third` is new: it waits for `second`.
    second.first_out, second.sent = clock.now - 2.0, 2.3
    threads = [threading.Thread(target=wait, args=(s, n)) for s, n in ((third, "third"), (second, "second"))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while not (second.waiting and third.waiting) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert order == [], "the flow is taken"
    sched.release(first, 1.0)
    for t in threads:
        t.join(10)
    assert order == ["second", "third"]
    assert first.first_out == clock.now and first.sent == 1.0, "the first pass starts the playback clock"


def test_a_stopped_or_closed_waiter_gives_up_and_a_closed_holder_frees_the_flow() -> None:
    sched = FlowScheduler(1, Clock())
    holder, waiter = sched.open(), sched.open()
    assert sched.acquire(holder, 1.0, lambda: False)
    stop = threading.Event()
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(sched.acquire(waiter, 1.0, stop.is_set, poll=0.01)))
    thread.start()
    stop.set()
    thread.join(10)
    assert result == [False] and not waiter.waiting
    # A hung holder given up (closed) frees the flow for the others.
    other = sched.open()
    got: list[bool] = []
    thread = threading.Thread(target=lambda: got.append(sched.acquire(other, 1.0, lambda: False, poll=0.01)))
    thread.start()
    sched.close(holder)
    thread.join(10)
    assert got == [True] and sched.open_streams == 2


def test_trt_contexts_let_that_many_passes_run_at_once() -> None:
    sched = FlowScheduler(2, Clock())
    a, b, c = sched.open(), sched.open(), sched.open()
    assert sched.acquire(a, 0.1, lambda: False) and sched.acquire(b, 0.1, lambda: False)
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    assert not sched.acquire(c, 0.1, stop.is_set, poll=0.01), "two contexts: the third pass waits"


def test_an_llm_well_ahead_steps_aside_for_an_urgent_stream() -> None:
    clock = Clock()
    sched = FlowScheduler(1, clock)
    ahead = sched.open()
    ahead.first_out, ahead.sent = clock.now - 1.0, 5.0  # 4 s of audio buffered
    assert sched.llm_may_run(ahead), "alone: no reason to pause"
    newcomer = sched.open()  # waiting for its first chunk: urgent
    assert not sched.llm_may_run(ahead)
    assert sched.llm_may_run(newcomer)
    newcomer.first_out, newcomer.sent = clock.now, 3.0  # now 3 s ahead: no longer urgent
    assert sched.llm_may_run(ahead)
    behind = Stream(arrived=0, first_out=clock.now - 1.0, sent=1.5)  # 0.5 s from running dry
    sched._streams.append(behind)
    assert not sched.llm_may_run(ahead)
    ahead.sent = 2.0  # only 1 s buffered: its own LLM must run
    assert sched.llm_may_run(ahead)
    ahead.in_hand = 3.5  # ...unless its tokens not yet through the flow already hold 3.5 s more
    assert not sched.llm_may_run(ahead)


def test_admission_adds_up_the_measured_costs() -> None:
    assert real_time_overload(0, (5.0, 5.0)) is None, "a lone request is always served"
    assert real_time_overload(3, None) is None, "nothing measured yet"
    # 0.1 s of LLM + 0.1 s of flow per second of audio: 5 streams need 100%, the 6th does not fit.
    assert load(4, 0.1, 0.1) == pytest.approx(0.8)
    assert real_time_overload(4, (0.1, 0.1)) is None
    why = real_time_overload(5, (0.1, 0.1))
    assert why is not None and "5 streams in flight need 100%" in why and "one more would need 120%" in why
    assert real_time_overload(4, (0.1, 0.1), safety=1.25) is not None, "a stricter limit"
    # vLLM batches the LLM calls (about one stream's need); two TensorRT contexts halve the flow's share.
    assert load(5, 0.1, 0.1, llm_batched=True) == pytest.approx(0.6)
    assert load(5, 0.1, 0.1, flow_slots=2) == pytest.approx(0.75)
    assert real_time_overload(5, (0.1, 0.1), llm_batched=True) is None


def test_costs_are_moving_averages_of_calls_that_ran_alone() -> None:
    costs = Costs()
    assert costs.per_stream() is None
    costs.observe(0.004, flow_s=1.0, audio_s=10.0)
    assert costs.per_stream() == pytest.approx((0.1, 0.1))
    costs.observe(0.008, flow_s=0.1, audio_s=0.2)  # a short reply: its LLM rate counts, its flow share does not
    llm, flow = costs.per_stream() or (0, 0)
    assert llm == pytest.approx((0.004 + 0.3 * 0.004) * 25) and flow == pytest.approx(0.1)


def test_the_warm_ups_costs_hold_only_until_a_real_call() -> None:
    costs = Costs()
    costs.observe(0.005, flow_s=2.6, audio_s=5.0)  # the cold warm-up: 0.52 s of flow per second of audio
    costs.provisional = True
    costs.observe(0.004, flow_s=0.2, audio_s=0.3)  # a short reply: its LLM rate replaces, its flow share waits
    assert costs.per_stream() == pytest.approx((0.1, 0.52)) and costs.provisional
    costs.observe(0.004, flow_s=2.6, audio_s=10.0)
    assert costs.per_stream() == pytest.approx((0.1, 0.26)), "replaced, not averaged with the warm-up"
    assert not costs.provisional
    costs.observe(0.004, flow_s=3.6, audio_s=10.0)
    assert costs.per_stream() == pytest.approx((0.1, 0.26 + 0.3 * 0.1)), "then moving averages again"


def test_streams_that_need_more_than_the_model_are_overloaded() -> None:
    from wyoming_cosyvoice_plugins.cosyvoice.stream import Streaming

    streaming = Streaming(early_first_chunk=True, sample_rate=24000)
    first, second, third = streaming.scheduler.open(), streaming.scheduler.open(), streaming.scheduler.open()
    assert not streaming.overloaded(), "nothing measured yet"
    streaming.costs.observe(0.006, flow_s=2.6, audio_s=10.0)  # LLM 0.15 + flow 0.26 s per second of audio
    assert streaming.overloaded(), "three streams need 123% of the model's time: cuts would only add passes"
    streaming.scheduler.close(third)
    assert not streaming.overloaded(), "two need 82%"
    batched = Streaming(early_first_chunk=True, sample_rate=24000, llm_batched=True)
    for _ in range(3):
        batched.scheduler.open()
    batched.costs.observe(0.006, flow_s=2.6, audio_s=10.0)
    assert not batched.overloaded(), "vLLM batches the LLM calls: 0.15 + 3 x 0.26 = 93%"
    streaming.scheduler.close(second)
    streaming.scheduler.close(first)


def flat(seconds: Optional[float]):  # type: ignore[no-untyped-def]
    return lambda tokens: seconds


def test_the_chunk_grid() -> None:
    # 76 prompt tokens: chunks end where prompt + tokens is a multiple of 25 (24, 49, 74...).
    assert [e for e in range(100) if on_grid(e, 76)] == [24, 49, 74, 99]
    assert grid_floor(60, 76) == 49 and grid_floor(49, 76) == 49 and grid_floor(20, 76) == -1


def test_a_stream_ahead_of_playback_grows_its_next_chunk() -> None:
    grid = ChunkGrid(prompt_tokens=75, lookahead=3)
    # 1 s ahead, tokens coming at 5 ms each, passes of 0.1 s: doubling while it fits 1 s / 1.5.
    # 50 tokens: 53 x 5 ms + 0.1 = 0.365 s ok; 100: 0.615 ok; 200: 1.115 s x 1.5 > 1 s: no.
    assert grown_end(grid, 100, 25, 103, False, 1.0, 0.005, flat(0.1)) == 200
    # Far ahead: up to MAX_GROWN_HOP (800 tokens).
    assert grown_end(grid, 100, 25, 103, False, 60.0, 0.005, flat(0.1)) == 900
    # Not ahead enough even for the default: the default (upstream's size) all the same.
    assert grown_end(grid, 100, 25, 103, False, 0.1, 0.005, flat(0.1)) == 125
    # The LLM can make no more than `limit` tokens: no chunk waits for tokens that cannot come.
    assert grown_end(dataclasses.replace(grid, limit=300), 100, 25, 103, False, 60.0, 0.005, flat(0.1)) == 200
    # The LLM has ended and one final pass over everything fits: None (finish now, one pass).
    assert grown_end(grid, 100, 25, 400, True, 1.0, 0.005, flat(0.2)) is None
    # ...and when it does not fit, a chunk out of the tokens there are (nothing to wait for).
    assert grown_end(grid, 100, 25, 400, True, 0.25, 0.005, flat(0.2)) == 125
    # Other streams' passes ahead of it count: 0.5 s of waiting makes 200 tokens too late.
    assert grown_end(grid, 100, 25, 103, False, 1.5, 0.005, flat(0.1), wait=0.5) == 150
    # The grid from the start of a call (offset 0) is kept: 60 prompt tokens, first end 40, then 90, 190...
    end = grown_end(ChunkGrid(prompt_tokens=60, lookahead=3), 0, 40, 43, False, 10.0, 0.001, flat(0.05))
    assert end is not None and on_grid(end, 60) and end > 40


def test_a_stream_waiting_for_a_grown_chunk_cuts_when_due() -> None:
    assert not cut_due(slack=2.0, flow=0.5, wait=0.0)
    assert cut_due(slack=0.7, flow=0.5, wait=0.0), "1.5 x 0.5 s >= 0.7 s: cut now"
    assert cut_due(slack=1.0, flow=0.3, wait=0.4)
    assert not cut_due(slack=0.1, flow=None, wait=0.0), "no measured cost: no basis for a cut"


def test_a_longer_first_chunk_when_upstreams_would_run_dry() -> None:
    from wyoming_cosyvoice_plugins.cosyvoice.chunking import first_size

    grid = ChunkGrid(prompt_tokens=76, hop=25, max_hop=100, scale=2, lookahead=3)  # upstream's first chunk: 49 tokens
    # Alone on a fast machine: upstream's first chunk keeps ahead.
    assert first_size(grid, 49, seconds_per_token=0.005, cost=flat(0.1)) == 49
    # Sharing the flow with three others (each pass counted 4x: 1.2 s): 49 tokens (1.8 s of audio) would run dry
    # before the 50 tokens after it (0.25 s of LLM + 1.2 s, x1.5); 74 tokens do not.
    assert first_size(grid, 49, seconds_per_token=0.005, cost=flat(1.2)) == 74
    # Heavier still: 124 tokens (upstream's own first chunk from its second request on).
    assert first_size(grid, 49, seconds_per_token=0.005, cost=flat(1.8)) == 124
    # Nothing keeps ahead (an LLM slower than real time), or no pass timed yet: upstream's, no later first audio.
    assert first_size(grid, 49, seconds_per_token=0.05, cost=flat(0.1)) == 49
    assert first_size(grid, 49, seconds_per_token=0.005, cost=flat(None)) == 49
    # A text short enough to fit in one first chunk.
    assert first_size(dataclasses.replace(grid, limit=60), 49, seconds_per_token=0.005, cost=flat(5.0)) == 74


# --- batched passes ---------------------------------------------------------------------------------------------


def grant_behind(sched: FlowScheduler, holder: Stream, waiters: list[Stream], costs: list[float]) -> list[Stream]:
    """`waiters` ask for a pass while `holder` runs one; `holder` releases; returns them in the order granted."""
    granted: list[Stream] = []
    lock = threading.Lock()

    def wait(stream: Stream, cost: float) -> None:
        assert sched.acquire(stream, cost, lambda: False, poll=0.01)
        with lock:
            granted.append(stream)

    threads = [threading.Thread(target=wait, args=(s, c)) for s, c in zip(waiters, costs, strict=True)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while sched.waiting < len(waiters) and time.monotonic() < deadline:
        time.sleep(0.005)
    sched.release(holder, 1.0)
    deadline = time.monotonic() + 30
    while len(granted) < len(waiters) and time.monotonic() < deadline:
        time.sleep(0.005)
        if len(granted) == 1 and granted[0].batch is None:
            break  # granted alone: the others wait for its release
    return granted


def test_passes_ready_together_are_granted_as_one_batch_and_measured() -> None:
    sched = FlowScheduler(1, Clock(), max_batch=3)
    holder, b, c = sched.open(), sched.open(), sched.open()
    assert sched.acquire(holder, 0.4, lambda: False)
    granted = grant_behind(sched, holder, [b, c], [0.4, 0.4])
    assert sorted(map(id, granted)) == sorted(map(id, (b, c))), "both granted at once"
    assert b.batch is c.batch and b.batch is not None and b.batch.size == 2
    sched.release(b, 1.0, seconds=0.5)
    assert sched.batches == 0, "the batch is over when its last member releases"
    sched.release(c, 1.0, seconds=0.6)
    assert sched.batches == 1 and b.batch is None and c.batch is None
    # 0.6 s for two passes of 0.4 s each: the second added 0.2 s, half its own.
    assert sched.marginal == pytest.approx(0.5)
    assert sched.batch_cost([0.4, 0.4, 0.4]) == pytest.approx(0.8)


def test_only_passes_of_the_same_kind_share_a_batch() -> None:
    sched = FlowScheduler(1, Clock(), max_batch=3)
    holder, chunk, last = sched.open(), sched.open(), sched.open()
    last.final = True
    assert sched.acquire(holder, 0.4, lambda: False)
    granted = grant_behind(sched, holder, [chunk, last], [0.4, 0.4])
    assert len(granted) == 1 and granted[0].batch is None, "a chunk pass and a last pass run one after the other"
    sched.close(granted[0])
    sched.close(chunk)
    sched.close(last)


def test_a_started_stream_is_not_made_to_run_dry_by_a_batch() -> None:
    clock = Clock()
    sched = FlowScheduler(1, clock, max_batch=3)
    holder, urgent_one, relaxed = sched.open(), sched.open(), sched.open()
    urgent_one.first_out, urgent_one.sent = clock.now - 1.0, 1.7  # 0.7 s from running dry: fine alone (0.4 left)
    relaxed.first_out, relaxed.sent = clock.now - 1.0, 6.0
    assert sched.acquire(holder, 0.3, lambda: False)
    granted = grant_behind(sched, holder, [urgent_one, relaxed], [0.3, 0.3])
    assert granted == [urgent_one] and urgent_one.batch is None, "0.6 s batched would leave it 0.1 s: alone"
    sched.close(urgent_one)
    sched.close(relaxed)
    # One that runs dry even alone (0.5 s left, a 0.3 s pass, under the 0.3 s margin either way) is batched: the
    # batch's throughput serves it better than waiting one pass after another.
    holder, doomed, other = sched.open(), sched.open(), sched.open()
    doomed.first_out, doomed.sent = clock.now - 1.0, 1.5
    other.first_out, other.sent = clock.now - 1.0, 6.0
    assert sched.acquire(holder, 0.3, lambda: False)
    granted = grant_behind(sched, holder, [doomed, other], [0.3, 0.3])
    assert doomed.batch is not None and doomed.batch is other.batch


def test_batches_that_do_not_pay_are_only_probed_now_and_then() -> None:
    sched = FlowScheduler(1, Clock(), max_batch=2)
    sched.marginal = 1.0  # measured: a batch takes as long as its passes one after the other
    formed = 0
    for _ in range(BATCH_PROBE_EVERY):
        holder, a, b = sched.open(), sched.open(), sched.open()
        assert sched.acquire(holder, 0.2, lambda: False)
        granted = grant_behind(sched, holder, [a, b], [0.2, 0.2])
        formed += granted[0].batch is not None
        for s in (holder, a, b):
            sched.close(s)
    assert formed == 1


def test_a_batch_runs_once_for_its_members_and_a_member_that_leaves_holds_nobody_up() -> None:
    members = [Stream(arrived=0.0) for _ in range(3)]
    batch = Batch(members)
    runs: list[list[int]] = []
    results: dict[int, int] = {}

    def run(inputs: list[int]) -> list[int]:
        runs.append(sorted(inputs))
        return [x * 10 for x in inputs]

    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, batch.meet(members[i], i, run))) for i in range(2)
    ]
    for t in threads:
        t.start()
    batch.leave(members[2])
    for t in threads:
        t.join(10)
    assert runs == [[0, 1]] and results == {0: 0, 1: 10}


def test_a_failed_batched_call_tells_every_member() -> None:
    members = [Stream(arrived=0.0) for _ in range(2)]
    batch = Batch(members)
    errors: list[BaseException] = []

    def run(inputs: list[int]) -> list[int]:
        raise RuntimeError("boom")

    def member(i: int) -> None:
        try:
            batch.meet(members[i], i, run)
        except BatchFailed as err:
            errors.append(err)

    threads = [threading.Thread(target=member, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(errors) == 2 and all("boom" in str(e) for e in errors)


def test_admission_counts_a_batched_streams_measured_share() -> None:
    # Two streams of 0.1 LLM + 0.4 flow per second: 100% unbatched, 80% when one more adds half its flow.
    assert load(2, 0.1, 0.4) == pytest.approx(1.0)
    assert load(2, 0.1, 0.4, flow_marginal=0.5) == pytest.approx(0.8)
    assert real_time_overload(2, (0.1, 0.4)) is not None
    assert real_time_overload(2, (0.1, 0.25), flow_marginal=0.5) is None  # three: 0.3 + 0.25 x 2 = 80%
