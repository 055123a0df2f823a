"""Our streaming loop for CosyVoice 2/3, installed on upstream's model object in place of its `tts(stream=True)`.

Upstream's loop (`CosyVoice2Model.tts`, also used by CosyVoice 3) has four costs for a low-latency server:
- it polls for speech tokens every 100 ms, adding up to 100 ms to every chunk (here: woken on each token);
- it grows `token_hop_len` on the shared model object and never resets it (here: the hop is local to the call);
- its first chunk waits for `token_hop_len` (25) tokens plus the prompt's padding to a multiple of 25 plus the
  look-ahead; here the first chunk may end at the padding alone when the LLM is fast enough for the next chunk to
  arrive before that audio has played (`early_first_hop`): chunk ends stay on multiples of 25 tokens counted from
  the prompt's start, the boundaries of the flow model's chunk attention, so no chunk sees a different context
  than in upstream's own stream;
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
from typing import Any, Callable, Iterator

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
"""An early first chunk must cover this many times the time the next chunk's tokens are expected to take."""

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


def fast_enough(early: int, next_hop: int, tokens: int, seconds: float) -> bool:
    """Emit an `early`-token first chunk now? Only if the LLM, at the rate seen so far in this call (`tokens` in
    `seconds`, prefill included), makes the next `next_hop` tokens SAFETY times faster than that chunk plays."""
    if seconds <= 0 or tokens <= 0:
        return False
    playable = (early - HELD_BACK_TOKENS) / TOKENS_PER_SECOND
    return SAFETY * next_hop * seconds / tokens <= playable


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

    def tts(*args: Any, **kwargs: Any) -> Iterator[dict]:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        call.update(call.pop("kwargs", {}) or {})
        source = call.get("source_speech_token")
        if call.get("stream") is not True or (source is not None and source.shape[1] != 0):
            inner.token_hop_len = hop  # upstream's own loop: start from the initial hop, as on the first call
            return original(*args, **kwargs)
        return stream_tts(inner, call, hop, should_stop, early_first_hop)

    inner.tts = tts
    return True


def stream_tts(
    inner: Any, call: dict, hop: int, should_stop: Callable[[], bool], early_first_hop: bool
) -> Iterator[dict]:
    """Upstream's streaming `tts`, woken per token, with a call-local hop, an optional early first chunk and an
    LLM thread that stops when the call is closed. Yields {'tts_speech': tensor[1, N]} like upstream."""
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
    lookahead = int(inner.flow.pre_lookahead_len)
    upstream_first, early = first_hop(int(prompt_token.shape[1]), hop)
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
        return {"tts_speech": speech.cpu()}

    try:
        offset, step, size = 0, hop, upstream_first
        early_used = False
        if early and wait_for(early + lookahead) and not should_stop():
            if fast_enough(early, hop, early + lookahead, time.perf_counter() - started):
                size, early_used = early, True
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
