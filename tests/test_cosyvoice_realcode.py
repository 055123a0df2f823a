"""The REAL upstream CosyVoice code (1, 2 and 3) with tiny random-weight models built by tests/tiny_cosyvoice.py,
through the real server and the `wyoming` client: every mode each version has, streaming, a client leaving
mid-stream, a restart that loads prepared voices from the disk cache, and text normalized as upstream intends.

The audio is noise; every code path (tokenizers, LLM, flow, vocoder, frontend, text normalization) is upstream's.
The models stop exactly at their minimum length (2 speech tokens per text token), so durations follow from the text:
a CosyVoice 2/3 token is 40 ms of audio. Skipped, with one line at the end of the run, without a checkout
($COSYVOICE_REPO, else ../shared/cosyvoice-upstream) or without the dependencies (script/setup-cosyvoice).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from wyoming.audio import AudioChunk
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

from wyoming_cosyvoice.config import load_config
from wyoming_cosyvoice.server import Server

from .cosyvoice_support import forget_cosyvoice, write_prompt
from .helpers import SHARED_VOICES, Reply, collect, connect, read, running_server, write_config
from .realcode import engine_section

SHORT = "Hello there, how are you today?"
NUMBER, SPELLED, UNNORMALIZED = "Add 12.5 grams.", "Add twelve point five grams.", "Add twelve.five grams."
"""A number as written, as wetext says it, and as upstream's fallback (inflect alone) would say it."""
LONG = "The quick brown fox jumps over the lazy dog, and the whole path from the client to the model is real."
PARAGRAPHS = (
    "On 3 March 2024 the kitchen timer rang 12 times before anyone noticed it, and the soup had boiled over twice. "
    "Everyone laughed about it later, but nobody wanted to clean the stove that evening, not even the cat.\n\n"
    "The next morning 7 people came to help, bringing 4 sponges, 2 buckets and a great deal of advice. "
    "By noon the kitchen was shining again, and the timer was put away in a drawer where it still sits today."
)
TRANSCRIPT = "Add 12.5 grams of salt."
"""A prepared voice's transcript with a number: prepared as upstream's inference_zero_shot would normalize it."""


@pytest.fixture(autouse=True)
def fresh_import() -> Iterator[None]:
    forget_cosyvoice()
    yield
    forget_cosyvoice()


def prompts(tmp_path: Path) -> tuple[Path, Path, str]:
    """(zero-shot prompt, cross-lingual prompt, zero-shot transcript): the shared voices, else synthetic ones."""
    zero, cross = SHARED_VOICES / "zero_shot_prompt.wav", SHARED_VOICES / "cross_lingual_prompt.wav"
    if zero.is_file() and cross.is_file():
        return zero, cross, "希望你以后能够做的比我还好呦。"
    return write_prompt(tmp_path / "zero.wav", rate=24000), write_prompt(tmp_path / "cross.wav", 220.0), "Hello."


def voices(version: int, tmp_path: Path) -> list[dict[str, Any]]:
    """One voice per mode the version supports, plus a zero-shot voice whose transcript has a number."""
    zero, cross, transcript = prompts(tmp_path)
    numbers = write_prompt(tmp_path / "numbers.wav", pitch=150.0, rate=24000)
    found = [
        {"name": "zero", "reference_audio": str(zero), "mode": "zero_shot", "transcript": transcript},
        {"name": "cross", "reference_audio": str(cross), "mode": "cross_lingual", "languages": ["en-US"]},
        {"name": "numbers", "reference_audio": str(numbers), "mode": "zero_shot", "transcript": TRANSCRIPT},
    ]
    if version == 1:
        found += [
            {"name": "sft", "mode": "sft", "speaker": "英文男"},
            {"name": "instruct", "mode": "instruct", "speaker": "英文男", "instruct": "A calm, warm narrator."},
        ]
    else:
        found.append(
            {"name": "instruct", "reference_audio": str(zero), "mode": "instruct", "instruct": "Speak slowly."}
        )
    return found


def config(tmp_path: Path, version: int, repo: Path, model: Path, cache: Path) -> Path:
    return write_config(
        tmp_path / f"cfg-v{version}",
        voices=voices(version, tmp_path),
        engine={"name": "cosyvoice", "fallback": None},
        engines={"cosyvoice": engine_section(repo, model, cache)},
    )


async def speak(server: Server, text: str, voice: str) -> Reply:
    async with connect(server) as client:
        await client.write_event(Synthesize(text=text, voice=SynthesizeVoice(name=voice)).event())
        reply = await collect(client, timeout=120)
    assert not reply.errors, reply.errors
    assert reply.stops == 1 and reply.seconds > 0, f"{voice}: no audio"
    samples = reply.samples()
    assert np.isfinite(samples).all() and np.abs(samples).max() <= 1.0
    return reply


class Chunks:
    """Counts the engine's own chunks and seconds of audio per request (the server re-cuts them into shorter Wyoming
    chunks); passes everything through unchanged."""

    def __init__(self, engine: Any) -> None:
        self.counts: list[int] = []
        self.seconds: list[float] = []
        original = engine.generate

        def generate(*args: Any, **kwargs: Any) -> Iterator[bytes]:
            self.counts.append(0)
            self.seconds.append(0.0)
            for pcm in original(*args, **kwargs):
                self.counts[-1] += 1
                self.seconds[-1] += len(pcm) / 2 / engine.sample_rate
                yield pcm

        engine.generate = generate


def full_seconds(engine: Any, text: str) -> float:
    """Audio the minimum-length model makes for `text`: 2 speech tokens per text token of each normalized segment."""
    frontend = engine.model.frontend
    tokens = sum(len(frontend.tokenizer.encode(s)) for s in frontend.text_normalize(" ".join(text.split())))
    return 2 * tokens * (0.02 if engine.info.version == 1 else 0.04)


async def leave_mid_stream(server: Server, engine: Any, chunks: Chunks, voice: str) -> None:
    """A client leaves after its first audio: the request stops early, upstream's per-call state is cleaned, and
    the next request is served."""
    from wyoming_cosyvoice_plugins.cosyvoice.sessions import session_keys

    text = PARAGRAPHS * 6
    async with connect(server) as client:
        await client.write_event(Synthesize(text=text, voice=SynthesizeVoice(name=voice)).event())
        while True:
            event = await read(client, 120)
            assert event is not None and event.type != "error", event
            if AudioChunk.is_type(event.type):
                break
    for _ in range(1200):
        if not engine.busy:
            break
        await asyncio.sleep(0.1)
    assert not engine.busy
    made, full = chunks.seconds[-1], full_seconds(engine, text)
    assert made < full / 3, f"{made:.1f} s of {full:.1f} s made after the client left"
    assert session_keys(engine.model.model) == set(), "per-call state left behind"
    await speak(server, SHORT, voice)


async def describe(server: Server) -> str:
    async with connect(server) as client:
        await client.write_event(Describe().event())
        return Info.from_event(await read(client, 60)).tts[0].description


def prompt_text(engine: Any, voice: str) -> str:
    """The prompt text a prepared voice holds in upstream's spk2info, decoded with the model's own tokenizer."""
    signature = engine._signatures[voice]
    entry = engine.model.frontend.spk2info[engine._prepared[signature].spk_id]
    tokens = entry["prompt_text"].flatten().tolist()
    tokenizer = engine.model.frontend.tokenizer
    return getattr(tokenizer, "tokenizer", tokenizer).decode(tokens)


async def restart_from_cache(path: Path, prompt_voices: int, caplog: pytest.LogCaptureFixture) -> None:
    """A second start with the same cache directory loads every prepared voice from disk."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="wyoming_cosyvoice_plugins.cosyvoice"):
        async with running_server(load_config(path)) as server:
            engine = server.service.engine
            assert (engine.cache.hits, engine.cache.misses) == (prompt_voices, 0)
            assert engine.health()["prompt_cache"] == f"{prompt_voices} hits/0 computed"
            assert sum("from cache" in r.getMessage() for r in caplog.records) == prompt_voices
            await speak(server, SHORT, "zero")


async def test_cosyvoice1_real_code(
    tmp_path: Path, cosyvoice_repo: Path, tiny_cosyvoice1: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = config(tmp_path, 1, cosyvoice_repo, tiny_cosyvoice1, tmp_path / "cache")
    async with running_server(load_config(path)) as server:
        engine = server.service.engine
        description = await describe(server)
        assert "state=ready" in description and "CosyVoice (" in description
        assert "text_normalizer=wetext" in description and engine.health()["text_normalizer"] == "wetext"
        assert engine.cache.misses == 3  # zero, cross, numbers; sft and instruct use built-in speakers
        chunks = Chunks(engine)
        for voice in ("sft", "instruct", "zero"):
            reply = await speak(server, SHORT, voice)
            assert reply.rate == 22050

        # Cross-lingual keeps upstream's normalization and sentence split: the language tag goes on each segment.
        segments: list[str] = []
        frontend = engine.model.frontend
        original = frontend.frontend_cross_lingual
        frontend.frontend_cross_lingual = lambda text, *a, **k: (segments.append(text), original(text, *a, **k))[1]
        reply = await speak(server, PARAGRAPHS, "cross")
        frontend.frontend_cross_lingual = original
        assert len(segments) >= 2, segments
        assert all(s.startswith("<|en|>") for s in segments), segments
        assert not any(ch.isdigit() for s in segments for ch in s), f"numbers left as digits: {segments}"
        assert "march" in " ".join(segments).lower()
        # Upstream's own loop streams CosyVoice 1: at least one chunk per segment.
        assert chunks.counts[-1] >= len(segments) and reply.seconds > 2.0

        await leave_mid_stream(server, engine, chunks, "zero")
    await restart_from_cache(path, 3, caplog)


async def test_cosyvoice2_real_code(
    tmp_path: Path, cosyvoice_repo: Path, tiny_cosyvoice2: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = config(tmp_path, 2, cosyvoice_repo, tiny_cosyvoice2, tmp_path / "cache")
    async with running_server(load_config(path)) as server:
        engine = server.service.engine
        description = await describe(server)
        assert "state=ready" in description and "CosyVoice2" in description
        assert "text_normalizer=wetext" in description
        assert engine.cache.misses == 4
        # The transcript was normalized as upstream's inference_zero_shot would (add_zero_shot_spk does not).
        assert prompt_text(engine, "numbers") == "Add twelve point five grams of salt."

        chunks = Chunks(engine)
        for voice in ("zero", "cross", "instruct"):
            reply = await speak(server, SHORT, voice)
            assert reply.rate == 24000
        # Streaming: several chunks; the minimum-length model makes 2 tokens (80 ms) per text token.
        reply = await speak(server, LONG, "zero")
        assert chunks.counts[-1] >= 2 and reply.seconds == pytest.approx(full_seconds(engine, LONG), abs=1e-6)

        # Numbers are read as words (wetext): "12.5" sounds as long as "twelve point five", not "twelve.five".
        said = [(await speak(server, text, "zero")).seconds for text in (NUMBER, SPELLED, UNNORMALIZED)]
        assert said[0] == said[1] != said[2], said

        # Text streamed in (Home Assistant's LLM replies) is spoken too.
        async with connect(server) as client:
            await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="zero")).event())
            for piece in ("First sentence here. ", "And a second ", "one to finish."):
                await client.write_event(SynthesizeChunk(text=piece).event())
            await client.write_event(SynthesizeStop().event())
            reply = await collect(client, until="synthesize-stopped", timeout=120)
        assert not reply.errors and reply.stopped and reply.seconds > 1.0

        await leave_mid_stream(server, engine, chunks, "zero")
    await restart_from_cache(path, 4, caplog)


async def test_cosyvoice3_real_code(
    tmp_path: Path, cosyvoice_repo: Path, tiny_cosyvoice3: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = config(tmp_path, 3, cosyvoice_repo, tiny_cosyvoice3, tmp_path / "cache")
    async with running_server(load_config(path)) as server:
        engine = server.service.engine
        description = await describe(server)
        assert "state=ready" in description and "CosyVoice3" in description
        assert engine.cache.misses == 4
        # CosyVoice 3's prompt carries <|endofprompt|>: upstream's inference_zero_shot leaves such a text as it is.
        assert prompt_text(engine, "numbers") == f"You are a helpful assistant.<|endofprompt|>{TRANSCRIPT}"

        chunks = Chunks(engine)
        for voice in ("zero", "cross", "instruct"):
            reply = await speak(server, SHORT, voice)
            assert reply.rate == 24000
        reply = await speak(server, LONG, "cross")
        assert chunks.counts[-1] >= 2 and reply.seconds > 3.0
        await leave_mid_stream(server, engine, chunks, "instruct")
    await restart_from_cache(path, 4, caplog)
