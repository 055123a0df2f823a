"""Our streaming loop for CosyVoice 2/3, installed on upstream's model object in place of its `tts(stream=True)`.

Upstream's loop (`CosyVoice2Model.tts`, also used by CosyVoice 3) has four costs for a low-latency server:
- it polls for speech tokens every 100 ms, adding up to 100 ms to every chunk (here: woken on each token);
- it grows `token_hop_len` on the shared model object and never resets it (here: the hop is local to the call);
- its first chunk waits for `token_hop_len` (25) tokens plus the prompt's padding to a multiple of 25 plus the
  look-ahead; here the first chunk may end at the padding alone when the model is fast enough for every next chunk
  (its LLM tokens, then flow + vocoder) to arrive before the audio sent so far has played (`early_first_hop`,
  `keeps_ahead`): chunk ends stay on multiples of 25 tokens counted from the prompt's start, the boundaries of the
  flow model's chunk attention, so no chunk sees a different context than in upstream's own stream;
- a call closed early leaves its LLM thread running to the end of the text (here it stops at its next token;
  with vLLM, which keeps its own request state, it still runs to the end, and its tokens are dropped).

Everything else is upstream's own code: `llm_job` (the LLM), `token2wav` (flow + vocoder, with its caches) and the
per-call dictionaries, called with the same arguments as upstream's loop calls them. Non-streaming calls and voice
conversion go to upstream's `tts` unchanged. Pure Python: torch is reached only through upstream's objects.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import uuid
from collections import deque
from typing import Any, Callable, Iterator, Optional

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

MIN_FIRST_HOP = 10
"""The shortest first chunk in tokens (0.4 s): the vocoder keeps 8 mel frames (4 tokens) back for cross-fading."""

SAFETY = 1.5
"""An early first chunk is taken only if every next chunk is predicted to arrive in 1/SAFETY of the audio time."""

HORIZON_CHUNKS = 4
"""Chunks after the early one that must keep ahead (25, 50, 100, 100 tokens: 11 s of audio after it)."""

MAX_TOKEN_TEXT_RATIO = 20
"""Upstream's LLM makes at most this many speech tokens per text token (`max_token_text_ratio`)."""

TOKENS_PER_SECOND = 25
"""CosyVoice 2/3 speech tokens per second of audio."""

HELD_BACK_TOKENS = 4
"""Audio of a chunk's last tokens that the vocoder holds back for the next chunk (8 mel frames, 2 per token)."""


class StopLLM(Exception):
    """Raised inside upstream's LLM thread when it appends a token to a call that was closed: the thread ends."""


class _Tokens(list):  # type: ignore[type-arg]
    """A call's speech-token list: wakes the streaming loop on every token; once the call stopped, it ends the LLM
    thread (`stoppable`) or drops the tokens until that thread ends by itself."""

    def __init__(self, wake: threading.Condition, stoppable: bool) -> None:
        super().__init__()
        self.wake = wake
        self.stoppable = stoppable
        self.stopped = False

    def append(self, token: Any) -> None:
        if self.stopped:
            if self.stoppable:
                raise StopLLM()
            return
        with self.wake:
            super().append(token)
            self.wake.notify_all()


def first_hop(prompt_tokens: int, hop: int) -> tuple[int, int]:
    """(upstream's first hop, the early one or 0): upstream waits for `hop` plus the padding of the prompt to a
    multiple of `hop`; the early first chunk ends at that padding when it is at least MIN_FIRST_HOP tokens."""
    pad = -prompt_tokens % hop
    return hop + pad, (pad if pad >= MIN_FIRST_HOP else 0)


class ChunkCost:
    """Seconds one `token2wav` call (flow + vocoder) takes as a function of the tokens the flow runs over (prompt plus
    every token so far: each chunk reruns the flow from the start), fitted to the latest calls (warm-up included)."""

    def __init__(self, keep: int = 32) -> None:
        self.samples: deque[tuple[int, float]] = deque(maxlen=keep)

    def observe(self, tokens: int, seconds: float) -> None:
        """Record one call."""
        self.samples.append((tokens, seconds))

    def predict(self, tokens: int) -> Optional[float]:
        """Expected seconds for a call over `tokens` (None before any call was seen: no early chunk then).
        A least-squares line with non-negative terms; with one size seen, that cost scaled up (never down)."""
        if not self.samples:
            return None
        n = [float(t) for t, _ in self.samples]
        y = [s for _, s in self.samples]
        mean_n, mean_y = sum(n) / len(n), sum(y) / len(y)
        spread = sum((a - mean_n) ** 2 for a in n)
        if spread == 0:
            return mean_y * max(1.0, tokens / mean_n) if mean_n > 0 else mean_y
        slope = max(0.0, sum((a - mean_n) * (b - mean_y) for a, b in zip(n, y)) / spread)
        base = max(0.0, mean_y - slope * mean_n)
        return base + slope * tokens


def keeps_ahead(
    early: int,
    hop: int,
    max_hop: int,
    scale: int,
    lookahead: int,
    prompt_tokens: int,
    seconds_per_token: float,
    cost: Callable[[int], Optional[float]],
    limit: Optional[int] = None,
) -> bool:
    """Take an `early`-token first chunk? Only if, after it, each of the next chunks (`hop`, then scaled up to
    `max_hop`; HORIZON_CHUNKS of them, or up to `limit` tokens, the most this call's LLM can make) is predicted to
    arrive before the audio sent until then has played, with SAFETY margin. Predicted pessimistically, one thing at
    a time: the early chunk's flow + vocoder, then per chunk its new tokens at this call's LLM rate (prefill
    included) plus its flow + vocoder (`cost` of the tokens the flow runs over); no overlap between LLM and flow."""
    first = cost(prompt_tokens + early + lookahead)
    if first is None or seconds_per_token <= 0:
        return False
    clock, end, step = 0.0, early, hop
    for _ in range(HORIZON_CHUNKS):
        if limit is not None and end >= limit:
            break
        sent = (end - HELD_BACK_TOKENS) / TOKENS_PER_SECOND  # audio out when this chunk is due
        end += step
        flow = cost(prompt_tokens + end + lookahead)
        if flow is None:
            return False
        clock += step * seconds_per_token + flow
        if SAFETY * clock > sent:
            return False
        step = min(max_hop, step * scale)
    return True


def supports(inner: Any) -> bool:
    """True when `inner` (upstream's model object) has everything the loop uses."""
    return all(hasattr(inner, name) for name in NEEDS) and hasattr(inner.flow, "pre_lookahead_len")


def install(inner: Any, should_stop: Callable[[], bool], early_first_hop: bool) -> bool:
    """Route `inner.tts(stream=True)` through `stream_tts`; False (nothing changed) when `inner` lacks a part."""
    if not supports(inner):
        return False
    original = inner.tts
    signature = inspect.signature(original)
    hop = int(inner.token_hop_len)
    cost = ChunkCost()

    def tts(*args: Any, **kwargs: Any) -> Iterator[dict]:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        call.update(call.pop("kwargs", {}) or {})
        source = call.get("source_speech_token")
        if call.get("stream") is not True or (source is not None and source.shape[1] != 0):
            inner.token_hop_len = hop  # upstream's own loop: start from the initial hop, as on the first call
            return original(*args, **kwargs)
        return stream_tts(inner, call, hop, should_stop, early_first_hop, cost)

    inner.tts = tts
    inner.wcv_chunk_cost = cost  # kept for the engine's warm-up report and tests
    return True


def stream_tts(
    inner: Any,
    call: dict,
    hop: int,
    should_stop: Callable[[], bool],
    early_first_hop: bool,
    cost: Optional[ChunkCost] = None,
) -> Iterator[dict]:
    """Upstream's streaming `tts`, woken per token, with a call-local hop, an optional early first chunk and an
    LLM thread that stops when the call is closed. Yields {'tts_speech': tensor[1, N]} like upstream."""
    cost = cost or ChunkCost()
    if should_stop():
        return
    import torch  # present: upstream's model object exists

    key = str(uuid.uuid1())
    wake = threading.Condition()
    # vLLM keeps its own request state, which an exception in the middle of upstream's loop would leave behind.
    tokens = _Tokens(wake, stoppable=not hasattr(inner.llm, "vllm"))
    failure: list[BaseException] = []
    with inner.lock:
        inner.tts_speech_token_dict[key], inner.llm_end_dict[key] = tokens, False
        inner.hift_cache_dict[key] = None

    def job() -> None:
        try:
            inner.llm_job(
                call["text"], call["prompt_text"], call["llm_prompt_speech_token"], call["llm_embedding"], key
            )
        except StopLLM:
            pass
        except BaseException as err:  # upstream's thread would die silently and its loop wait forever
            failure.append(err)
        finally:
            with wake:
                if key in inner.llm_end_dict:  # not yet dropped by a call that gave up waiting for this thread
                    inner.llm_end_dict[key] = True
                wake.notify_all()

    prompt_token = call["flow_prompt_speech_token"]
    prompt_tokens = int(prompt_token.shape[1])
    lookahead = int(inner.flow.pre_lookahead_len)
    upstream_first, early = first_hop(prompt_tokens, hop)
    text = call.get("text")
    limit = MAX_TOKEN_TEXT_RATIO * int(text.shape[1]) if hasattr(text, "shape") else None
    if not early_first_hop:
        early = 0
    started = time.perf_counter()
    thread = threading.Thread(target=job, name=f"cosyvoice-llm-{key[:8]}", daemon=True)
    thread.start()

    def wait_for(count: int) -> bool:
        """Wait until `count` tokens exist (True) or the LLM ended short of them or the call stopped (False)."""
        with wake:
            while len(tokens) < count:
                if inner.llm_end_dict[key] or should_stop():
                    return False
                wake.wait(0.05)  # the timeout only bounds how late a stop request is noticed
        return True

    def chunk(end: int, offset: int, finalize: bool) -> dict:
        began = time.perf_counter()
        speech = inner.token2wav(
            token=torch.tensor(tokens[:end]).unsqueeze(dim=0),
            prompt_token=prompt_token,
            prompt_feat=call["prompt_speech_feat"],
            embedding=call["flow_embedding"],
            token_offset=offset,
            uuid=key,
            stream=not finalize,
            finalize=finalize,
        )
        out = {"tts_speech": speech.cpu()}  # waits for the GPU: the timing is the whole flow + vocoder pass
        cost.observe(prompt_tokens + end, time.perf_counter() - began)
        return out

    try:
        offset, step, size = 0, hop, upstream_first
        early_used = False
        if early and wait_for(early + lookahead) and not should_stop():
            per_token = (time.perf_counter() - started) / (early + lookahead)
            early_used = keeps_ahead(
                early,
                hop,
                int(inner.token_max_hop_len),
                int(inner.stream_scale_factor),
                lookahead,
                prompt_tokens,
                per_token,
                cost.predict,
                limit,
            )
            if early_used:
                size = early
            _LOGGER.debug(
                "Early first chunk (%d tokens) %s: LLM %.1f ms/token, flow + vocoder over %d tokens %s ms",
                early,
                "taken" if early_used else "not taken",
                per_token * 1000,
                prompt_tokens + early + hop + lookahead,
                _ms(cost.predict(prompt_tokens + early + hop + lookahead)),
            )
        while wait_for(offset + size + lookahead):
            if should_stop():
                return
            yield chunk(offset + size + lookahead, offset, False)
            # Upstream's sizes: hop + pad, then the hop doubled each time up to its maximum. After an early first
            # chunk (the pad alone) the next one is upstream's first step, `hop`, and then they grow the same way.
            if not (offset == 0 and early_used):
                step = min(inner.token_max_hop_len, step * inner.stream_scale_factor)
            offset += size
            size = step
        if should_stop():
            return
        thread.join()
        if failure:
            raise failure[0]
        yield chunk(len(tokens), offset, True)
    finally:
        tokens.stopped = True
        thread.join(120.0)
        if thread.is_alive():
            _LOGGER.warning("CosyVoice LLM thread of a closed call still running after 120 s")
        with inner.lock:
            for table in (inner.tts_speech_token_dict, inner.llm_end_dict, inner.hift_cache_dict):
                table.pop(key, None)
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()


def _ms(seconds: Optional[float]) -> str:
    return "unknown" if seconds is None else f"{seconds * 1000:.0f}"
