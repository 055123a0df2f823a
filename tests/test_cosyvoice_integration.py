"""Opt-in: the REAL CosyVoice code (checkout in $COSYVOICE_REPO) with a tiny random-weight CosyVoice2 model,
streamed through the real server to the real wyoming client. Audio is noise; every code path is upstream's.

Run: COSYVOICE_REPO=/path/to/CosyVoice .venv/bin/python -m pytest -q -s tests/test_cosyvoice_integration.py
(needs CosyVoice's Python dependencies; see docs/cosyvoice.md "Integration test").
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop

from wyoming_cosyvoice.config import load_config
from wyoming_cosyvoice.engine import SynthesisOptions

from .cosyvoice_support import forget_cosyvoice, write_prompt
from .helpers import SHARED_VOICES, collect, connect, read, running_server, write_config

REPO = os.environ.get("COSYVOICE_REPO")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not REPO, reason="set COSYVOICE_REPO to a CosyVoice checkout to run the integration test"),
]
ROOT = Path(__file__).resolve().parents[1]
TEXT = "The quick brown fox jumps over the lazy dog, and the whole path from client to model is real."


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "CosyVoice2-tiny"
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "tests.tiny_cosyvoice2", "--repo", str(REPO), "--out", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=600,
    )
    print(f"\ntiny CosyVoice2 model built in {time.perf_counter() - started:.1f} s")
    return out


@pytest.fixture(autouse=True)
def fresh_import() -> Any:
    forget_cosyvoice()
    yield
    forget_cosyvoice()


def prompt(tmp_path: Path) -> dict:
    shared = SHARED_VOICES / "zero_shot_prompt.wav"
    if shared.is_file():
        return {
            "name": "prompt",
            "reference_audio": str(shared),
            "mode": "zero_shot",
            "transcript": "希望你以后能够做的比我还好呦。",
        }
    return {
        "name": "prompt",
        "reference_audio": str(write_prompt(tmp_path / "p.wav", rate=24000)),
        "mode": "cross_lingual",
    }


async def timed(client: Any, text: str) -> tuple[int, np.ndarray, list[int], float, float]:
    """(rate, samples, chunk sizes, time to first audio, total time) of one synthesize request."""
    started = time.perf_counter()
    await client.write_event(Synthesize(text=text).event())
    rate, audio, sizes, first = 0, b"", [], float("nan")
    while True:
        event = await read(client, 120)
        assert event is not None and event.type != "error", event
        if AudioStart.is_type(event.type):
            rate = AudioStart.from_event(event).rate
        elif AudioChunk.is_type(event.type):
            if not sizes:
                first = time.perf_counter() - started
            sizes.append(len(event.payload or b""))
            audio += event.payload or b""
        elif AudioStop.is_type(event.type):
            samples = np.frombuffer(audio, dtype="<i2").astype(np.float32) / 32768.0
            return rate, samples, sizes, first, time.perf_counter() - started


async def test_real_cosyvoice2_streams_through_the_server(tmp_path: Path, tiny_model: Path) -> None:
    import torch

    section = {
        "repo": REPO,
        "model_dir": str(tiny_model),
        "cache_dir": str(tmp_path / "cache"),
        "require_gpu": bool(torch.cuda.is_available()),
    }
    path = write_config(
        tmp_path / "cfg",
        voices=[prompt(tmp_path)],
        engine={"name": "cosyvoice", "fallback": None},
        engines={"cosyvoice": section},
    )
    started = time.perf_counter()
    async with running_server(load_config(path)) as server:
        print(f"server ready (load + prepare + warm-up) in {time.perf_counter() - started:.1f} s")
        engine = server.service.engine
        async with connect(server) as client:
            await client.write_event(Describe().event())
            info = Info.from_event(await read(client, 60))
            assert "state=ready" in info.tts[0].description and "CosyVoice2" in info.tts[0].description
            for n in range(3):
                rate, samples, sizes, first, total = await timed(client, TEXT)
                seconds = len(samples) / 24000
                assert rate == 24000 and len(sizes) >= 2 and seconds > 1.0
                assert np.isfinite(samples).all() and np.abs(samples).max() <= 1.0
                print(
                    f"request {n + 1}: {len(sizes)} chunks, {seconds:.2f} s audio, first audio {first * 1000:.0f} ms, "
                    f"total {total:.2f} s, rtf {total / seconds:.2f}"
                )
            # Upstream's token_hop_len growth would make later first chunks longer; the engine resets it.
            # (Measured on the engine's own chunks: the server splits them into <= 0.5 s Wyoming chunks.)
            profile = server.service.catalog.default
            firsts = []
            for _ in range(3):
                chunks = [c async for c in engine.synthesize(TEXT, profile, SynthesisOptions())]
                firsts.append(chunks[0].samples)
            print(f"engine first chunks: {[round(f / 24000, 2) for f in firsts]} s")
            assert firsts[0] == firsts[1] == firsts[2]

            await client.write_event(SynthesizeStart().event())
            for piece in ("First sentence here. ", "And a second ", "one to finish."):
                await client.write_event(SynthesizeChunk(text=piece).event())
            await client.write_event(SynthesizeStop().event())
            reply = await collect(client, until="synthesize-stopped", timeout=120)
            assert not reply.errors and reply.stopped and len(reply.starts) == 1 and reply.seconds > 1.0
        async with connect(server) as client:  # leave mid-stream: upstream's per-call state must not leak
            await client.write_event(Synthesize(text=TEXT * 4).event())
            await read(client, 120)
        for _ in range(600):
            if not engine.busy:
                break
            await asyncio.sleep(0.1)
        assert engine.model.model.tts_speech_token_dict == {} and engine.model.model.hift_cache_dict == {}
