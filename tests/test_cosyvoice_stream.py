"""Our CosyVoice 2/3 streaming loop (plugins/cosyvoice/stream.py) on the stand-in checkout: chunk sizes, the early first
chunk, stopping the LLM of a closed call, LLM failures."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

pytest.importorskip("torch")

from wyoming_cosyvoice.engine import SynthesisOptions  # noqa: E402
from wyoming_cosyvoice.errors import EngineError  # noqa: E402
from wyoming_cosyvoice_plugins.cosyvoice.chunking import ChunkCost, ChunkGrid, first_hop, keeps_ahead  # noqa: E402

from .cosyvoice_support import write_prompt  # noqa: E402
from .test_cosyvoice_engine import LONG_TEXT, fresh_import, settings, speak, started, voice  # noqa: E402,F401

TOKEN = 960  # samples per speech token at 24 kHz (25 tokens per second)
GRID = ChunkGrid(prompt_tokens=60, hop=25, max_hop=100, scale=2, lookahead=3)


def test_first_hop_is_upstreams_or_the_prompt_padding_alone() -> None:
    assert first_hop(75, 25) == (25, 0), "a prompt of a multiple of 25 tokens: nothing to end early at"
    assert first_hop(60, 25) == (40, 15), "upstream: 25 + 15 padding; early: the 15 alone"
    assert first_hop(70, 25) == (30, 0), "5 tokens of padding are too short for a chunk of their own"
    assert first_hop(51, 25) == (49, 24)


def flat(seconds: float) -> Any:
    return lambda tokens: seconds


def test_keeps_ahead_weighs_llm_tokens_and_flow_plus_vocoder() -> None:
    # 15 tokens early = 0.44 s out before the next chunk is due (4 tokens are held back for the cross-fade).
    # LLM at 1000 tokens/s, flow + vocoder free: the next 25 tokens take 25 ms (x1.5): in time, and so on.
    assert keeps_ahead(GRID, 15, 0.001, flat(0.0))
    # At 20 tokens/s the next 25 tokens take 1.25 s: the early chunk would run dry, upstream's first chunk is kept.
    assert not keeps_ahead(GRID, 15, 0.05, flat(0.0))
    # A fast LLM but a flow + vocoder pass of 0.3 s: 0.325 s x 1.5 > 0.44 s. The LLM's rate alone said yes here,
    # and the next chunk arrived after the early one had played (the stalls measured through the server).
    assert not keeps_ahead(GRID, 15, 0.001, flat(0.3))
    assert keeps_ahead(GRID, 15, 0.001, flat(0.2))  # 0.225 x 1.5 = 0.34 s <= 0.44 s
    # No flow + vocoder call seen yet (the warm-up makes the first ones), or no LLM rate: no early chunk.
    assert not keeps_ahead(GRID, 15, 0.001, lambda tokens: None)
    assert not keeps_ahead(GRID, 15, 0.0, flat(0.0))


def test_keeps_ahead_looks_past_the_second_chunk() -> None:
    # Chunk 2 in time (25 ms + 0.2 s, x1.5 = 0.34 s <= 0.44 s), but the pass for chunk 3 (over 60 + 90 + 3 tokens)
    # costs 0.9 s: 1.5 x (0.225 + 0.05 + 0.9) s > 1.44 s of audio out by then.
    def jumping(tokens: int) -> float:
        return 0.2 if tokens <= 103 else 0.9

    assert not keeps_ahead(GRID, 15, 0.001, jumping)
    # A short text ends before that chunk: its LLM makes at most 20 speech tokens per text token.
    assert keeps_ahead(dataclasses.replace(GRID, limit=40), 15, 0.001, jumping)


def test_chunk_cost_fits_the_calls_seen() -> None:
    cost = ChunkCost()
    assert cost.predict(100) is None
    cost.observe(100, 0.2)
    assert cost.predict(50) == pytest.approx(0.2) and cost.predict(200) == pytest.approx(0.4), "scaled up, not down"
    cost.observe(200, 0.3)
    cost.observe(300, 0.4)
    assert cost.predict(400) == pytest.approx(0.5) and cost.predict(0) == pytest.approx(0.1)
    cost.observe(300, 0.1)  # noise can make the fitted slope negative: never predict less than the base
    assert cost.predict(1000) >= 0
    small = ChunkCost(keep=2)
    for seconds in (5.0, 0.1, 0.1):
        small.observe(100, seconds)
    assert small.predict(100) == pytest.approx(0.1), "only the latest calls count (the load changes)"


async def chunk_sizes(tmp_path: Path, text: str, **overrides: Any) -> list[np.ndarray]:
    prompt = write_prompt(tmp_path / "p.wav", seconds=2.4)  # 60 prompt tokens: padding 15 to the next 25
    engine = await started(settings(tmp_path, **overrides), (tars := voice(prompt),))
    try:
        await engine.warmup()  # as the server does: the first flow + vocoder timings
        return await speak(engine, text, tars)
    finally:
        await engine.close()


def chunk_ends(chunks: list[np.ndarray]) -> list[int]:
    """Speech tokens through the flow after each chunk (every chunk is whole tokens of 960 samples)."""
    ends, total = [], 0
    for chunk in chunks:
        assert len(chunk) % TOKEN == 0
        total += len(chunk) // TOKEN
        ends.append(total)
    return ends


def upstream_passes(tokens: int, first: int, hop: int = 25, max_hop: int = 100, lookahead: int = 3) -> int:
    """How many flow + vocoder passes upstream's own loop makes for `tokens` speech tokens (first chunk `first`)."""
    passes, end, step = 0, first, hop * 2
    while end + lookahead <= tokens:
        passes, end, step = passes + 1, end + step, min(max_hop, step * 2)
    return passes + 1  # the final pass over what is left


async def test_fast_llm_gets_an_early_first_chunk_and_the_same_audio(tmp_path: Path) -> None:
    early = await chunk_sizes(tmp_path / "a", LONG_TEXT)
    late = await chunk_sizes(tmp_path / "b", LONG_TEXT, early_first_chunk=False)
    whole = await chunk_sizes(tmp_path / "c", LONG_TEXT, stream=False)
    assert chunk_ends(early)[0] == 15, "the padding alone (60 prompt tokens + 15 = 75)"
    assert chunk_ends(late)[0] == 40, "upstream: 25 + padding"
    # Every chunk but the last ends on the flow's 25-token grid counted from the prompt's start, so the audio is the
    # same as upstream's, only cut differently (the stand-in's sine would jump at a cut off the grid too).
    for chunks in (early, late):
        assert all((60 + end) % 25 == 0 for end in chunk_ends(chunks)[:-1]), chunk_ends(chunks)
        np.testing.assert_allclose(np.concatenate(chunks), np.concatenate(whole), atol=1e-4)


async def test_a_stream_ahead_of_playback_takes_longer_chunks(tmp_path: Path) -> None:
    """Once a stream is ahead, its next chunk grows (fewer passes, each rerunning the flow over all tokens so far);
    with a model barely faster than real time it keeps upstream's sizes."""
    sentence = ", and ".join([LONG_TEXT.rstrip(".")] * 3) + "."  # one sentence: one call of the loop
    fast = await chunk_sizes(tmp_path / "fast", sentence)
    tokens = chunk_ends(fast)[-1]
    assert len(fast) < upstream_passes(tokens, 40), f"{chunk_ends(fast)}: no fewer passes than upstream's loop"
    assert len(fast) <= 3, f"{chunk_ends(fast)}: a model far faster than real time makes few passes"
    # 20 ms per token (0.8x real time) and a flow pass of 1 ms per token: never far enough ahead to wait for more.
    slow = await chunk_sizes(tmp_path / "slow", LONG_TEXT, knobs={"token_s": 0.02, "flow_s": 0.001})
    ends = chunk_ends(slow)
    steps = [b - a for a, b in zip([0, *ends[:-2]], ends[:-1], strict=True)]
    assert steps[:3] == [40, 50, 100][: len(steps[:3])], ends


async def first_chunk_tokens(tmp_path: Path, knobs: dict[str, float], warmup: bool = True) -> int:
    prompt = write_prompt(tmp_path / "p.wav", seconds=2.4)
    engine = await started(settings(tmp_path, knobs=knobs), (tars := voice(prompt),))
    try:
        if warmup:
            await engine.warmup()
        stream = engine.synthesize(LONG_TEXT, tars, SynthesisOptions())
        first = await asyncio.wait_for(stream.__anext__(), 30)
        await stream.aclose()
        return first.samples // TOKEN
    finally:
        await engine.close()


async def test_slow_llm_keeps_upstreams_first_chunk(tmp_path: Path) -> None:
    # 20 tokens per second: the next 25 tokens would take longer than an early 15-token chunk plays.
    assert await first_chunk_tokens(tmp_path, {"token_s": 0.05}) == 40


async def test_slow_flow_and_vocoder_keep_upstreams_first_chunk(tmp_path: Path) -> None:
    # A fast LLM (500 tokens/s) but 4 ms per token of flow + vocoder: the pass for the second chunk (over the
    # 60-token prompt and 43 tokens) takes 0.41 s, so the early chunk's 0.44 s would run dry. (Before the flow's
    # cost was counted, this got the early chunk.)
    assert await first_chunk_tokens(tmp_path / "slow", {"token_s": 0.002, "flow_s": 0.004}) == 40
    # With a fast flow the same LLM gets the early chunk; with no flow + vocoder timing yet (no warm-up), not.
    assert await first_chunk_tokens(tmp_path / "fast", {"token_s": 0.002, "flow_s": 0.0001}) == 15
    assert await first_chunk_tokens(tmp_path / "cold", {"token_s": 0.002}, warmup=False) == 40


def count_tokens(engine: Any) -> list[int]:
    """Wrap the stand-in LLM's inference so the test can count the tokens it really made."""
    llm = engine.model.model.llm
    original = llm.inference
    made = [0]

    def inference(*args: Any, **kwargs: Any) -> Iterator[int]:
        for token in original(*args, **kwargs):
            made[0] += 1
            yield token

    llm.inference = inference
    return made


async def test_closing_a_call_stops_its_llm_at_the_next_token(tmp_path: Path, thread_errors: list[Any]) -> None:
    prompt = write_prompt(tmp_path / "p.wav")
    engine = await started(settings(tmp_path, knobs={"token_s": 0.01}), (tars := voice(prompt),))
    try:
        made = count_tokens(engine)
        stream = engine.synthesize(LONG_TEXT * 4, tars, SynthesisOptions())
        await asyncio.wait_for(stream.__anext__(), 30)  # 28 tokens made by now
        await stream.aclose()  # the client left
        await asyncio.wait_for(engine.run_in_worker(lambda: None), 30)
        stopped_at = made[0]
        assert stopped_at < 60, f"the LLM went on to {stopped_at} tokens (the text asks for several hundred)"
        assert not [t for t in threading.enumerate() if t.name.startswith("cosyvoice-llm-")]
        await asyncio.sleep(0.1)
        assert made[0] == stopped_at
        inner = engine.model.model
        assert inner.tts_speech_token_dict == {} and inner.llm_end_dict == {} and inner.hift_cache_dict == {}
        assert thread_errors == []
        assert len((await speak(engine, "The next one is whole.", tars))[0]) == 25 * TOKEN
    finally:
        await engine.close()


async def test_llm_failure_is_an_engine_error_not_a_hang(tmp_path: Path) -> None:
    prompt = write_prompt(tmp_path / "p.wav")
    engine = await started(settings(tmp_path), (tars := voice(prompt),))
    try:
        llm = engine.model.model.llm
        original = llm.inference

        def failing(*args: Any, **kwargs: Any) -> Iterator[int]:
            for n, token in enumerate(original(*args, **kwargs)):
                if n == 40:
                    raise RuntimeError("CUDA error: device-side assert triggered")
                yield token

        llm.inference = failing
        with pytest.raises(EngineError, match="device-side assert"):
            await asyncio.wait_for(speak(engine, LONG_TEXT, tars), 30)
        llm.inference = original
        assert len(np.concatenate(await speak(engine, "Fine again.", tars))) > 0
        inner = engine.model.model
        assert inner.tts_speech_token_dict == {} and inner.llm_end_dict == {}
    finally:
        await engine.close()


@pytest.mark.parametrize(
    ("version", "overrides", "expected"),
    [
        (2, {}, "own loop, early first chunk"),
        (3, {"early_first_chunk": False}, "own loop"),
        (1, {}, "upstream loop"),
        (2, {"stream": False}, "off"),
    ],
)
async def test_health_says_how_chunks_are_streamed(
    tmp_path: Path, version: int, overrides: dict, expected: str
) -> None:
    engine = await started(settings(tmp_path, version=version, **overrides))
    try:
        assert engine.health()["streaming"] == expected
    finally:
        await engine.close()


async def test_with_vllm_a_closed_call_lets_its_llm_finish(tmp_path: Path, thread_errors: list[Any]) -> None:
    """vLLM keeps per-request state inside upstream's loop: its LLM runs to the end and the tokens are dropped."""
    prompt = write_prompt(tmp_path / "p.wav")
    engine = await started(settings(tmp_path), (tars := voice(prompt),))
    try:
        engine.model.model.llm.vllm = object()  # what upstream's load_vllm attaches to the LLM
        made = count_tokens(engine)
        await speak(engine, LONG_TEXT, tars)
        whole, made[0] = made[0], 0
        stream = engine.synthesize(LONG_TEXT, tars, SynthesisOptions())
        await asyncio.wait_for(stream.__anext__(), 30)
        await stream.aclose()
        await asyncio.wait_for(engine.run_in_worker(lambda: None), 30)
        assert made[0] == whole > 60
        assert thread_errors == []
        inner = engine.model.model
        assert inner.tts_speech_token_dict == {} and inner.llm_end_dict == {} and inner.hift_cache_dict == {}
    finally:
        await engine.close()
