#!/usr/bin/env python3
"""First audio over the OpenAI-compatible HTTP API next to Wyoming's, on one server and one engine.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/openai_first_byte.py [--rounds 20] [--engine espeak]
        [--json out.json]

One server process (`serve`, the web port on) and the same two-sentence, 23-word text asked for in four ways: a
Wyoming `synthesize` and a Wyoming stream (`synthesize-start`, the text in one `synthesize-chunk`, `synthesize-stop`)
timed to the first `audio-chunk` through the `wyoming` client; `POST /v1/audio/speech` as `pcm` and as `mp3`, timed
to the first byte of the body through aiohttp. Every round runs all four, the order rotating each round, after one
unmeasured request of each. A script, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from aiohttp import ClientSession  # noqa: E402
from run_benchmarks import ServerProcess, free_port  # noqa: E402
from wyoming.audio import AudioChunk, AudioStop  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice  # noqa: E402

TEXT = "The heating in the living room was running all day, so I have turned it down a bit for the night. Sleep well."
VOICE = "robot-en"
TOKEN = "benchmark-token"
Probe = Callable[[], Awaitable[tuple[float, float]]]


async def _wyoming(port: int, streamed: bool) -> tuple[float, float]:
    """(first audio, whole reply) in ms through the wyoming client."""
    client = AsyncTcpClient("127.0.0.1", port)
    await client.connect()
    try:
        voice = SynthesizeVoice(name=VOICE)
        started = time.perf_counter()
        if streamed:
            await client.write_event(SynthesizeStart(voice=voice).event())
            await client.write_event(SynthesizeChunk(text=TEXT).event())
            await client.write_event(SynthesizeStop().event())
        else:
            await client.write_event(Synthesize(text=TEXT, voice=voice).event())
        first = None
        while True:
            event = await asyncio.wait_for(client.read_event(), 60)
            if event is None:
                raise RuntimeError("server closed the connection")
            if first is None and AudioChunk.is_type(event.type):
                first = time.perf_counter()
            if AudioStop.is_type(event.type):
                done = time.perf_counter()
                assert first is not None
                return (first - started) * 1000, (done - started) * 1000
    finally:
        await client.disconnect()


async def _http(session: ClientSession, url: str, fmt: str) -> tuple[float, float]:
    """(first body byte, whole body) in ms through aiohttp."""
    body = {"model": "tts-1", "input": TEXT, "voice": VOICE, "response_format": fmt}
    started = time.perf_counter()
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        response.raise_for_status()
        first = None
        async for _chunk in response.content.iter_any():
            first = first or time.perf_counter()
        done = time.perf_counter()
    assert first is not None
    return (first - started) * 1000, (done - started) * 1000


def _config(directory: Path, web_port: int) -> Path:
    (directory / "voices.yaml").write_text(yaml.safe_dump({"voices": [{"name": VOICE, "languages": ["en-US"]}]}))
    config = {
        "engine": {"fallback": None},
        "voice_providers": {"yaml": {"path": "voices.yaml"}},
        "web": {"enabled": True, "port": web_port, "token": TOKEN, "studio": False},
    }
    path = directory / "server.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--engine", default="espeak")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="openai-bench-") as tmp:
        web_port = free_port()
        server = ServerProcess(_config(Path(tmp), web_port), args.engine, Path(tmp) / "server.log")
        try:
            await server.wait_ready()
            url = f"http://127.0.0.1:{web_port}/v1/audio/speech"
            async with ClientSession() as session:
                probes: dict[str, Probe] = {
                    "wyoming synthesize": lambda: _wyoming(server.port, False),
                    "wyoming stream": lambda: _wyoming(server.port, True),
                    "http pcm": lambda: _http(session, url, "pcm"),
                    "http mp3": lambda: _http(session, url, "mp3"),
                }
                for probe in probes.values():  # unmeasured: imports, caches, connections
                    await probe()
                times: dict[str, list[tuple[float, float]]] = {name: [] for name in probes}
                names = list(probes)
                for index in range(args.rounds):
                    order = names[index % len(names) :] + names[: index % len(names)]
                    for name in order:
                        times[name].append(await probes[name]())
        finally:
            server.stop()
    rows = {
        name: {
            "first_median_ms": statistics.median(t[0] for t in values),
            "first_min_ms": min(t[0] for t in values),
            "first_max_ms": max(t[0] for t in values),
            "done_median_ms": statistics.median(t[1] for t in values),
        }
        for name, values in times.items()
    }
    print(f"{'path':22} {'first median':>12} {'min':>7} {'max':>7} {'done median':>12}  (ms, {args.rounds} rounds)")
    for name, row in rows.items():
        print(
            f"{name:22} {row['first_median_ms']:12.1f} {row['first_min_ms']:7.1f} {row['first_max_ms']:7.1f} "
            f"{row['done_median_ms']:12.1f}"
        )
    if args.json:
        facts: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "engine": args.engine,
            "rounds": args.rounds,
            "text": TEXT,
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "rows": rows,
        }
        args.json.write_text(json.dumps(facts, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
