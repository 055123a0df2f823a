"""Several streams on one CosyVoice model: who runs the shared flow + vocoder next, when an LLM thread steps aside,
and whether one more stream fits. Pure Python (no torch), thread-safe, with an injectable clock for tests.

Each request is a `Stream` with a playback clock: playback starts when its first chunk is out, so it runs dry at
`first_out + sent` (audio handed out so far). Its LLM runs in its own thread (upstream's design); the flow +
vocoder pass (`token2wav`) is where streams meet, `slots` passes at a time (1; TensorRT's `trt_concurrent`
execution contexts allow more). At each free slot the scheduler serves, among the streams waiting for a pass:
- a new request's first chunk (first come, first served), as long as every started stream that waits would still
  finish its own pass `FIRST_CHUNK_MARGIN_S` before it runs dry after the new one's pass;
- otherwise the started stream closest to running dry (the earliest playback deadline).
An LLM thread whose stream has `LLM_YIELD_LEAD_S` of audio in hand (buffered plus tokens not yet through the flow)
pauses while another stream is urgent (waiting for its first chunk, or under `URGENT_SLACK_S` from running dry),
so the urgent one's LLM gets the machine. `Costs` keeps the measured per-stream costs that admission weighs.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from .chunking import TOKENS_PER_SECOND

FIRST_CHUNK_MARGIN_S = 0.3
"""A new request's first chunk goes ahead only if each waiting stream keeps this much after it (both passes run)."""

BATCH_PAYS_BELOW = 0.9
"""Passes ready together are batched while one more member is measured to add less than this share of its own pass
alone (and until it was measured)."""

BATCH_PROBE_EVERY = 20
"""When batching was measured not to pay, every this many chances a batch runs all the same, to measure again."""

URGENT_SLACK_S = 1.5
"""A started stream this close to running dry is urgent: LLM threads of streams well ahead pause for it."""

LLM_YIELD_LEAD_S = 4.0
"""Audio in hand (buffered plus tokens made but not yet through the flow) from which a stream's LLM pauses for an
urgent stream."""

ADMIT_SAFETY = 1.0
"""One more stream is admitted only if all of them together need at most 1/ADMIT_SAFETY of the model's time. The
sum is already pessimistic (a stream's LLM and flow + vocoder partly overlap, on a GPU and on several cores), so 1."""


@dataclass(eq=False)
class Stream:
    """One request's playback clock and its place at the flow + vocoder."""

    arrived: float
    """When the request was opened (scheduler clock)."""

    first_out: Optional[float] = None
    """When its first chunk was out: playback starts then."""

    sent: float = 0.0
    """Seconds of audio handed out."""

    cost: float = 0.0
    """Predicted seconds of its pending (or running) flow + vocoder pass."""

    waiting: bool = False
    """Waiting for a flow + vocoder pass."""

    holding: bool = False
    """Its flow + vocoder pass is running."""

    in_hand: float = 0.0
    """Seconds of audio in speech tokens its LLM made that have not been through the flow yet."""

    passes: int = 0
    """Flow + vocoder passes run."""

    final: bool = False
    """Its pending pass is its last one (the flow without chunk attention: it batches only with other last ones)."""

    batch: Optional[Batch] = None
    """The batch its granted pass runs in (None: alone)."""

    def slack(self, now: float) -> Optional[float]:
        """Seconds until playback runs dry (None before the first chunk; < 0: it ran dry)."""
        return None if self.first_out is None else self.first_out + self.sent - now


def pick(waiting: Iterable[Stream], now: float, margin: float = FIRST_CHUNK_MARGIN_S) -> Optional[Stream]:
    """The stream to run the next flow + vocoder pass, among those waiting (see the module docstring)."""
    started = [s for s in waiting if s.first_out is not None]
    fresh = sorted((s for s in waiting if s.first_out is None), key=lambda s: s.arrived)
    if fresh:
        new = fresh[0]
        if all((s.slack(now) or 0.0) - s.cost - new.cost >= margin for s in started):
            return new
    if started:
        return min(started, key=lambda s: s.slack(now) or 0.0)
    return None


def urgent(stream: Stream, now: float) -> bool:
    """Waiting for its first chunk, or close to running dry."""
    slack = stream.slack(now)
    return slack is None or slack < URGENT_SLACK_S


class Batch:
    """Streams granted one flow pass together. Each member's thread runs its own pass up to the flow-matching
    decoder, where it hands its inputs in (`meet`) or says it is not coming (`leave`); the last one to arrive runs
    every member's decoder in one call (`run`) and hands each its result. Nobody waits for a member that is not
    granted already: a batch is formed from passes that were ready together."""

    def __init__(self, members: list[Stream]) -> None:
        self.members = members
        self._cond = threading.Condition()
        self._inputs: dict[int, Any] = {}
        self._gone: set[int] = set()
        self._results: Optional[dict[int, Any]] = None
        self._error: Optional[BaseException] = None
        self._running = False
        self.seconds: list[float] = []
        """Each member's pass, in seconds, as it released the flow (the batch's cost is the longest)."""
        self.released = 0

    def meet(self, stream: Stream, inputs: Any, run: Callable[[list[Any]], list[Any]]) -> Any:
        """This member's result of the batched call (`run` maps the members' inputs to their results, in order).
        When the batched call fails, every member gets a `BatchFailed` and runs its own pass alone."""
        key = id(stream)
        with self._cond:
            self._inputs[key] = inputs
            self._cond.notify_all()
            while self._results is None and self._error is None and not self._claim():
                self._cond.wait()
        if self._results is None and self._error is None:  # this thread claimed the call: run it unlocked
            keys = list(self._inputs)
            results: Optional[dict[int, Any]] = None
            error: Optional[BaseException] = None
            try:
                results = dict(zip(keys, run([self._inputs[k] for k in keys]), strict=True))
            except BaseException as err:  # every member retries alone; only one that fails again fails
                error = err
            with self._cond:
                self._results, self._error = results, error
                self._cond.notify_all()
        if self._error is not None:
            raise BatchFailed(self._error)
        assert self._results is not None
        return self._results[key]

    def _claim(self) -> bool:
        """Under the lock: every member arrived or left and nobody runs the call yet; this thread will."""
        if self._running or len(self._inputs) + len(self._gone) < len(self.members):
            return False
        self._running = True
        return True

    def leave(self, stream: Stream) -> None:
        """This member will not reach the decoder (it stopped, failed, or ran alone): nobody waits for it."""
        with self._cond:
            key = id(stream)
            if key not in self._inputs:
                self._gone.add(key)
                self._cond.notify_all()

    @property
    def size(self) -> int:
        return len(self.members)


class BatchFailed(Exception):
    """The batched decoder call failed: the member runs its own pass alone."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"batched flow pass failed: {cause!r}")
        self.cause = cause


class FlowScheduler:
    """The shared flow + vocoder of one model: passes granted in `pick` order, `slots` at a time."""

    def __init__(self, slots: int = 1, clock: Callable[[], float] = time.monotonic, max_batch: int = 1) -> None:
        self.slots = max(1, slots)
        self.clock = clock
        self.max_batch = max(1, max_batch)
        """Passes granted together at most (1: no batching)."""
        self.marginal: Optional[float] = None
        """What one more member adds to a batched pass, as a share of its own pass alone (measured; None: not yet,
        the next passes ready together are batched to measure it)."""
        self.batches = 0
        """Batched passes run (two members or more)."""
        self._declined = 0
        self._cond = threading.Condition()
        self._streams: list[Stream] = []
        self._holding = 0

    def open(self) -> Stream:
        """Register a new request."""
        with self._cond:
            stream = Stream(arrived=self.clock())
            self._streams.append(stream)
            return stream

    def close(self, stream: Stream) -> None:
        """The request ended (or was given up): it leaves, and a pass it held is free again."""
        with self._cond:
            if stream.holding:
                stream.holding = False
                self._holding -= 1
            stream.waiting = False
            if stream in self._streams:
                self._streams.remove(stream)
            self._cond.notify_all()

    @property
    def open_streams(self) -> int:
        """Requests registered now."""
        return len(self._streams)

    @property
    def waiting(self) -> int:
        """Streams waiting for a flow + vocoder pass now."""
        with self._cond:
            return sum(1 for s in self._streams if s.waiting)

    def others(self, stream: Stream) -> list[Stream]:
        """The other open streams (a snapshot)."""
        with self._cond:
            return [s for s in self._streams if s is not stream]

    def acquire(
        self,
        stream: Stream,
        cost: float,
        stop: Callable[[], bool],
        alive: Optional[Callable[[], None]] = None,
        poll: float = 0.05,
    ) -> bool:
        """Block until `stream` may run its pass (True), or until `stop()` (False). `cost`: the pass's predicted
        seconds; `alive` is called while it waits behind other streams (it is not hung)."""
        with self._cond:
            stream.cost, stream.waiting = cost, True
            if stream not in self._streams:  # closed by an abandon: never wait for nothing
                self._streams.append(stream)
            try:
                while True:
                    if stop():
                        if stream.holding:  # granted as a member of another stream's batch, but no longer wanted
                            self._drop(stream)
                        return False
                    if stream.holding:  # granted as a member of another stream's batch
                        return True
                    if self._holding < self.slots:
                        waiting = [s for s in self._streams if s.waiting]
                        now = self.clock()
                        if pick(waiting, now) is stream:
                            stream.holding = True
                            self._holding += 1
                            self._gather(stream, waiting, now)
                            return True
                    if alive is not None:
                        alive()
                    self._cond.wait(poll)
            finally:
                stream.waiting = False
                self._cond.notify_all()

    def _gather(self, leader: Stream, waiting: list[Stream], now: float) -> None:
        """Under the lock, at `leader`'s grant: the other passes waiting now that go with it in one batch (ready
        together, the same kind of pass, while batching pays and no started member is made to run dry)."""
        if self.max_batch < 2:
            return
        rest = [s for s in waiting if s is not leader and not s.holding and s.final == leader.final]
        if not rest:
            return
        if self.marginal is not None and self.marginal >= BATCH_PAYS_BELOW:
            self._declined += 1
            if self._declined < BATCH_PROBE_EVERY:  # measured not to pay: only every so often, to measure again
                return
        self._declined = 0
        members = [leader]
        while rest and len(members) < self.max_batch:
            candidate = pick(rest, now)
            if candidate is None:
                break
            rest.remove(candidate)
            if self._fits([*members, candidate], now):
                members.append(candidate)
        if len(members) < 2:
            return
        batch = Batch(members)
        for member in members:
            member.batch = batch
        for member in members[1:]:
            member.holding = True
            self._holding += 1
        self._cond.notify_all()

    def batch_cost(self, costs: list[float]) -> float:
        """Predicted seconds of one batched pass of members whose passes alone cost `costs`."""
        longest = max(costs)
        return longest + (1.0 if self.marginal is None else self.marginal) * (sum(costs) - longest)

    def _fits(self, members: list[Stream], now: float) -> bool:
        """No started member would run dry (with FIRST_CHUNK_MARGIN_S) because of the batch where its own pass
        alone would not (one that runs dry either way is better served by the batch's throughput)."""
        cost = self.batch_cost([m.cost for m in members])
        for member in members:
            slack = member.slack(now)
            if slack is None or cost <= member.cost:
                continue
            if slack - cost < FIRST_CHUNK_MARGIN_S <= slack - member.cost:
                return False
        return True

    def _drop(self, stream: Stream) -> None:
        """Under the lock: a granted member gives its pass back before running it."""
        stream.holding = False
        self._holding -= 1
        if stream.batch is not None:
            stream.batch.leave(stream)
            stream.batch.released += 1
            stream.batch = None
        self._cond.notify_all()

    def release(self, stream: Stream, audio_s: float, seconds: Optional[float] = None) -> None:
        """The pass is done and made `audio_s` of audio (the first one starts the stream's playback clock);
        `seconds`: how long it took (a batched pass's members report theirs, to measure what batching saves)."""
        with self._cond:
            if stream.holding:
                stream.holding = False
                self._holding -= 1
            batch, stream.batch = stream.batch, None
            if batch is not None:
                batch.leave(stream)
                batch.released += 1
                if seconds is not None:
                    batch.seconds.append(seconds)
                if batch.released == batch.size:
                    self._observe(batch)
            stream.passes += 1
            if audio_s > 0:
                if stream.first_out is None:
                    stream.first_out = self.clock()
                stream.sent += audio_s
            self._cond.notify_all()

    def _observe(self, batch: Batch) -> None:
        """A batched pass is over: what its members beyond the longest added, against their passes alone."""
        self.batches += 1
        costs = [m.cost for m in batch.members]
        if len(batch.seconds) < len(costs) or min(costs) <= 0:
            return
        longest = max(costs)
        extra = sum(costs) - longest
        share = min(2.0, max(0.0, (max(batch.seconds) - longest) / extra))
        self.marginal = _ewma(self.marginal, share, 0.3)

    def busy_for(self, stream: Stream) -> float:
        """Predicted seconds the flow is busy with other streams' passes before `stream` can get it (running ones,
        and waiting ones that are more urgent: the pass would wait for them)."""
        with self._cond:
            now = self.clock()
            own = stream.slack(now)
            ahead = 0.0
            for s in self._streams:
                if s is stream:
                    continue
                if s.holding:
                    ahead += s.cost
                elif s.waiting and (own is None or s.first_out is None or (s.slack(now) or 0.0) < own):
                    ahead += s.cost
            return ahead / self.slots

    def headroom(self, stream: Stream) -> float:
        """How long a pass of `stream` may take without making another started stream run dry: the least, over the
        others, of their slack less their own next pass (its predicted cost; the last one's while not waiting)."""
        with self._cond:
            now = self.clock()
            room = float("inf")
            for s in self._streams:
                slack = s.slack(now)
                if s is not stream and slack is not None:
                    room = min(room, slack - s.cost)
            return room

    def llm_may_run(self, stream: Stream) -> bool:
        """False while `stream` has LLM_YIELD_LEAD_S of audio in hand and another stream is urgent."""
        with self._cond:
            return self._llm_may_run(stream, self.clock())

    def _llm_may_run(self, stream: Stream, now: float) -> bool:
        slack = stream.slack(now)
        if slack is None or slack + stream.in_hand < LLM_YIELD_LEAD_S:
            return True
        return not any(urgent(s, now) for s in self._streams if s is not stream)

    def llm_wait(self, stream: Stream, stop: Callable[[], bool], poll: float = 0.05) -> None:
        """On an LLM thread, before each token: step aside while `llm_may_run` says so (until `stop()`)."""
        with self._cond:
            while not self._llm_may_run(stream, self.clock()) and not stop():
                self._cond.wait(poll)


@dataclass
class Costs:
    """Measured per-stream model costs, per second of audio, from calls that had the model to themselves (under
    contention every part looks slower, and the sum would count the contention twice): the LLM's seconds per token
    and flow + vocoder seconds per second of audio, as exponential moving averages."""

    llm_s_per_token: Optional[float] = None
    """LLM seconds per speech token (prefill included)."""

    flow_per_audio_s: Optional[float] = None
    """Flow + vocoder seconds per second of audio, over whole calls (their chunk sizes included)."""

    weight: float = 0.3
    """Weight of the newest observation."""

    provisional: bool = False
    """The values come from the warm-up (cold: its first passes allocate and compile): the next call's replace
    them instead of being averaged in, so admission is not held back by the start for several calls."""

    def observe(self, llm_s_per_token: float, flow_s: float, audio_s: float) -> None:
        """One finished call that ran alone."""
        weight = 1.0 if self.provisional else self.weight
        if llm_s_per_token > 0:
            self.llm_s_per_token = _ewma(self.llm_s_per_token, llm_s_per_token, weight)
        if audio_s > 0.5:  # a very short reply is all first chunk: not what a stream costs per second
            self.flow_per_audio_s = _ewma(self.flow_per_audio_s, flow_s / audio_s, weight)
            self.provisional = False

    def per_stream(self) -> Optional[tuple[float, float]]:
        """(LLM, flow + vocoder) seconds one stream needs per second of audio; None until both were measured."""
        if self.llm_s_per_token is None or self.flow_per_audio_s is None:
            return None
        return self.llm_s_per_token * TOKENS_PER_SECOND, self.flow_per_audio_s


def load(
    streams: int,
    llm: float,
    flow: float,
    llm_batched: bool = False,
    flow_slots: int = 1,
    flow_marginal: float = 1.0,
) -> float:
    """Share of the model's time `streams` streams need to stay ahead of real time, each needing `llm` LLM and
    `flow` flow + vocoder seconds per second of audio. LLM threads take turns on the machine (plain PyTorch: the
    GIL and one CUDA stream), so their needs add up; vLLM batches them (about one stream's need); the flow
    passes add up, spread over `flow_slots` (TensorRT execution contexts), each stream beyond the first counted at
    `flow_marginal` of its own cost when passes are batched (measured; 1.0: not batched)."""
    llm_total = llm if llm_batched else llm * streams
    flow_total = flow * (1 + min(1.0, flow_marginal) * (streams - 1))
    return llm_total + flow_total / max(1, flow_slots)


def real_time_overload(
    in_flight: int,
    costs: Optional[tuple[float, float]],
    llm_batched: bool = False,
    flow_slots: int = 1,
    safety: float = ADMIT_SAFETY,
    flow_marginal: float = 1.0,
) -> Optional[str]:
    """Why one more stream would make the streams fall behind real time (None: it fits, or nothing is known yet,
    or nothing runs: a lone request is always served)."""
    if in_flight == 0 or costs is None:
        return None
    llm, flow = costs
    need = load(in_flight + 1, llm, flow, llm_batched, flow_slots, flow_marginal)
    if need * safety <= 1.0:
        return None
    now = load(in_flight, llm, flow, llm_batched, flow_slots, flow_marginal)
    return (
        f"{in_flight} streams in flight need {now:.0%} of the model's time to stay ahead of real time; "
        f"one more would need {need:.0%} (measured per second of audio: LLM {llm:.2f} s, flow + vocoder "
        f"{flow:.2f} s; limit {1 / safety:.0%})"
    )


def _ewma(old: Optional[float], new: float, weight: float) -> float:
    return new if old is None else old + weight * (new - old)
