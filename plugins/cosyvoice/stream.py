"""Our streaming loop for CosyVoice 2/3, installed on upstream's model object in place of its `tts(stream=True)`.

Upstream's loop (`CosyVoice2Model.tts`, also used by CosyVoice 3) has five costs for a low-latency server:
- it polls for speech tokens every 100 ms, adding up to 100 ms to every chunk (here: woken on each token);
- it grows `token_hop_len` on the shared model object and never resets it (here: the hop is local to the call);
- its first chunk waits for `token_hop_len` (25) tokens plus the prompt's padding to a multiple of 25 plus the
  look-ahead; here the first chunk may end at the padding alone when the model is fast enough for every next chunk
  (its LLM tokens, then flow + vocoder) to arrive before the audio sent so far has played (`keeps_ahead`);
- concurrent calls run their flow + vocoder passes whenever they get to them; here a scheduler grants them in the
  order that keeps every stream ahead of playback (`scheduler.py`), and a stream that is well ahead waits for
  longer chunks (`grown_end`: fewer passes, each of which reruns the flow over everything so far);
- a call closed early leaves its LLM thread running to the end of the text (here it stops at its next token;
  with vLLM, which keeps its own request state, it still runs to the end, and its tokens are dropped).
Chunk ends stay on multiples of 25 tokens counted from the prompt's start, the boundaries of the flow model's chunk
attention (`chunking.py`), so no chunk sees a different context than in upstream's own stream.

Everything else is upstream's own code: `llm_job` (the LLM), `token2wav` (flow + vocoder, with its caches) and the
per-call dictionaries, called with the same arguments as upstream's loop calls them. Non-streaming calls and voice
conversion go to upstream's `tts` unchanged (their `token2wav` still waits for the scheduler). Pure Python: torch
is reached only through upstream's objects.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from wyoming_cosyvoice.engine import RequestCancelled

from .batching import DecoderRoute, batchable
from .chunking import (
    MAX_TOKEN_TEXT_RATIO,
    SAFETY,
    TOKENS_PER_SECOND,
    ChunkCost,
    ChunkGrid,
    cut_due,
    first_size,
    grown_end,
    keeps_ahead,
)
from .scheduler import Costs, FlowScheduler, Stream, load

_LOGGER = logging.getLogger(__name__)

NEEDS = (
    "llm_job",
    "token2wav",
    "tts",
    "lock",
    "tts_speech_token_dict",
    "llm_end_dict",
    "hift_cache_dict",
    "token_hop_len",
    "token_max_hop_len",
    "stream_scale_factor",
    "flow",
)
"""What the loop uses on upstream's model object (CosyVoice2Model / CosyVoice3Model)."""


class StopLLM(Exception):
    """Raised inside upstream's LLM thread when it appends a token to a call that was closed: the thread ends."""


@dataclass(eq=False)
class Request:
    """One request as the loop sees it: its scheduler stream (shared by the calls it makes, one per sentence), its
    cancel flag, and how its thread says it is waiting rather than hung."""

    stream: Stream
    cancel: threading.Event
    alive: Callable[[], None] = field(default=lambda: None)

    def stop(self) -> bool:
        """The request was cancelled (its client left, or it was given up)."""
        return self.cancel.is_set()


class Streaming:
    """What every call on one model shares: the flow + vocoder scheduler, the measured costs, the settings."""

    def __init__(
        self,
        early_first_chunk: bool,
        sample_rate: int,
        flow_slots: int = 1,
        llm_batched: bool = False,
        max_flow_batch: int = 1,
    ) -> None:
        self.scheduler = FlowScheduler(flow_slots, max_batch=max_flow_batch)
        self.route: Optional[DecoderRoute] = None
        """Routes the flow decoder's calls of batched passes (None: every pass runs alone)."""
        self.batch_note = "off" if max_flow_batch < 2 else f"up to {max_flow_batch} passes"
        self.llm_batched = llm_batched
        """The LLM batches the calls itself (vLLM): one stream's LLM need for all (admission, overload)."""
        self.cost = ChunkCost()
        """flow + vocoder seconds per pass against the tokens it runs over."""
        self.costs = Costs()
        """Per-stream costs per second of audio (admission)."""
        self.early_first_chunk = early_first_chunk
        self.sample_rate = sample_rate
        self._local = threading.local()
        self._requests: dict[threading.Event, Request] = {}

    def overloaded(self) -> bool:
        """The streams open now need more than the model's time to stay ahead of real time, by the costs measured
        (possible with keep_real_time: false, or when costs grew after admission)."""
        costs = self.costs.per_stream()
        if costs is None or self.scheduler.open_streams < 2:
            return False
        return load(self.scheduler.open_streams, *costs, self.llm_batched, self.scheduler.slots, self.marginal()) > 1.0

    def limit_batch(self, streams: int) -> None:
        """No batch of more passes than `streams` (the requests in flight at once)."""
        self.scheduler.max_batch = max(1, min(self.scheduler.max_batch, streams))
        if self.route is not None and self.scheduler.max_batch < 2:
            self.batch_note = "off: one request at a time"
        elif self.route is not None:
            self.batch_note = f"up to {self.scheduler.max_batch} passes"

    def batch_report(self) -> str:
        """Batched flow passes for health: the bound, the batches run, what one more member adds."""
        if self.route is None:
            return self.batch_note
        marginal = self.scheduler.marginal
        added = "not measured yet" if marginal is None else f"one more pass adds {marginal:.0%} of its own"
        return f"{self.batch_note}; {self.scheduler.batches} batched passes; {added}"

    def marginal(self) -> float:
        """What one more stream adds to a flow pass, as a share of its own (1.0: passes are not batched)."""
        if self.route is None or self.scheduler.marginal is None:
            return 1.0
        return self.scheduler.marginal

    def begin(self, cancel: threading.Event, alive: Callable[[], None] = lambda: None) -> Request:
        """Register a request made on this thread (its calls find it through `current`)."""
        request = Request(self.scheduler.open(), cancel, alive)
        self._requests[cancel] = request
        self._local.request = request
        return request

    def end(self, request: Request) -> None:
        """The request is over (on its thread, or on the loop when it was given up)."""
        self.scheduler.close(request.stream)
        self._requests.pop(request.cancel, None)
        if getattr(self._local, "request", None) is request:
            self._local.request = None

    def abandon(self, cancel: threading.Event) -> None:
        """The thread of the request with this cancel flag hangs: free the flow + vocoder it may hold."""
        request = self._requests.get(cancel)
        if request is not None:
            self.end(request)

    def current(self) -> Optional[Request]:
        """The request this thread works for (None outside one)."""
        return getattr(self._local, "request", None)

    @property
    def holding(self) -> bool:
        """This thread runs a pass it was granted (a nested token2wav must not wait for the scheduler again)."""
        return bool(getattr(self._local, "holding", False))

    @holding.setter
    def holding(self, value: bool) -> None:
        self._local.holding = value


class _Tokens(list):
    """A call's speech-token list: wakes the streaming loop on every token; before each one the LLM thread may step
    aside for an urgent stream (`before`); once the call stopped, it ends the LLM thread (`stoppable`) or drops the
    tokens until that thread ends by itself."""

    def __init__(
        self, wake: threading.Condition, stoppable: bool, before: Optional[Callable[[int], None]] = None
    ) -> None:
        super().__init__()
        self.wake = wake
        self.stoppable = stoppable
        self.before = before
        self.stopped = False

    def append(self, token: Any) -> None:
        if not self.stopped and self.before is not None:
            self.before(len(self))
        if self.stopped:
            if self.stoppable:
                raise StopLLM()
            return
        with self.wake:
            super().append(token)
            self.wake.notify_all()


def supports(inner: Any) -> bool:
    """True when `inner` (upstream's model object) has everything the loop uses."""
    return all(hasattr(inner, name) for name in NEEDS) and hasattr(inner.flow, "pre_lookahead_len")


def install(inner: Any, streaming: Streaming) -> bool:
    """Route `inner.tts(stream=True)` through `stream_tts` and every other `token2wav` through the scheduler;
    False (nothing changed) when `inner` lacks a part."""
    if not supports(inner):
        return False
    original = inner.tts
    signature = inspect.signature(original)
    hop = int(inner.token_hop_len)
    token2wav = inner.token2wav

    def tts(*args: Any, **kwargs: Any) -> Iterator[dict]:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        call.update(call.pop("kwargs", {}) or {})
        source = call.get("source_speech_token")
        if call.get("stream") is not True or (source is not None and source.shape[1] != 0):
            inner.token_hop_len = hop  # upstream's own loop: start from the initial hop, as on the first call
            return original(*args, **kwargs)
        return stream_tts(inner, call, hop, streaming)

    def scheduled_token2wav(*args: Any, **kwargs: Any) -> Any:
        """Upstream's own loop (not streaming) meets the other streams at the flow too."""
        if streaming.holding:
            return token2wav(*args, **kwargs)
        request = streaming.current()
        own = request is None
        if request is None:
            request = streaming.begin(threading.Event())
        stream, seconds = request.stream, streaming.cost.predict(10 * TOKENS_PER_SECOND) or 0.0
        stream.final = bool(kwargs.get("finalize", True))
        if not streaming.scheduler.acquire(stream, seconds, request.stop, request.alive):
            raise RequestCancelled()  # the request was cancelled while waiting: it ends here
        if streaming.route is not None:  # granted with other passes: its decoder call meets theirs
            streaming.route.join(stream.batch, stream)
        audio = 0.0
        try:
            streaming.holding = True
            speech = token2wav(*args, **kwargs)
            audio = float(speech.shape[-1]) / streaming.sample_rate
            return speech
        finally:
            streaming.holding = False
            if streaming.route is not None:
                streaming.route.alone()
            streaming.scheduler.release(stream, audio)
            if own:
                streaming.end(request)

    inner.tts = tts
    inner.token2wav = scheduled_token2wav
    if streaming.scheduler.max_batch > 1:
        why = batchable(getattr(inner.flow, "decoder", None))
        if why is None:
            streaming.route = DecoderRoute(inner.flow.decoder)
            streaming.route.install()
        else:
            streaming.scheduler.max_batch = 1
            streaming.batch_note = f"off: {why}"
            _LOGGER.info("Batched flow passes off: %s", why)
    return True


def stream_tts(inner: Any, call: dict, hop: int, streaming: Streaming) -> Iterator[dict]:
    """Upstream's streaming `tts`, woken per token, with a call-local hop, an optional early first chunk, passes
    granted by the scheduler, chunks that grow while the stream is ahead, and an LLM thread that stops when the call
    is closed. Yields {'tts_speech': tensor[1, N]} like upstream."""
    request = streaming.current()
    if request is None:  # called outside the engine (a test, a benchmark): a request of its own
        request = streaming.begin(threading.Event())
        try:
            yield from StreamCall(inner, call, hop, streaming, request).run()
        finally:
            streaming.end(request)
    else:
        yield from StreamCall(inner, call, hop, streaming, request).run()


class StreamCall:
    """One streaming `tts` call: its LLM thread, its token list and its chunks. The state upstream's loop keeps in
    locals lives in fields; each decision (the first chunk, where the next one ends, when to cut, one flow +
    vocoder pass, the costs it measured, the clean-up) is a method. It stays one class (about 300 lines): the
    methods share the call's token list, offset and LLM thread, which upstream's loop keeps as one frame's locals."""

    def __init__(self, inner: Any, call: dict, hop: int, streaming: Streaming, request: Request) -> None:
        self.inner, self.call, self.streaming, self.request = inner, call, streaming, request
        self.sched, self.cost, self.stream = streaming.scheduler, streaming.cost, request.stream
        self.key = str(uuid.uuid1())
        self.wake = threading.Condition()
        self.offset = 0
        """Tokens through the flow so far (read by the LLM thread for the scheduler)."""
        self.crowded = self.sched.open_streams > 1
        """Another stream shared the model at some point: this call's costs are not one stream's alone."""
        self.llm_last = 0.0
        self.failure: list[BaseException] = []
        # vLLM keeps its own request state, which an exception in the middle of upstream's loop would leave behind.
        self.tokens = _Tokens(self.wake, stoppable=not hasattr(inner.llm, "vllm"), before=self._before_token)
        self.prompt_token = call["flow_prompt_speech_token"]
        text: Any = call.get("text")  # a token tensor (a generator when text streams in)
        self.grid = ChunkGrid(
            prompt_tokens=int(self.prompt_token.shape[1]),
            hop=hop,
            max_hop=int(inner.token_max_hop_len),
            scale=int(inner.stream_scale_factor),
            lookahead=int(inner.flow.pre_lookahead_len),
            limit=MAX_TOKEN_TEXT_RATIO * int(text.shape[1]) if hasattr(text, "shape") else None,
        )
        self.upstream_first, early = self.grid.first_hop()
        self.early = early if streaming.early_first_chunk else 0
        self.started = 0.0
        self.flow_s, self.audio_s = 0.0, 0.0
        self.thread = threading.Thread(target=self._job, name=f"cosyvoice-llm-{self.key[:8]}", daemon=True)

    def stop(self) -> bool:
        return self.request.stop()

    def run(self) -> Iterator[dict]:
        """Yields {'tts_speech': tensor[1, N]} per chunk, like upstream's loop."""
        if self.stop():
            return
        import torch  # present: upstream's model object exists

        self.torch = torch
        with self.inner.lock:
            self.inner.tts_speech_token_dict[self.key], self.inner.llm_end_dict[self.key] = self.tokens, False
            self.inner.hift_cache_dict[self.key] = None
        self.started = time.perf_counter()
        self.thread.start()
        try:
            yield from self._chunks()
        finally:
            self._close()

    # --- the LLM thread

    def _before_token(self, count: int) -> None:
        """Before each token, on the LLM thread: step aside while another stream's pass is urgent."""
        self.llm_last = time.perf_counter()
        self.stream.in_hand = max(0, count - self.offset) / TOKENS_PER_SECOND
        if self.sched.open_streams > 1:
            self.crowded = True
            self.sched.llm_wait(self.stream, lambda: self.tokens.stopped or self.stop())

    def _job(self) -> None:
        call, inner = self.call, self.inner
        try:
            inner.llm_job(
                call["text"], call["prompt_text"], call["llm_prompt_speech_token"], call["llm_embedding"], self.key
            )
        except StopLLM:
            pass
        except BaseException as err:  # upstream's thread would die silently and its loop wait forever
            self.failure.append(err)
        finally:
            with self.wake:
                if self.key in inner.llm_end_dict:  # not yet dropped by a call that gave up waiting for this thread
                    inner.llm_end_dict[self.key] = True
                self.wake.notify_all()

    def _ended(self) -> bool:
        return bool(self.inner.llm_end_dict.get(self.key))

    def _per_token(self) -> float:
        """This call's LLM seconds per token so far (prefill included)."""
        return (time.perf_counter() - self.started) / max(1, len(self.tokens))

    # --- the decisions

    def _wait_for(self, count: int, cut_from: Optional[int] = None) -> bool:
        """Wait until `count` tokens exist (True) or the LLM ended short of them or the call stopped (False); with
        `cut_from`, also True once the stream must cut at a grid end >= `cut_from` to stay ahead of playback."""
        tokens, grid = self.tokens, self.grid
        with self.wake:
            while len(tokens) < count:
                if self._ended() or self.stop():
                    return False
                if cut_from is not None:
                    end = grid.floor(len(tokens) - grid.lookahead)
                    slack = self.stream.slack(self.sched.clock())
                    if end >= cut_from and slack is not None:
                        if cut_due(slack, self.cost.predict(grid.flow_tokens(end)), self.sched.busy_for(self.stream)):
                            return True
                self.wake.wait(0.05)  # the timeout bounds how late a stop request or a due cut is noticed
        return True

    def _first_chunk(self) -> tuple[int, bool]:
        """(size, early taken) of the request's first chunk: upstream's, the early one when the model keeps ahead
        after it, or a longer one when other streams share the model and upstream's would run dry."""
        size, grid, sched = self.upstream_first, self.grid, self.sched
        fresh = self.stream.first_out is None  # this call makes the request's first audio
        # early_first_chunk: false keeps upstream's first chunk as it is (no early one, no longer one under load).
        if not (fresh and self.streaming.early_first_chunk):
            return size, False
        if not self._wait_for((self.early or self.upstream_first) + grid.lookahead) or self.stop():
            return size, False
        seconds_per_token = self._per_token()
        # Other streams' passes may run before each of ours (round robin at worst, over the flow's slots).
        share = 1 + (sched.open_streams - 1) / sched.slots

        def flow_cost(n: int) -> Optional[float]:
            seconds = self.cost.predict(n)
            return None if seconds is None else seconds * share

        early_used = bool(self.early) and keeps_ahead(grid, self.early, seconds_per_token, flow_cost)
        if early_used:
            size = self.early
        elif sched.open_streams > 1:  # alone, a longer first chunk would only delay the first audio
            size = first_size(grid, self.upstream_first, seconds_per_token, flow_cost)
        _LOGGER.debug(
            "First chunk %d tokens (early %d %s): LLM %.1f ms/token, flow + vocoder over %d tokens %s ms, %d streams",
            size,
            self.early,
            "taken" if early_used else "not taken",
            seconds_per_token * 1000,
            grid.flow_tokens(self.early + grid.hop),
            _ms(flow_cost(grid.flow_tokens(self.early + grid.hop))),
            sched.open_streams,
        )
        return size, early_used

    def _next_target(self, size: int) -> tuple[Optional[int], Optional[int]]:
        """(the chunk end to wait for, None: the LLM ended and one final pass fits; the grid end from which waiting
        may be cut short at the tokens there are, None: no cut)."""
        slack = self.stream.slack(self.sched.clock())
        if slack is None:  # the request's first audio: as decided by _first_chunk, never longer
            return self.offset + size, None
        target = grown_end(
            self.grid,
            self.offset,
            size,
            len(self.tokens),
            self._ended(),
            slack,
            self._per_token(),
            self.cost.predict,
            self.sched.busy_for(self.stream),
        )
        # Waiting for a chunk is cut short, at the tokens there are, when the stream would otherwise run dry
        # (a grown chunk, or upstream's size under load): the chunk ends at the grid point they reach.
        cut_from: Optional[int] = (
            (self.early or self.upstream_first) if self.offset == 0 else self.offset + self.grid.hop
        )
        if self.streaming.overloaded():
            # A cut buys one stream sooner audio with an extra pass; when the streams already need more than the
            # model's time, every extra pass makes them all later (docs/benchmarks.md, keep_real_time: false).
            cut_from = None
        return target, cut_from

    def _longest(self, floor: int) -> Optional[int]:
        """At the grant: the chunk end to run now, at least `floor` (None: finish with all tokens). A stream that
        has already played audio takes every token there is on the grid, as long as the longer pass still ends with
        SAFETY margin before it runs dry (fewer passes in all)."""
        if self.stream.first_out is None:
            return floor
        if self.failure:
            raise self.failure[0]
        grid, cost = self.grid, self.cost
        # Its own playback, and the others': a longer pass must not make a started stream miss its next pass.
        slack = min(self.stream.slack(self.sched.clock()) or 0.0, self.sched.headroom(self.stream))
        if self._ended():
            final = cost.predict(grid.prompt_tokens + len(self.tokens))
            if final is None or SAFETY * final <= slack:
                return None
        end = grid.floor(len(self.tokens) - grid.lookahead)
        while end > floor:
            seconds = cost.predict(grid.flow_tokens(end))
            if seconds is None or SAFETY * seconds <= slack:
                return end
            end -= grid.hop
        return floor

    # --- the work

    def _run_pass(self, planned: int, floor: Optional[int]) -> tuple[Optional[dict], Optional[int]]:
        """One flow + vocoder pass from `offset` once the scheduler grants it, ending at `floor` or later (None: the
        final pass); (output, end), end None when it was the final pass; (None, 0) when the call stopped while
        waiting."""
        sched, stream, grid, route = self.sched, self.stream, self.grid, self.streaming.route
        stream.final = floor is None
        if not sched.acquire(
            stream, self.cost.predict(grid.prompt_tokens + planned) or 0.0, self.stop, self.request.alive
        ):
            return None, 0
        batched = stream.batch is not None
        if route is not None:
            route.join(stream.batch, stream)
        audio, end, took = 0.0, floor, None
        try:
            end = None if floor is None else self._longest(floor)
            if end is None:
                self.thread.join()
                if self.failure:
                    raise self.failure[0]
            n = len(self.tokens) if end is None else end + grid.lookahead
            began = time.perf_counter()
            self.streaming.holding = True
            try:
                speech = self.inner.token2wav(
                    token=self.torch.tensor(self.tokens[:n]).unsqueeze(dim=0),
                    prompt_token=self.prompt_token,
                    prompt_feat=self.call["prompt_speech_feat"],
                    embedding=self.call["flow_embedding"],
                    token_offset=self.offset,
                    uuid=self.key,
                    stream=end is not None,
                    finalize=end is None,
                )
                out = {"tts_speech": speech.cpu()}  # waits for the GPU: the timing is the whole pass
            finally:
                self.streaming.holding = False
            took = time.perf_counter() - began
            audio = out["tts_speech"].shape[1] / self.streaming.sample_rate
        finally:
            if route is not None:
                route.alone()
            sched.release(stream, audio, took)
        if not batched:  # a batched pass's time is the batch's: the scheduler weighs it (marginal)
            self.cost.observe(grid.prompt_tokens + n, took)
        self.flow_s, self.audio_s = self.flow_s + took, self.audio_s + audio
        _LOGGER.debug(
            "Call %s: pass %d-%s of %d tokens in %.0f ms, %.2f s of audio, %s ms ahead of playback",
            self.key[:8],
            self.offset,
            "end" if end is None else end,
            len(self.tokens),
            took * 1000,
            audio,
            _ms(stream.slack(sched.clock())),
        )
        return out, end

    def _chunks(self) -> Iterator[dict]:
        """The chunks, each as soon as its tokens are there and the scheduler grants its pass; then the final one."""
        grid = self.grid
        step = grid.hop
        size, early_used = self._first_chunk()
        while True:
            target, cut_from = self._next_target(size)
            if target is None or not self._wait_for(target + grid.lookahead, cut_from):
                break  # the LLM ended (or the call stopped): the final pass below
            if self.stop():
                return
            # The end waited for: the target, or where a due cut found the stream (never less than upstream's size).
            floor = min(target, grid.floor(len(self.tokens) - grid.lookahead))
            out, end = self._run_pass(target + grid.lookahead, floor)
            if out is None:
                return
            yield out
            if end is None:
                return
            # Upstream's sizes: hop + pad, then the hop doubled each time up to its maximum. After an early first
            # chunk (the pad alone) the next one is upstream's first step, `hop`, and then they grow the same way.
            if not (self.offset == 0 and early_used):
                step = min(grid.max_hop, step * grid.scale)
            self.offset = end
            size = step
        if self.stop():
            return
        out, _ = self._run_pass(len(self.tokens), None)
        if out is not None:
            yield out
        self._observe_costs()

    def _observe_costs(self) -> None:
        """What one stream costs with the model to itself (admission adds these up): only from a call alone."""
        if not self.crowded and self.llm_last:
            per_token = (self.llm_last - self.started) / max(1, len(self.tokens))
            self.streaming.costs.observe(per_token, self.flow_s, self.audio_s)

    def _close(self) -> None:
        """Stop the LLM thread at its next token, drop the call's entries from upstream's tables."""
        self.tokens.stopped = True
        self.thread.join(120.0)
        if self.thread.is_alive():
            _LOGGER.warning("CosyVoice LLM thread of a closed call still running after 120 s")
        with self.inner.lock:
            for table in (self.inner.tts_speech_token_dict, self.inner.llm_end_dict, self.inner.hift_cache_dict):
                table.pop(self.key, None)
        if self.torch.cuda.is_available():
            self.torch.cuda.current_stream().synchronize()


def _ms(seconds: Optional[float]) -> str:
    return "unknown" if seconds is None else f"{seconds * 1000:.0f}"
