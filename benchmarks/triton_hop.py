#!/usr/bin/env python3
"""What the Triton hop adds to the time to first audio, on loopback (not a test; numbers for docs/triton.md).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/triton_hop.py [--repo ../shared/cosyvoice-upstream]
        [--requests 10] [--json docs/benchmark-results/triton-hop-DATE.json]

Two comparisons, each alternating its two paths request by request in one run (the machine is shared and noisy:
compare within a run, read the paired differences), a new Wyoming connection per request as Home Assistant makes:
1. zero-cost audio: the `pcm` engine (benchmarks/plugins, yields at once) in our server, against our server's
   Triton engine -> a real tritonserver (nvidia-pytriton, CPU) -> the tone model with upstream's contract
   (tests/triton_models/tone_model.py). The difference is the hop itself: request encoding with a 3 s 16 kHz
   reference, gRPC, Triton's scheduler, the Python backend's IPC, and back. Then the Triton engine alone (no
   Wyoming server), request -> first waveform, with only text and with a 3 s reference.
2. the same tiny real CosyVoice2 model (tests/tiny_cosyvoice2.py, real upstream code, random weights) in our
   CosyVoice engine in-process, against the same engine code running inside Triton (tests/triton_models/
   cosyvoice2_model.py) behind our Triton engine. Needs CosyVoice's dependencies; skipped without --repo.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wyoming.audio import AudioChunk, AudioStop  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.tts import Synthesize  # noqa: E402

from tests.cosyvoice_support import write_prompt  # noqa: E402
from tests.triton_support import MODELS, TritonServer, unavailable  # noqa: E402
from wyoming_cosyvoice.config import load_config  # noqa: E402
from wyoming_cosyvoice.plugins import Plugins  # noqa: E402
from wyoming_cosyvoice.server import Server, build_service  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog, and the whole path from client to model is real."


async def one_request(port: int, text: str) -> tuple[float, float, float]:
    """(first audio, total, audio seconds) of one synthesize on a new connection."""
    client = AsyncTcpClient("127.0.0.1", port)
    started = time.perf_counter()
    await client.connect()
    try:
        await client.write_event(Synthesize(text=text).event())
        first, samples, rate = 0.0, 0, 1
        while True:
            event = await asyncio.wait_for(client.read_event(), 300)
            if event is None or event.type == "error":
                raise RuntimeError(f"request failed: {event}")
            if AudioChunk.is_type(event.type):
                chunk = AudioChunk.from_event(event)
                first = first or time.perf_counter() - started
                samples += len(chunk.audio) // 2
                rate = chunk.rate
            elif AudioStop.is_type(event.type):
                return first, time.perf_counter() - started, samples / rate
    finally:
        await client.disconnect()


async def serve(directory: Path, voices: list[dict[str, Any]], engine: str, section: dict[str, Any]) -> Server:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "voices.yaml").write_text(yaml.safe_dump({"voices": voices}))
    doc = {
        "server": {"uri": "tcp://127.0.0.1:0", "plugins_dir": str(ROOT / "benchmarks" / "plugins")},
        "engine": {"name": engine, "fallback": None},
        "voice_providers": {"yaml": {"path": "voices.yaml"}},
        "engines": {engine: section},
    }
    (directory / "server.yaml").write_text(yaml.safe_dump(doc))
    config = load_config(directory / "server.yaml")
    server = Server(await build_service(config, Plugins(config.server.plugins_dir)), "tcp://127.0.0.1:0")
    await server.start()
    return server


def stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 1),
        "p90_ms": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] * 1000, 1),
        "min_ms": round(ordered[0] * 1000, 1),
    }


async def compare(name: str, local: Server, remote: Server, text: str, requests: int) -> dict[str, Any]:
    """Alternate local / Triton requests after one warm-up each; paired differences of the first audio."""
    await one_request(local.port, text)  # type: ignore[arg-type]
    await one_request(remote.port, text)  # type: ignore[arg-type]
    rows: dict[str, list[tuple[float, float, float]]] = {"local": [], "triton": []}
    for n in range(requests):
        order = [("local", local), ("triton", remote)] if n % 2 == 0 else [("triton", remote), ("local", local)]
        for label, server in order:
            rows[label].append(await one_request(server.port, text))  # type: ignore[arg-type]
    diffs = [t[0] - o[0] for o, t in zip(rows["local"], rows["triton"], strict=True)]
    result = {
        "comparison": name,
        "requests_each": requests,
        "audio_s": round(rows["local"][0][2], 2),
        "first_audio": {label: stats([r[0] for r in rs]) for label, rs in rows.items()},
        "total": {label: stats([r[1] for r in rs]) for label, rs in rows.items()},
        "added_first_audio_ms": {
            "median_of_pairs": round(statistics.median(diffs) * 1000, 1),
            "min_of_pairs": round(min(diffs) * 1000, 1),
            "max_of_pairs": round(max(diffs) * 1000, 1),
        },
    }
    print(json.dumps(result))
    return result


async def engine_hop(url: str, prompt: Path, requests: int) -> dict[str, Any]:
    """The Triton engine alone (no Wyoming server): request -> first waveform piece, without and with a reference."""
    from wyoming_cosyvoice.engine import SynthesisOptions
    from wyoming_cosyvoice.voices import VoiceProfile
    from wyoming_cosyvoice_plugins.triton.engine import TritonEngine
    from wyoming_cosyvoice_plugins.triton.settings import TritonSettings

    engine = TritonEngine(TritonSettings(endpoints=(url,)))
    await engine.start()
    profiles = {
        "text only (sft)": VoiceProfile(name="sft", mode="sft", speaker="001"),
        "3 s reference": VoiceProfile(name="ref", reference_audio=prompt),
    }
    await engine.prepare(profiles.values())
    times: dict[str, list[float]] = {label: [] for label in profiles}
    try:
        for n in range(requests + 1):
            for label, profile in profiles.items():
                started = time.perf_counter()
                async for _chunk in engine.synthesize(TEXT, profile, SynthesisOptions()):
                    if len(times[label]) < n + 1:  # the first piece; the rest is read too (no cancellation)
                        times[label].append(time.perf_counter() - started)
    finally:
        await engine.close()
    result = {
        "comparison": "Triton engine alone, tone model: request -> first waveform",
        "requests_each": requests,
        "first_audio": {label: stats(values[1:]) for label, values in times.items()},  # the first was a warm-up
    }
    print(json.dumps(result))
    return result


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, help="CosyVoice checkout (runs comparison 2)")
    parser.add_argument("--model-dir", type=Path, help="a tiny model built before (default: build one)")
    parser.add_argument("--requests", type=int, default=10, help="requests per path and comparison (default 10)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.repo:
        args.repo = args.repo.resolve()  # the Triton model resolves paths against its own folder
    reason = unavailable()
    if reason:
        print(f"no Triton server here: {reason}", file=sys.stderr)
        return 1
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="triton-hop-") as tmp:
        work = Path(tmp)
        prompt = write_prompt(work / "prompt.wav", pitch=180.0, rate=24000, seconds=3.0)
        voices = [{"name": "prompt", "reference_audio": str(prompt), "mode": "cross_lingual"}]
        tone = TritonServer(work, "tone")
        tone.add_model("cosyvoice2", MODELS / "tone_model.py", {"chunk_samples": "4800"})
        servers: list[Server] = []
        try:
            tone.start(models=("cosyvoice2",))
            local = await serve(work / "pcm", voices, "pcm", {})
            remote = await serve(work / "tone", voices, "triton", {"endpoints": [tone.url]})
            servers += [local, remote]
            results.append(
                await compare("zero-cost audio: pcm engine vs Triton tone model", local, remote, TEXT, args.requests)
            )
            results.append(await engine_hop(tone.url, prompt, 2 * args.requests))
        finally:
            for server in servers:
                await server.shutdown(grace=2.0)
            tone.stop()
        if args.repo:
            model_dir = args.model_dir
            if model_dir is None:
                model_dir = work / "CosyVoice2-tiny"
                subprocess.run(
                    [sys.executable, "-m", "tests.tiny_cosyvoice2", "--repo", str(args.repo), "--out", str(model_dir)],
                    cwd=ROOT,
                    check=True,
                    capture_output=True,
                )
            cosy = TritonServer(work, "cosyvoice")
            params = {"repo": str(args.repo), "model_dir": str(model_dir), "cache_dir": str(work / "triton-cache")}
            cosy.add_model("cosyvoice2", MODELS / "cosyvoice2_model.py", params)
            servers = []
            try:
                cosy.start(timeout=600, models=("cosyvoice2",), env={"OMP_WAIT_POLICY": "PASSIVE"})
                section = {
                    "repo": str(args.repo),
                    "model_dir": str(model_dir),
                    "require_gpu": False,
                    "cache_dir": str(work / "local-cache"),
                }
                local = await serve(work / "local", voices, "cosyvoice", section)
                remote = await serve(
                    work / "remote", voices, "triton", {"endpoints": [cosy.url], "first_audio_timeout_s": 300}
                )
                servers += [local, remote]
                results.append(
                    await compare(
                        "tiny CosyVoice2: local engine vs the same engine inside Triton",
                        local,
                        remote,
                        TEXT,
                        args.requests,
                    )
                )
            finally:
                for server in servers:
                    await server.shutdown(grace=2.0)
                cosy.stop()
    if args.json:
        machine = {"python": platform.python_version(), "machine": platform.machine(), "note": "2 shared CPU cores"}
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
