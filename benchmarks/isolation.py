#!/usr/bin/env python3
"""The cost of process isolation: espeak in child processes against espeak in the server process.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/isolation.py [--rounds 6] [--requests 100] [--clients 1 4]
        [--json out.json]

Starts two `serve` processes that differ only in `engines.espeak.isolation` (`process`, the default, with its two
children; `thread`, the old way), then, in every round, sends `--requests` requests from each number of `--clients`
to each server, alternating which goes first, so that noise from other jobs hits both alike (the `bench` command's
client: a new connection per request, the standard 20-word sentence, first audio timed from writing `synthesize` to
the first `audio-chunk`). Reports, per server: median and p90 first audio, median total time, throughput (audio
seconds delivered per wall second) and CPU per audio second (the server and its children, user + system). The
ratios are process / thread. A script, not a test: it never fails on a missed target.
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


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=100, help="measured requests per server, round and level")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--json", type=Path)
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
    if args.json:
        args.json.write_text(json.dumps({"facts": facts, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
