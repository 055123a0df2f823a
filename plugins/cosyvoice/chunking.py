"""Where a CosyVoice 2/3 stream cuts its chunks (pure; no torch): on the flow's 25-token grid, early when the model
is fast enough, longer when the stream is well ahead of playback.

The grid: the flow model attends in chunks of `token_hop_len` (25) speech tokens counted from the start of the
prompt ("must match training static_chunk_size", upstream), so a chunk may only end where prompt + tokens is a
multiple of 25: at `pad` (the prompt's padding to the next multiple), `pad + 25`, `pad + 50`... Upstream's own
stream ends its chunks at `25 + pad`, then 50 and 100 tokens later, then every 100; any end on the grid gives the
same audio for each token (each pass reruns the flow over everything so far, with the same chunk attention), so the
cuts change when audio arrives and how many passes it costs, not the audio itself.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

MIN_FIRST_HOP = 10
"""The shortest first chunk in tokens (0.4 s): the vocoder keeps 8 mel frames (4 tokens) back for cross-fading."""

SAFETY = 1.5
"""A chunk is planned only if it is predicted to arrive in 1/SAFETY of the audio time it has."""

HORIZON_CHUNKS = 4
"""Chunks after the early one that must keep ahead (25, 50, 100, 100 tokens: 11 s of audio after it)."""

MAX_TOKEN_TEXT_RATIO = 20
"""Upstream's LLM makes at most this many speech tokens per text token (`max_token_text_ratio`)."""

TOKENS_PER_SECOND = 25
"""CosyVoice 2/3 speech tokens per second of audio."""

HELD_BACK_TOKENS = 4
"""Audio of a chunk's last tokens that the vocoder holds back for the next chunk (8 mel frames, 2 per token)."""

MAX_GROWN_HOP = 800
"""The longest chunk a stream well ahead of playback may wait for (32 s of audio; upstream's longest is 100)."""


@dataclass(frozen=True)
class ChunkGrid:
    """Where one call's chunks may end and how upstream grows them: the flow's grid of `hop` tokens counted from the
    prompt's start, upstream's growth (`hop` times `scale` up to `max_hop`), the flow's look-ahead, and the most
    speech tokens the call's LLM can make (`limit`, None: unknown, as when text streams in)."""

    prompt_tokens: int
    hop: int = 25
    max_hop: int = 100
    scale: int = 2
    lookahead: int = 3
    limit: Optional[int] = None

    def first_hop(self) -> tuple[int, int]:
        """(upstream's first hop, the early one or 0): upstream waits for `hop` plus the padding of the prompt to a
        multiple of `hop`; the early first chunk ends at that padding when it is at least MIN_FIRST_HOP tokens."""
        return first_hop(self.prompt_tokens, self.hop)

    def floor(self, tokens: int) -> int:
        """The last chunk end on the grid at or before `tokens` (may be <= 0 when there is none)."""
        return grid_floor(tokens, self.prompt_tokens, self.hop)

    def flow_tokens(self, end: int) -> int:
        """The tokens a pass ending at chunk end `end` runs the flow over: the prompt, the chunk's, the look-ahead."""
        return self.prompt_tokens + end + self.lookahead


def first_hop(prompt_tokens: int, hop: int) -> tuple[int, int]:
    """(upstream's first hop, the early one or 0): upstream waits for `hop` plus the padding of the prompt to a
    multiple of `hop`; the early first chunk ends at that padding when it is at least MIN_FIRST_HOP tokens."""
    pad = -prompt_tokens % hop
    return hop + pad, (pad if pad >= MIN_FIRST_HOP else 0)


def on_grid(end: int, prompt_tokens: int, hop: int = 25) -> bool:
    """True when a chunk may end after `end` speech tokens (prompt + end is a multiple of `hop`)."""
    return (prompt_tokens + end) % hop == 0


def grid_floor(tokens: int, prompt_tokens: int, hop: int = 25) -> int:
    """The last chunk end on the grid at or before `tokens` (may be <= 0 when there is none)."""
    return tokens - (prompt_tokens + tokens) % hop


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
        samples = list(self.samples)  # other streams' threads append meanwhile
        if not samples:
            return None
        n = [float(t) for t, _ in samples]
        y = [s for _, s in samples]
        mean_n, mean_y = sum(n) / len(n), sum(y) / len(y)
        spread = sum((a - mean_n) ** 2 for a in n)
        if spread == 0:
            return mean_y * max(1.0, tokens / mean_n) if mean_n > 0 else mean_y
        slope = max(0.0, sum((a - mean_n) * (b - mean_y) for a, b in zip(n, y, strict=True)) / spread)
        base = max(0.0, mean_y - slope * mean_n)
        return base + slope * tokens


def keeps_ahead(
    grid: ChunkGrid,
    early: int,
    seconds_per_token: float,
    cost: Callable[[int], Optional[float]],
    step: Optional[int] = None,
) -> bool:
    """Take an `early`-token first chunk? Only if, after it, each of the next chunks (`step`, by default the grid's
    `hop`, then scaled up to `max_hop`; HORIZON_CHUNKS of them, or up to the grid's `limit` tokens, the most this
    call's LLM can make) is predicted to
    arrive before the audio sent until then has played, with SAFETY margin. Predicted pessimistically, one thing at
    a time: the early chunk's flow + vocoder, then per chunk its new tokens at this call's LLM rate (prefill
    included) plus its flow + vocoder (`cost` of the tokens the flow runs over, waits for other streams' passes
    included); no overlap between LLM and flow."""
    first = cost(grid.flow_tokens(early))
    if first is None or seconds_per_token <= 0:
        return False
    clock, end, step = 0.0, early, grid.hop if step is None else step
    for _ in range(HORIZON_CHUNKS):
        if grid.limit is not None and end >= grid.limit:
            break
        sent = (end - HELD_BACK_TOKENS) / TOKENS_PER_SECOND  # audio out when this chunk is due
        end += step
        flow = cost(grid.flow_tokens(end))
        if flow is None:
            return False
        clock += step * seconds_per_token + flow
        if SAFETY * clock > sent:
            return False
        step = min(grid.max_hop, step * grid.scale)
    return True


FIRST_CHUNK_STEPS = (0, 1, 3)
"""Hops added to upstream's first chunk (25 + pad) when a longer first chunk is needed to keep ahead: under load,
a first chunk of 50 + pad or 100 + pad tokens (upstream's own from its second request on) buys the time the next
ones need."""


def first_size(
    grid: ChunkGrid, upstream_first: int, seconds_per_token: float, cost: Callable[[int], Optional[float]]
) -> int:
    """The first chunk when the early one is not taken: upstream's (25 + pad), or, when that would run dry before
    the next chunks arrive (`keeps_ahead`, e.g. with other streams sharing the machine) and a longer one would not,
    the shortest of upstream's + 25 and upstream's + 75 that keeps ahead. When none does (a model slower than real
    time), or before any pass was timed: upstream's (waiting longer would only delay the first audio)."""
    if cost(grid.flow_tokens(upstream_first)) is None or seconds_per_token <= 0:
        return upstream_first
    sizes = [upstream_first + n * grid.hop for n in FIRST_CHUNK_STEPS]
    for size in sizes:
        if grid.limit is not None and size + grid.lookahead >= grid.limit:
            return size  # the whole text fits in it: nothing comes after to run dry for
        if keeps_ahead(grid, size, seconds_per_token, cost, step=grid.hop * grid.scale):
            return size
    return upstream_first


def grown_end(
    grid: ChunkGrid,
    offset: int,
    step: int,
    have: int,
    ended: bool,
    slack: float,
    seconds_per_token: float,
    cost: Callable[[int], Optional[float]],
    wait: float = 0.0,
) -> Optional[int]:
    """The end of the next chunk for a stream `slack` seconds ahead of playback: the default `offset + step`
    (upstream's growth), or, while it is predicted to be out with SAFETY margin before the stream runs dry, the
    chunk doubled, again and again, up to MAX_GROWN_HOP tokens (fewer flow passes: each reruns the flow over
    everything so far). Predicted as `keeps_ahead` does: the tokens still to come at this call's LLM rate, `wait`
    for other streams' passes, then the pass itself. None: the LLM has ended and one final pass over all `have`
    tokens fits (the caller finishes with it)."""
    default = offset + step
    if seconds_per_token <= 0 and not ended:
        return default
    if ended:
        final = cost(grid.prompt_tokens + have)
        if final is not None and SAFETY * (wait + final) <= slack:
            return None
    best, size = default, step * 2
    while size <= MAX_GROWN_HOP:
        end = grid.floor(offset + size)
        if grid.limit is not None and end + grid.lookahead > grid.limit:
            break
        if ended and end + grid.lookahead > have:
            break
        flow = cost(grid.flow_tokens(end))
        if flow is None:
            break
        missing = max(0, end + grid.lookahead - have)
        if SAFETY * (missing * seconds_per_token + wait + flow) > slack:
            break
        best, size = end, size * 2
    return best


def cut_due(slack: float, flow: Optional[float], wait: float) -> bool:
    """A stream waiting for tokens of a grown chunk must cut at what it has now: its next pass (with `wait` for
    other streams) would otherwise be out too late, with SAFETY margin."""
    return flow is not None and SAFETY * (wait + flow) >= slack
