#!/usr/bin/env python3
"""Wake-to-first-audio against warm first audio, for both ways of parking the CosyVoice model (host, unload).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/park_wake.py --cosyvoice-repo ../shared/cosyvoice-upstream \
        [--cosyvoice-model DIR] [--rounds 5] [--llm-s 0.5] [--json out.json]

One engine per mode, both loaded in this process, the real CosyVoice code (on the CPU here; on a GPU where torch sees
one). Each round, for each mode in turn (alternated, so machine noise hits both): a request on the awake model (warm
first audio), a park, a request that wakes it (the wake is on its path), a park, then a reply opening (what
`synthesize-start` does: the wake starts) followed `--llm-s` seconds later by its text (an LLM's time to its first
sentence), timed from the text. First audio = the call to the engine's first chunk. Also: the park's time, the
wake's time, and (unload) the process's RSS given back by the park. A script, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # OpenMP spin-waits inflate CPU runs

from wyoming_cosyvoice.config import Section  # noqa: E402
from wyoming_cosyvoice.engine import SynthesisOptions  # noqa: E402
from wyoming_cosyvoice.voices import VoiceProfile  # noqa: E402
from wyoming_cosyvoice_plugins.cosyvoice.engine import CosyVoiceEngine  # noqa: E402
from wyoming_cosyvoice_plugins.cosyvoice.options import CosyVoiceSettings  # noqa: E402

TEXT = "Hello there, the kitchen lights are off now and the front door is locked."
MODES = ("host", "unload")


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def first_audio(engine: CosyVoiceEngine, profile: VoiceProfile) -> float:
    """Seconds from the call to the first chunk (the rest is drained)."""
    started = time.perf_counter()
    first: Optional[float] = None
    async for _ in engine.synthesize(TEXT, profile, SynthesisOptions()):
        first = first or time.perf_counter()
    assert first is not None, "no audio"
    return first - started


async def make(mode: str, args: argparse.Namespace, cache: Path) -> CosyVoiceEngine:
    import torch

    data = {
        "repo": str(args.cosyvoice_repo),
        "model_dir": str(args.cosyvoice_model),
        "cache_dir": str(cache),
        "require_gpu": bool(torch.cuda.is_available()),
        "keep_alive": -1,  # parked and woken by this script only
        "park": mode,
    }
    engine = CosyVoiceEngine(Section("cosyvoice", data, "bench", "engines.cosyvoice", ROOT).parse(CosyVoiceSettings))
    await engine.start()
    return engine


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cache = Path(args.cache)
    engines = {mode: await make(mode, args, cache) for mode in MODES}
    profile = VoiceProfile(name="bench", mode="cross_lingual", reference_audio=Path(args.prompt))
    rows: dict[str, dict[str, list[float]]] = {
        m: {k: [] for k in ("warm", "woken", "hinted", "park", "wake", "rss")} for m in MODES
    }
    try:
        for engine in engines.values():
            await engine.prepare([profile])
            await engine.warmup()
            await first_audio(engine, profile)  # unmeasured
        for _ in range(args.rounds):
            for mode, engine in engines.items():
                row = rows[mode]
                row["warm"].append(await first_audio(engine, profile))
                before, started = rss_mb(), time.perf_counter()
                await engine.park()
                row["park"].append(time.perf_counter() - started)
                row["rss"].append(before - rss_mb())
                row["woken"].append(await first_audio(engine, profile))
                row["wake"].append(engine.lifecycle.machine.last_wake_s or float("nan"))
                await engine.park()
                release = engine.reply_opening()
                await asyncio.sleep(args.llm_s)  # the LLM writing its first sentence while the model wakes
                row["hinted"].append(await first_audio(engine, profile))
                release()
    finally:
        for engine in engines.values():
            await engine.close()
    return {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        "device": "cuda" if any(e.plan and e.plan.device == "cuda" for e in engines.values()) else "cpu",
        "model": str(args.cosyvoice_model),
        "text": TEXT,
        "rounds": args.rounds,
        "llm_s": args.llm_s,
        "results": rows,
    }


def table(result: dict[str, Any]) -> str:
    def med(values: list[float], scale: float = 1000.0) -> str:
        return f"{statistics.median(values) * scale:.0f}" if values else "-"

    lines = [
        "| mode | warm first audio (ms) | woken by the request (ms) | woken at reply opening, text "
        f"{result['llm_s']:g} s later (ms) | wake (ms) | park (ms) | RSS given back (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, row in result["results"].items():
        lines.append(
            f"| {mode} | {med(row['warm'])} | {med(row['woken'])} | {med(row['hinted'])} | {med(row['wake'])} | "
            f"{med(row['park'])} | {med(row['rss'], 1.0)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cosyvoice-repo", type=Path, required=True)
    parser.add_argument("--cosyvoice-model", type=Path, help="model dir (default: build the tiny CosyVoice2)")
    parser.add_argument("--prompt", type=Path, help="reference WAV (default: a synthetic one)")
    parser.add_argument("--cache", default="/tmp/park-wake-bench-cache", help="prepared-voice cache folder")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--llm-s", type=float, default=0.5, help="seconds between reply opening and its text")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args()
    work = Path(args.cache)
    work.mkdir(parents=True, exist_ok=True)
    if args.cosyvoice_model is None:
        from tests.realcode import build_tiny_model

        args.cosyvoice_model = work / "tiny2"
        if not (args.cosyvoice_model / "cosyvoice2.yaml").is_file():
            build_tiny_model(args.cosyvoice_repo, args.cosyvoice_model, 2)
    if args.prompt is None:
        from tests.cosyvoice_support import write_prompt

        args.prompt = write_prompt(work / "prompt.wav", rate=24000)
    result = asyncio.run(run(args))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(table(result))


if __name__ == "__main__":
    main()
