"""No stream falls behind real time because of an early first chunk: the REAL upstream CosyVoice2 code (tiny random
model, CPU) through the real server and the `wyoming` client, with two prompts whose padding allows an early first
chunk (12 tokens = 0.32 s of audio, and 24 tokens = 0.8 s). Per chunk: the time since the first chunk arrived
must not exceed the audio delivered before it (small tolerance for the shared machine's scheduling).

A stream whose first chunk is upstream's own (the engine judged the model too slow for an early one) can still fall
behind when the machine itself is slower than real time (two loaded CPU cores: the flow pass over 100 tokens took
2-3 s at a load average of 8); that is the hardware, not the early chunk, so it is printed, not asserted. When no
request got an early first chunk there is nothing to judge and the test says so (skip).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from wyoming.audio import AudioChunk, AudioStart, AudioStop  # noqa: E402
from wyoming.tts import Synthesize, SynthesizeVoice  # noqa: E402

from wyoming_cosyvoice.config import load_config  # noqa: E402
from wyoming_cosyvoice_plugins.cosyvoice import stream  # noqa: E402
from wyoming_cosyvoice_plugins.cosyvoice.chunking import keeps_ahead  # noqa: E402

from .cosyvoice_support import forget_cosyvoice, write_prompt  # noqa: E402
from .helpers import connect, read, running_server, write_config  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog, and the whole path from client to model is real."
TOLERANCE_S = 0.05
"""Scheduling noise allowed per chunk (two processes' worth of wake-ups on a shared 2-core machine)."""

FORCED_TOKENS = 125
"""Speech tokens per LLM call (5 s of audio): equal work on every request, four chunks each."""


async def stream_timeline(client: Any, text: str, voice: str) -> list[tuple[float, float]]:
    """(arrival time, seconds of audio) of every audio chunk of one synthesize request."""
    await client.write_event(Synthesize(text=text, voice=SynthesizeVoice(name=voice)).event())
    rate, width, channels, chunks = 0, 2, 1, []
    while True:
        event = await read(client, 120)
        assert event is not None and event.type != "error", event
        if AudioStart.is_type(event.type):
            start = AudioStart.from_event(event)
            rate, width, channels = start.rate, start.width, start.channels
        elif AudioChunk.is_type(event.type):
            chunks.append((time.perf_counter(), len(event.payload or b"") / (rate * width * channels)))
        elif AudioStop.is_type(event.type):
            return chunks


def stall(chunks: list[tuple[float, float]]) -> float:
    """How long playback that starts with the first chunk would have run dry (<= 0: it never did)."""
    worst, played = 0.0, 0.0
    for arrival, seconds in chunks:
        worst = max(worst, arrival - chunks[0][0] - played)
        played += seconds
    return worst


async def test_no_stream_falls_behind_real_time(
    tmp_path: Path, cosyvoice_repo: Path, tiny_cosyvoice2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from gpu_compare import ForcedTokens  # the benchmark's equal-work patch of upstream's LLM

    forget_cosyvoice()
    repo, model_dir = cosyvoice_repo, tiny_cosyvoice2
    # Voiced tones of 1.52 s and 1.04 s: 38 and 26 prompt tokens, padded by 12 and 24 to the next multiple of 25
    # (short prompts: the flow reruns over the prompt too, so each pass is cheaper and an early chunk more likely).
    voices = [
        {
            "name": f"pad{pad}",
            "reference_audio": str(write_prompt(tmp_path / f"{pad}.wav", rate=24000, seconds=s)),
            "mode": "cross_lingual",
        }
        for pad, s in ((12, 1.52), (24, 1.04))
    ]
    section = {
        "repo": str(repo),
        "model_dir": str(model_dir),
        "cache_dir": str(tmp_path / "cache"),
        "require_gpu": False,
    }
    path = write_config(
        tmp_path / "cfg", voices=voices, engine={"name": "cosyvoice", "fallback": None}, engines={"cosyvoice": section}
    )
    try:
        async with running_server(load_config(path)) as server:
            forced = ForcedTokens(FORCED_TOKENS)
            forced.install()
            decisions: list[bool] = []

            def recorded(*args: Any, **kwargs: Any) -> bool:
                decisions.append(keeps_ahead(*args, **kwargs))
                return decisions[-1]

            monkeypatch.setattr(stream, "keeps_ahead", recorded)
            rows = []
            async with connect(server) as client:
                for n in range(4):
                    name = voices[n % 2]["name"]
                    chunks = await stream_timeline(client, TEXT, name)
                    assert len(decisions) == n + 1, "every request decided on its first chunk"
                    rows.append((name, decisions[-1], chunks[0][1], stall(chunks)))
        print()
        for name, early, first, behind in rows:
            print(
                f"{name}: first Wyoming chunk {first:.2f} s, {'early' if early else 'upstream'} first chunk, "
                f"{f'fell behind by {behind * 1000:.0f} ms' if behind > 0 else 'never behind'}"
            )
        assert set(forced.calls) == {FORCED_TOKENS}, "equal work: every LLM call made the forced tokens"
        judged = [row for row in rows if row[1]]
        if not judged:
            pytest.skip("no request got an early first chunk (this machine is too slow right now): nothing to judge")
        assert all(behind <= TOLERANCE_S for _, _, _, behind in judged), rows
    finally:
        forget_cosyvoice()
