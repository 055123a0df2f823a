#!/usr/bin/env python3
"""First audio of a streamed reply whose first sentence is long: cut at sentence ends vs at the first clause.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/first_clause.py [--rounds 6] [--json out.json]
        [--cosyvoice-repo /path/to/CosyVoice [--cosyvoice-model DIR]]

Home Assistant streams an LLM's reply as `synthesize-chunk`s of a few characters. This sends a 101-character first
sentence (its first comma at character 55) and a short second one as 4 characters every 40 ms (a fast LLM) and every
125 ms (a slow local one) to two servers that differ only in `server.first_clause_words`: 0 (speak from the first
sentence's end, as before) and 5 (the default: speak from the first clause). It times, through the `wyoming` client,
the first `synthesize-chunk` to the first `audio-chunk`, alternating the two servers in every round so machine noise
hits both. Engines: espeak, and with --cosyvoice-repo the real CosyVoice code on a tiny random-weight CosyVoice2 model
(built with `python -m tests.tiny_cosyvoice2` unless --cosyvoice-model names one). A script, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the servers inherit it: OpenMP spin-waits inflate CPU runs

from run_benchmarks import ServerProcess  # noqa: E402
from wyoming.audio import AudioChunk, AudioStart  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.error import Error  # noqa: E402
from wyoming.tts import SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped  # noqa: E402

FIRST = "The heating in the living room was running all the day, so I have turned it down a bit for the night."
TEXT = FIRST + " Sleep well."
PIECE = 4
PACES = {"fast": 0.040, "slow": 0.125}
SETTINGS = (0, 5)
SHARED_VOICES = ROOT.parent / "shared" / "voices"


def sent_at(mark: int, interval: float) -> float:
    """Seconds after the first piece when the piece holding character index `mark` is sent."""
    return (mark // PIECE) * interval


# The first clause can be cut once the space after its comma has arrived; the sentence once the space after its end.
CLAUSE_READY = FIRST.index(", ") + 1
SENTENCE_READY = len(FIRST)


def write_configs(directory: Path, engine: str, cosyvoice: Optional[dict[str, Any]]) -> dict[int, Path]:
    """One server.yaml per first_clause_words setting, same voice and engine."""
    if engine == "espeak":
        voice: dict[str, Any] = {"name": "bench", "languages": ["en-US"]}
        engines: dict[str, Any] = {}
    else:
        assert cosyvoice is not None
        prompt = SHARED_VOICES / "zero_shot_prompt.wav"
        if prompt.is_file():
            voice = {"name": "bench", "reference_audio": str(prompt), "mode": "zero_shot"}
            voice["transcript"] = "希望你以后能够做的比我还好呦。"
        else:
            from tests.cosyvoice_support import write_prompt

            voice = {"name": "bench", "reference_audio": str(write_prompt(directory / "prompt.wav", rate=24000))}
            voice["mode"] = "cross_lingual"
        engines = {"cosyvoice": {**cosyvoice, "cache_dir": str(directory / "cache")}}
    (directory / "voices.yaml").write_text(yaml.safe_dump({"voices": [voice]}, allow_unicode=True))
    paths = {}
    for words in SETTINGS:
        doc = {
            "server": {"uri": "tcp://127.0.0.1:10200", "first_clause_words": words, "log_level": "WARNING"},
            "engine": {"name": engine, "fallback": None},
            "engines": engines,
            "voice_providers": {"yaml": {"path": "voices.yaml"}},
        }
        paths[words] = directory / f"server-{words}.yaml"
        paths[words].write_text(yaml.safe_dump(doc, sort_keys=False))
    return paths


async def stream_once(uri: str, interval: float) -> dict[str, float]:
    """One streamed reply at the given pace: ms from the first piece to the first audio, to the end; audio seconds."""
    host, port = uri.removeprefix("tcp://").rsplit(":", 1)
    client = AsyncTcpClient(host, int(port))
    await asyncio.wait_for(client.connect(), 10)
    clock = time.perf_counter
    try:
        await client.write_event(SynthesizeStart().event())
        started = clock()

        async def send() -> None:
            for i, at in enumerate(range(0, len(TEXT), PIECE)):
                delay = started + i * interval - clock()
                if delay > 0:
                    await asyncio.sleep(delay)  # a fixed schedule: a late piece does not delay the next ones
                await client.write_event(SynthesizeChunk(text=TEXT[at : at + PIECE]).event())
            await client.write_event(SynthesizeStop().event())

        sender = asyncio.create_task(send())
        first, audio_bytes, rate = 0.0, 0, 0
        while True:
            event = await asyncio.wait_for(client.read_event(), 300)
            if event is None:
                raise RuntimeError("server closed the connection")
            if Error.is_type(event.type):
                raise RuntimeError(f"server error: {Error.from_event(event).text}")
            if AudioStart.is_type(event.type):
                rate = AudioStart.from_event(event).rate
            elif AudioChunk.is_type(event.type):
                if not first:
                    first = clock()
                audio_bytes += len(event.payload or b"")
            elif SynthesizeStopped.is_type(event.type):
                break
        await sender
        return {
            "first_audio_ms": (first - started) * 1000.0,
            "total_ms": (clock() - started) * 1000.0,
            "audio_s": audio_bytes / 2 / rate if rate else 0.0,
        }
    finally:
        await client.disconnect()


async def bench_engine(
    engine: str, rounds: int, workdir: Path, cosyvoice: Optional[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Both settings side by side on one engine; every round runs both paces on both servers, order alternating."""
    directory = workdir / engine
    directory.mkdir(parents=True, exist_ok=True)
    paths = write_configs(directory, engine, cosyvoice)
    servers = {words: ServerProcess(paths[words], engine, directory / f"server-{words}.log") for words in SETTINGS}
    samples: dict[tuple[str, int], list[dict[str, float]]] = {(p, w): [] for p in PACES for w in SETTINGS}
    try:
        for words, server in servers.items():
            ready = await server.wait_ready(limit=600.0)
            print(f"{engine}: server first_clause_words={words} ready in {ready:.1f} s", flush=True)
            await stream_once(server.uri, 0.0)  # unmeasured: first-request costs
        for n in range(rounds):
            order = SETTINGS if n % 2 == 0 else SETTINGS[::-1]
            for pace, interval in PACES.items():
                for words in order:
                    result = await stream_once(servers[words].uri, interval)
                    samples[(pace, words)].append(result)
                    print(
                        f"{engine} round {n + 1}/{rounds} {pace} words={words}: first audio "
                        f"{result['first_audio_ms']:.0f} ms, audio {result['audio_s']:.2f} s",
                        flush=True,
                    )
    finally:
        for server in servers.values():
            server.stop()
    rows = []
    for pace, interval in PACES.items():
        for words in SETTINGS:
            runs = samples[(pace, words)]
            firsts = [r["first_audio_ms"] for r in runs]
            rows.append(
                {
                    "engine": engine,
                    "pace": pace,
                    "interval_ms": interval * 1000,
                    "first_clause_words": words,
                    "text_ready_ms": sent_at(CLAUSE_READY if words else SENTENCE_READY, interval) * 1000,
                    "first_audio_median_ms": statistics.median(firsts),
                    "first_audio_min_ms": min(firsts),
                    "first_audio_max_ms": max(firsts),
                    "total_median_ms": statistics.median(r["total_ms"] for r in runs),
                    "audio_median_s": statistics.median(r["audio_s"] for r in runs),
                    "runs": runs,
                }
            )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of docs/benchmarks.md."""
    lines = [
        "| engine | text pace | first piece cut at | its text sent after (ms) | first audio median (ms) "
        "| min / max (ms) | after / before | reply done, median (ms) | audio (s) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    before = {(r["engine"], r["pace"]): r["first_audio_median_ms"] for r in rows if r["first_clause_words"] == 0}
    for r in rows:
        cut = "sentence end (`first_clause_words: 0`)" if r["first_clause_words"] == 0 else "first clause (`5`)"
        ratio = r["first_audio_median_ms"] / before[(r["engine"], r["pace"])]
        lines.append(
            f"| {r['engine']} | 4 chars / {r['interval_ms']:.0f} ms | {cut} | {r['text_ready_ms']:.0f} "
            f"| {r['first_audio_median_ms']:.0f} | {r['first_audio_min_ms']:.0f} / {r['first_audio_max_ms']:.0f} "
            f"| {ratio:.2f} | {r['total_median_ms']:.0f} | {r['audio_median_s']:.2f} |"
        )
    return "\n".join(lines)


def build_tiny(repo: Path, out: Path) -> Path:
    """The tiny random-weight CosyVoice2 model of the integration test (real classes, ~60 MB, ~15 s)."""
    cmd = [sys.executable, "-m", "tests.tiny_cosyvoice2", "--repo", str(repo), "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=900)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds per engine (each: both paces, both settings)")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--cosyvoice-repo", type=Path, help="CosyVoice checkout: also measure the real CosyVoice code")
    parser.add_argument("--cosyvoice-model", type=Path, help="model directory (default: build the tiny CosyVoice2)")
    parser.add_argument("--skip-espeak", action="store_true")
    args = parser.parse_args()
    with open("/proc/loadavg") as f:
        load_start = f.read().split()[0]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="first-clause-") as tmp:
        workdir = Path(tmp)
        if not args.skip_espeak:
            rows += await bench_engine("espeak", args.rounds, workdir, None)
        if args.cosyvoice_repo:
            model = args.cosyvoice_model
            if model is None:
                started = time.perf_counter()
                model = build_tiny(args.cosyvoice_repo, workdir / "CosyVoice2-tiny")
                print(f"tiny CosyVoice2 built in {time.perf_counter() - started:.0f} s", flush=True)
            # The CPU is allowed (this is how it runs here); with CUDA visible the engine uses the GPU.
            section = {"repo": str(args.cosyvoice_repo), "model_dir": str(model), "require_gpu": False}
            rows += await bench_engine("cosyvoice", args.rounds, workdir, section)
    with open("/proc/loadavg") as f:
        load_end = f.read().split()[0]
    facts = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": [load_start, load_end],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "text": TEXT,
        "rounds": args.rounds,
    }
    print(f"\n{facts['date']}, load average {load_start} -> {load_end}, {args.rounds} rounds\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"facts": facts, "rows": rows}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    asyncio.run(main())
