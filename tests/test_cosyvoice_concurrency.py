"""Several requests in flight on ONE CosyVoice model: the REAL upstream CosyVoice2 code (tiny random model, CPU)
through the real server and the `wyoming` client.

Every reply is complete and exactly as long as the minimum-length model makes it (2 speech tokens, 80 ms, per text
token), with two and with four requests at once; a request that arrives while others stream gets its first audio
before they finish; a client that leaves mid-stream does not disturb the others; a fault in one request (an
exception in its LLM, or in one of its flow + vocoder passes) fails that request only. No timing is judged: where
an order matters, the other requests' LLMs are held at a gate until it has happened (with one request at a time
the newcomer would then never get audio, and the test would fail on its read timeout).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from wyoming.audio import AudioChunk
from wyoming.error import Error
from wyoming.tts import Synthesize, SynthesizeVoice

from wyoming_cosyvoice.config import load_config
from wyoming_cosyvoice.server import Server

from .cosyvoice_support import forget_cosyvoice, write_prompt
from .helpers import Reply, collect, connect, read, running_server, write_config
from .realcode import engine_section
from .test_cosyvoice_realcode import full_seconds

TEXTS = (
    "Hello there, how are you today?",
    "The kitchen timer rang twice before anyone noticed it.",
    "Four voices can speak at once on one model.",
    "Every reply must be whole and exactly as long as expected.",
)
# 80 text tokens for the tiny model's tokenizer (the texts above: 21 to 50), so 160 speech tokens (6.4 s).
LONG = "This long sentence keeps its request streaming for a while, so that others arrive while it is still spoken"
LONG_TOKENS = 60
"""Calls with at least this many text tokens are LONG's."""


@pytest.fixture(autouse=True)
def fresh_import() -> Iterator[None]:
    forget_cosyvoice()
    yield
    forget_cosyvoice()


def config(tmp_path: Path, repo: Path, model: Path) -> Path:
    # A short prompt (26 tokens): each flow pass reruns over the prompt too, so the tests stay cheap.
    prompt = write_prompt(tmp_path / "prompt.wav", rate=24000, seconds=1.04)
    section = engine_section(repo, model, tmp_path / "cache", concurrency=4, max_queue=4, keep_real_time=False)
    return write_config(
        tmp_path / "cfg",
        server={"max_concurrent": 8},
        voices=[{"name": "v", "reference_audio": str(prompt), "mode": "cross_lingual"}],
        engine={"name": "cosyvoice", "fallback": None},
        engines={"cosyvoice": section},
    )


async def speak(server: Server, text: str) -> Reply:
    async with connect(server) as client:
        await client.write_event(Synthesize(text=text, voice=SynthesizeVoice(name="v")).event())
        return await collect(client, timeout=300)


def assert_whole(engine: Any, reply: Reply, text: str) -> None:
    assert not reply.errors, reply.errors
    assert reply.stops == 1 and reply.seconds == pytest.approx(full_seconds(engine, text), abs=1e-6), text
    assert np.isfinite(reply.samples()).all()


class Gate:
    """Holds the LLM of every call whose text has at least `min_tokens` tokens once it has made `after` speech
    tokens, until `open()`; counts the calls it holds."""

    def __init__(self, engine: Any, min_tokens: int, after: int) -> None:
        self.opened = threading.Event()
        self.held = 0
        self._lock = threading.Lock()
        llm = engine.model.model.llm
        original = llm.inference

        def inference(*args: Any, **kwargs: Any) -> Iterator[int]:
            gated = int(kwargs["text"].shape[1]) >= min_tokens
            for n, token in enumerate(original(*args, **kwargs)):
                if gated and n == after:
                    with self._lock:
                        self.held += 1
                    self.opened.wait(300)
                yield token

        llm.inference = inference
        self._restore = lambda: setattr(llm, "inference", original)

    def open(self) -> None:
        self.opened.set()
        self._restore()


async def wait_until(condition: Any, limit: float = 300.0) -> None:
    for _ in range(int(limit / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_concurrent_requests_on_one_model(tmp_path: Path, cosyvoice_repo: Path, tiny_cosyvoice2: Path) -> None:
    async with running_server(load_config(config(tmp_path, cosyvoice_repo, tiny_cosyvoice2))) as server:
        engine = server.service.engine
        assert engine.concurrency == 4 and engine.health()["concurrency"] == "4 (set)"
        inner = engine.model.model

        # Two, then four at once: every reply whole and exactly as long as the model makes it.
        for texts in (TEXTS[:2], TEXTS):
            replies = await asyncio.gather(*(speak(server, text) for text in texts))
            for text, reply in zip(texts, replies, strict=True):
                assert_whole(engine, reply, text)
        assert engine.scheduling.scheduler.open_streams == 0 and engine.in_flight == 0

        # A request that arrives while two others stream gets its first audio before they finish: their LLMs are
        # held after 130 of their 160 tokens (past the longest first chunk, 124 + 3 look-ahead, so their first
        # chunks can be out) until the newcomer has its first audio.
        gate = Gate(engine, min_tokens=LONG_TOKENS, after=130)
        long_clients = [asyncio.ensure_future(speak(server, LONG)) for _ in range(2)]
        await wait_until(lambda: gate.held == 2)
        async with connect(server) as client:
            await client.write_event(Synthesize(text=TEXTS[0], voice=SynthesizeVoice(name="v")).event())
            while True:
                event = await read(client, 300)
                assert event is not None and not Error.is_type(event.type), event
                if AudioChunk.is_type(event.type):
                    break
            assert not any(task.done() for task in long_clients), "the newcomer's first audio came first"
            gate.open()
            rest = await collect(client, timeout=300)
        assert not rest.errors and rest.stops == 1
        for reply in await asyncio.gather(*long_clients):
            assert_whole(engine, reply, LONG)

        # One client leaves after its first audio; the two others are not disturbed, and its state is cleaned.
        async def leaver() -> None:
            async with connect(server) as client:
                await client.write_event(Synthesize(text=LONG, voice=SynthesizeVoice(name="v")).event())
                while True:
                    event = await read(client, 300)
                    assert event is not None and not Error.is_type(event.type), event
                    if AudioChunk.is_type(event.type):
                        break

        staying = [asyncio.ensure_future(speak(server, text)) for text in TEXTS[1:3]]
        await leaver()
        for text, reply in zip(TEXTS[1:3], await asyncio.gather(*staying), strict=True):
            assert_whole(engine, reply, text)
        await wait_until(lambda: engine.in_flight == 0 and engine.scheduling.scheduler.open_streams == 0)
        assert inner.tts_speech_token_dict == {} and inner.llm_end_dict == {} and inner.hift_cache_dict == {}


async def test_a_fault_in_one_request_fails_only_that_one(
    tmp_path: Path, cosyvoice_repo: Path, tiny_cosyvoice2: Path, thread_errors: list[Any]
) -> None:
    async with running_server(load_config(config(tmp_path, cosyvoice_repo, tiny_cosyvoice2))) as server:
        engine = server.service.engine
        inner = engine.model.model
        # An exception in one call's second flow + vocoder pass (the first call to get that far).
        token2wav = inner.token2wav
        passes: dict[str, int] = {}
        failed: list[str] = []

        def faulty(*args: Any, **kwargs: Any) -> Any:
            key = kwargs["uuid"]
            passes[key] = passes.get(key, 0) + 1
            if passes[key] == 2 and not failed:
                failed.append(key)
                raise RuntimeError("injected fault in token2wav")
            return token2wav(*args, **kwargs)

        inner.token2wav = faulty
        replies = await asyncio.gather(*(speak(server, text) for text in TEXTS[1:]))
        inner.token2wav = token2wav
        broken = [r for r in replies if r.errors]
        assert len(broken) == 1 and "injected fault in token2wav" in broken[0].errors[0].text
        for text, reply in zip(TEXTS[1:], replies, strict=True):
            if not reply.errors:
                assert_whole(engine, reply, text)

        # An exception in one call's LLM (the call with the longest text).
        llm = inner.llm
        original = llm.inference

        def failing(*args: Any, **kwargs: Any) -> Iterator[int]:
            for n, token in enumerate(original(*args, **kwargs)):
                if n == 30 and int(kwargs["text"].shape[1]) >= LONG_TOKENS:
                    raise RuntimeError("injected fault in the LLM")
                yield token

        llm.inference = failing
        texts = (LONG, *TEXTS[:2])
        replies = await asyncio.gather(*(speak(server, text) for text in texts))
        llm.inference = original
        assert replies[0].errors and "injected fault in the LLM" in replies[0].errors[0].text
        for text, reply in zip(texts[1:], replies[1:], strict=True):
            assert_whole(engine, reply, text)
        await wait_until(lambda: engine.in_flight == 0 and engine.scheduling.scheduler.open_streams == 0)
        assert inner.tts_speech_token_dict == {} and inner.llm_end_dict == {} and inner.hift_cache_dict == {}
        assert_whole(engine, await speak(server, TEXTS[0]), TEXTS[0])
        assert thread_errors == []
