#!/usr/bin/env python3
"""The cost of process isolation: espeak in child processes against espeak in the server process.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/isolation.py [--rounds 6] [--requests 100] [--clients 1 4]
        [--direct] [--json out.json]

Starts two `serve` processes that differ only in `engines.espeak.isolation` (`process`, the default, with its two
children; `thread`, the old way), then, in every round, sends `--requests` requests from each number of `--clients`
to each server, alternating which goes first, so that noise from other jobs hits both alike (the `bench` command's
client: a new connection per request, the standard 20-word sentence, first audio timed from writing `synthesize` to
the first `audio-chunk`). Reports, per server: median and p90 first audio, median total time, throughput (audio
seconds delivered per wall second) and CPU per audio second (the server and its children, user + system). The
ratios are process / thread. `--direct` also calls the engines in this process without a server (espeak and the
zero-cost `tone` engine, whose numbers are the hop alone). A script, not a test: it never fails on a missed target.
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
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from run_benchmarks import CLOCK_TICKS, ServerProcess, cpu_pressure  # noqa: E402

from wyoming_cosyvoice.bench import BenchSettings, percentile, run_bench, sentence  # noqa: E402
from wyoming_cosyvoice.engine import SynthesisOptions, ThreadedEngine  # noqa: E402
from wyoming_cosyvoice.voices import VoiceProfile  # noqa: E402
from wyoming_cosyvoice_plugins.espeak_engine import EspeakEngine, EspeakSettings  # noqa: E402
from wyoming_cosyvoice_plugins.example_tone import ToneEngine, ToneSettings  # noqa: E402

MODES = ("process", "thread")


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid`, of its children that ended (reaped) and of its live children."""
    total = 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total += sum(int(f) for f in fields[11:15]) / CLOCK_TICKS  # utime, stime, cutime, cstime
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == pid:
            total += (int(stat[11]) + int(stat[12])) / CLOCK_TICKS
    return total


def write_config(folder: Path, mode: str) -> Path:
    path = folder / f"server-{mode}.yaml"
    doc = {
        "server": {"uri": "tcp://127.0.0.1:0", "max_concurrent": 64},
        "engine": {"name": "espeak", "fallback": None},
        "engines": {"espeak": {"isolation": mode}},
        "voice_providers": {"yaml": {"path": str(ROOT / "config" / "voices.yaml")}},
    }
    path.write_text(yaml.safe_dump(doc))
    return path


async def one_run(server: ServerProcess, clients: int, requests: int) -> dict[str, Any]:
    settings = BenchSettings(
        uri=server.uri, text=sentence(20), voice="robot-en", concurrency=clients, requests=requests, warmup=0
    )
    cpu = tree_cpu_seconds(server.proc.pid)
    result = await run_bench(settings)
    cpu = tree_cpu_seconds(server.proc.pid) - cpu
    ok = result.ok
    audio = sum(r.audio_s for r in ok)
    return {
        "ttfa_ms": [r.ttfa_ms for r in ok],
        "total_ms": [r.total_ms for r in ok],
        "failed": len(result.requests) - len(ok),
        "audio_s": audio,
        "wall_s": result.wall_s,
        "cpu_s": cpu,
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    ttfa = sorted(v for r in runs for v in r["ttfa_ms"])
    total = sorted(v for r in runs for v in r["total_ms"])
    audio = sum(r["audio_s"] for r in runs)
    return {
        "requests": len(ttfa),
        "failed": sum(r["failed"] for r in runs),
        "ttfa_median_ms": percentile(ttfa, 50),
        "ttfa_p90_ms": percentile(ttfa, 90),
        "ttfa_best_round_median_ms": min(statistics.median(r["ttfa_ms"]) for r in runs),
        "total_median_ms": percentile(total, 50),
        "audio_s_per_wall_s": audio / sum(r["wall_s"] for r in runs),
        "cpu_ms_per_audio_s": 1000 * sum(r["cpu_s"] for r in runs) / audio,
    }


async def direct(rounds: int, requests: int) -> dict[str, dict[str, float]]:
    """The engines called in this process (`engine.synthesize`, no server): first chunk and whole reply, in children
    against on a thread, alternating each round; espeak and the zero-cost `tone` engine (the hop alone)."""
    profile = VoiceProfile(name="robot-en", languages=("en-US",))
    text = sentence(20)
    engines: dict[str, ThreadedEngine] = {}
    for mode in MODES:
        engines[f"espeak {mode}"] = EspeakEngine(EspeakSettings(isolation=mode))  # type: ignore[arg-type]
        engines[f"tone {mode}"] = ToneEngine(ToneSettings(isolation=mode, chunk_ms=60))  # type: ignore[arg-type]
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in engines}
    try:
        for engine in engines.values():
            await engine.start()
        for round_ in range(rounds + 1):  # round 0 warms up, unmeasured
            names = list(engines) if round_ % 2 else list(engines)[::-1]
            for name in names:
                for _ in range(requests):
                    started = time.perf_counter()
                    first = None
                    async for _chunk in engines[name].synthesize(text, profile, SynthesisOptions()):
                        if first is None:
                            first = time.perf_counter() - started
                    if round_ and first is not None:
                        times[name][0].append(first * 1000)
                        times[name][1].append((time.perf_counter() - started) * 1000)
    finally:
        for engine in engines.values():
            await engine.close()
    return {
        name: {"first_median_ms": statistics.median(f), "total_median_ms": statistics.median(t)}
        for name, (f, t) in times.items()
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=100, help="measured requests per server, round and level")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--direct", action="store_true", help="also call the engines in this process (no server)")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    facts = {"started": started, "load": os.getloadavg(), "pressure_start": cpu_pressure()}
    with tempfile.TemporaryDirectory(prefix="isolation-bench-") as tmp:
        folder = Path(tmp)
        servers = {m: ServerProcess(write_config(folder, m), "espeak", folder / f"{m}.log") for m in MODES}
        try:
            for server in servers.values():
                await server.wait_ready(60.0)
            for server in servers.values():  # unmeasured: a fresh process is slower for its first requests
                await one_run(server, 1, 50)
            runs: dict[tuple[str, int], list[dict[str, Any]]] = {(m, c): [] for m in MODES for c in args.clients}
            for round_ in range(args.rounds):
                order = MODES if round_ % 2 == 0 else MODES[::-1]
                for clients in args.clients:
                    for mode in order:
                        runs[mode, clients].append(await one_run(servers[mode], clients, args.requests))
        finally:
            for server in servers.values():
                server.stop()
    direct_results = await direct(args.rounds, args.requests) if args.direct else {}
    facts["load_end"] = os.getloadavg()
    facts["pressure_end"] = cpu_pressure()
    results = {f"{m}@{c}": summary(r) for (m, c), r in runs.items()}
    print(
        f"{started}, {platform.python_version()}, {os.cpu_count()} cores, load {facts['load']} -> {facts['load_end']}"
    )
    print(f"CPU pressure {facts['pressure_start']} -> {facts['pressure_end']}")
    print(f"{args.rounds} rounds x {args.requests} requests per server and level, alternated\n")
    print(
        "| clients | isolation | first audio median (ms) | p90 | best round's median | total median (ms) "
        "| audio s per wall s | CPU ms per audio s | failed |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for clients in args.clients:
        for mode in MODES:
            s = results[f"{mode}@{clients}"]
            print(
                f"| {clients} | {mode} | {s['ttfa_median_ms']:.2f} | {s['ttfa_p90_ms']:.2f} | "
                f"{s['ttfa_best_round_median_ms']:.2f} | {s['total_median_ms']:.2f} | {s['audio_s_per_wall_s']:.1f} | "
                f"{s['cpu_ms_per_audio_s']:.2f} | {s['failed']} |"
            )
    print()
    for clients in args.clients:
        p, t = results[f"process@{clients}"], results[f"thread@{clients}"]
        print(
            f"{clients} client(s): first audio median {p['ttfa_median_ms'] - t['ttfa_median_ms']:+.2f} ms "
            f"(x{p['ttfa_median_ms'] / t['ttfa_median_ms']:.2f}), p90 {p['ttfa_p90_ms'] - t['ttfa_p90_ms']:+.2f} ms; "
            f"throughput x{p['audio_s_per_wall_s'] / t['audio_s_per_wall_s']:.2f}; "
            f"CPU per audio second x{p['cpu_ms_per_audio_s'] / t['cpu_ms_per_audio_s']:.2f}"
        )
    if direct_results:
        print("\nDirect (engine.synthesize in this process, no server):\n")
        print("| engine | isolation | first chunk median (ms) | whole reply median (ms) |\n|---|---|---|---|")
        for name, d in direct_results.items():
            engine, mode = name.split()
            print(f"| {engine} | {mode} | {d['first_median_ms']:.2f} | {d['total_median_ms']:.2f} |")
    if args.json:
        doc = {"facts": facts, "results": results, "direct": direct_results}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
