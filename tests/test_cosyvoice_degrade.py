"""More requests at once than the CosyVoice engine admits all get its audio: the REAL upstream CosyVoice2 code (tiny
random model, CPU), `concurrency` 3 with `keep_real_time` on, through the real server and the `wyoming` client.

The measured costs are set as a machine would measure them where one stream fills the model (one more would need
more than its time), so the engine admits one request; the first request's LLM is held at a gate until the other two
wait for room, so no timing is judged. Before `server.when_busy: wait` the two were refused with ServerBusy.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from wyoming.tts import Synthesize, SynthesizeVoice

from wyoming_cosyvoice.config import load_config

from .cosyvoice_support import forget_cosyvoice, write_prompt
from .helpers import collect, connect, running_server, write_config
from .realcode import engine_section

TEXTS = ("Hello there, how are you today?", "The kitchen timer rang twice.", "Two voices at once.")


@pytest.fixture(autouse=True)
def fresh_import() -> Iterator[None]:
    forget_cosyvoice()
    yield
    forget_cosyvoice()


async def wait_for(condition: Callable[[], bool], limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_requests_beyond_what_the_engine_admits_wait_and_all_get_its_audio(
    tmp_path: Path, cosyvoice_repo: Path, tiny_cosyvoice2: Path
) -> None:
    prompt = write_prompt(tmp_path / "prompt.wav", rate=24000, seconds=1.04)
    section = engine_section(
        cosyvoice_repo, tiny_cosyvoice2, tmp_path / "cache", concurrency=3, max_queue=4, keep_real_time=True
    )
    path = write_config(
        tmp_path / "cfg",
        server={"busy_wait_s": 300},
        voices=[{"name": "v", "reference_audio": str(prompt), "mode": "cross_lingual"}],
        engine={"name": "cosyvoice", "fallback": "espeak"},
        engines={"cosyvoice": section},
    )
    async with running_server(load_config(path)) as server:
        service = server.service
        engine, queue = service.engine, service.room_queue(service.engine)
        assert queue is not None and engine.concurrency == 3
        assert service.heard_as(service.catalog.resolve("v")) == "cloned"  # the studio's "heard as"
        costs = engine.scheduling.costs
        costs.llm_s_per_token, costs.flow_per_audio_s, costs.provisional = 0.01, 0.6, True

        opened, held = threading.Event(), threading.Event()
        llm = engine.model.model.llm
        original = llm.inference

        def inference(*args: Any, **kwargs: Any) -> Iterator[int]:
            for n, token in enumerate(original(*args, **kwargs)):
                if n == 1 and not opened.is_set():
                    held.set()
                    opened.wait(120)
                yield token

        async def speak(text: str) -> Any:
            async with connect(server) as client:
                await client.write_event(Synthesize(text=text, voice=SynthesizeVoice(name="v")).event())
                return await collect(client, timeout=300)

        llm.inference = inference
        try:
            first = asyncio.ensure_future(speak(TEXTS[0]))
            await wait_for(held.is_set)
            others = [asyncio.ensure_future(speak(text)) for text in TEXTS[1:]]
            await wait_for(lambda: queue.waiting == 2)  # waiting for room, not refused
            assert engine.room() is not None and engine.in_flight == 1
        finally:
            opened.set()
            llm.inference = original
        replies = await asyncio.gather(first, *others)
        for text, reply in zip(TEXTS, replies, strict=True):
            assert not reply.errors, (text, reply.errors)
            assert reply.stops == 1 and [s.rate for s in reply.starts] == [24000] and reply.seconds > 0.5, text
            assert np.isfinite(reply.samples()).all()
        counts = service.degraded.counts()
        assert counts["waited"] == 2 and counts["fallback"] == 0, counts
