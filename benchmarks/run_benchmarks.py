#!/usr/bin/env python3
"""Reproducible benchmarks for docs/benchmarks.md, in one run (not a test; numbers, not pass/fail gates).

    .venv/bin/python benchmarks/run_benchmarks.py [--quick] [--json results.json]
    .venv/bin/python benchmarks/run_benchmarks.py --gpu --config my/server.yaml [--gpu-voice NAME]   # with a GPU

Measures, each against the target in docs/benchmarks.md:
1. Server readiness (spawn `python -m wyoming_cosyvoice serve` on the embedded espeak engine, poll until it
   accepts and answers describe), idle resident memory (VmRSS) and whether torch is mapped into the process.
2. Time to first audio of the same engine called directly in-process vs through the server over loopback
   (a server process, a new connection per request), at 1, 4, 16 and 64 concurrent clients, for espeak, `pcm`
   (zero-cost, in the event loop) and `tone` (zero-cost, on a worker thread like every real engine).
3. Streaming throughput of the zero-cost engines: 64 concurrent streams of 24 kHz 16-bit audio, audio seconds
   per CPU second of the server, and whether any client fell behind real time.
4. With --gpu: the CosyVoice engine (prepared voices) vs upstream's own inference_zero_shot(stream=True) loop
   (see benchmarks/gpu_compare.py), per request index, then N requests at once for N in --gpu-levels (ours vs N
   threads on one upstream model; benchmarks/concurrency.py). --gpu-requests 0 runs only the concurrent part.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wyoming_cosyvoice.bench import BenchResult, BenchSettings, describe, percentile, run_bench, sentence  # noqa: E402
from wyoming_cosyvoice.config import load_config  # noqa: E402
from wyoming_cosyvoice.engine import Engine, SynthesisOptions  # noqa: E402
from wyoming_cosyvoice.errors import ClientError, CosyVoiceServiceError  # noqa: E402
from wyoming_cosyvoice.plugins import Plugins  # noqa: E402
from wyoming_cosyvoice.voices import VoiceProfile  # noqa: E402

PLUGINS_DIR = ROOT / "benchmarks" / "plugins"
LEVELS = (1, 4, 16, 64)
ENGINES = ("espeak", "pcm", "tone")
TEXT = sentence(20)
STREAM_TEXT = sentence(200)  # 60 s of audio from the zero-cost engines (300 ms per word)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """An unused loopback port (the server binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(directory: Path) -> Path:
    """server.yaml + voices.yaml for the benchmark servers: room for 64+ clients, the benchmark plugins."""
    (directory / "voices.yaml").write_text(
        yaml.safe_dump({"voices": [{"name": "bench", "description": "benchmark voice", "languages": ["en-US"]}]})
    )
    doc = {
        # max_concurrent defaults to 4; 64 clients need room, queued requests wait for the engine.
        "server": {"uri": "tcp://127.0.0.1:10200", "max_concurrent": 256, "plugins_dir": str(PLUGINS_DIR)},
        # A client that reconnects at once can reach the server before the server has seen its last connection
        # close; with 64 clients at the default limit of 64 those are refused (ServerBusy), so leave room.
        "limits": {"max_connections": 256},
        "engine": {"name": "espeak", "fallback": None},
        "voice_providers": {"yaml": {"path": "voices.yaml"}},
    }
    path = directory / "server.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class ServerProcess:
    """`python -m wyoming_cosyvoice serve` in its own process, as a user starts it."""

    def __init__(self, config: Path, engine: str, log: Path) -> None:
        self.port = free_port()
        self.uri = f"tcp://127.0.0.1:{self.port}"
        self.log = log.open("ab")
        cmd = [
            sys.executable,
            "-m",
            "wyoming_cosyvoice",
            "serve",
            "--config",
            str(config),
            "--engine",
            engine,
            "--no-fallback",
            "--uri",
            self.uri,
        ]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.ready_s = float("nan")

    async def wait_ready(self, limit: float = 30.0) -> float:
        """Seconds from spawn until the server accepted a connection and answered describe."""
        while time.perf_counter() - self.started < limit:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with status {self.proc.returncode}; see {self.log.name}")
            try:
                await describe(self.uri, timeout=2.0)
            except ClientError:
                await asyncio.sleep(0.005)
                continue
            self.ready_s = time.perf_counter() - self.started
            return self.ready_s
        raise RuntimeError(f"server not ready after {limit} s; see {self.log.name}")

    def status(self, key: str) -> int:
        """A kB value from /proc/<pid>/status (VmRSS, VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return -1

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def torch_mapped(self) -> list[str]:
        """Shared objects of torch mapped into the server (empty: torch was never imported)."""
        maps = Path(f"/proc/{self.proc.pid}/maps").read_text().splitlines()
        return sorted({line.split()[-1] for line in maps if "/torch/" in line or "libtorch" in line})

    def stop(self) -> None:
        """SIGTERM and wait."""
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@dataclass
class Samples:
    """Time to first audio (and total) of a set of requests, in ms."""

    ttfa: list[float]
    total: list[float]
    failed: int = 0

    def stat(self, q: float) -> float:
        """Percentile of time to first audio."""
        return percentile(sorted(self.ttfa), q)


async def direct_requests(engine: Engine, profile: VoiceProfile, text: str, concurrency: int, count: int) -> Samples:
    """`count` calls of engine.synthesize from `concurrency` tasks in this process, timed like the client does."""
    ttfa: list[float] = []
    total: list[float] = []
    indices = iter(range(count))
    clock = time.perf_counter

    async def worker() -> None:
        for _ in indices:
            started = clock()
            first = 0.0
            chunks = engine.synthesize(text, profile, SynthesisOptions())
            try:
                async for _chunk in chunks:
                    if not first:
                        first = clock()
            finally:
                await chunks.aclose()
            end = clock()
            ttfa.append((first - started) * 1000.0)
            total.append((end - started) * 1000.0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Samples(ttfa, total)


async def server_requests(uri: str, text: str, concurrency: int, count: int) -> Samples:
    """`count` requests through the server from `concurrency` clients (the bench command's client)."""
    result = await run_bench(BenchSettings(uri=uri, text=text, concurrency=concurrency, requests=count, warmup=0))
    ok = result.ok
    return Samples([r.ttfa_ms for r in ok], [r.total_ms for r in ok], failed=len(result.requests) - len(ok))


async def compare_engine(name: str, config: Any, server: ServerProcess, quick: bool) -> list[dict[str, Any]]:
    """Direct vs through the server at every concurrency level; rounds alternate to spread machine noise."""
    plugins = Plugins(PLUGINS_DIR)
    engine: Engine = plugins.factory("engines", name)(config.section("engines", name))
    await engine.start()
    profile = VoiceProfile(name="bench", languages=("en-US",))
    await engine.prepare([profile])
    await engine.warmup()
    # A long-running server is warm: the first few dozen requests of a fresh process are slower (allocations,
    # the interpreter's specialization), so both paths get unmeasured requests first.
    await direct_requests(engine, profile, TEXT, 1, 50)
    await server_requests(server.uri, TEXT, 1, 50)
    rows = []
    for level in LEVELS:
        count = max(40 if quick else 200, 2 * level if quick else 4 * level)
        await direct_requests(engine, profile, TEXT, level, level)  # one unmeasured request per client
        await server_requests(server.uri, TEXT, level, level)
        rounds = 4
        direct = Samples([], [])
        through = Samples([], [])
        round_overheads = []
        for _ in range(rounds):
            d = await direct_requests(engine, profile, TEXT, level, count // rounds)
            s = await server_requests(server.uri, TEXT, level, count // rounds)
            round_overheads.append(s.stat(50) - d.stat(50))
            direct.ttfa += d.ttfa
            direct.total += d.total
            through.ttfa += s.ttfa
            through.total += s.total
            through.failed += s.failed
        row = {
            "engine": name,
            "clients": level,
            "requests": len(direct.ttfa),
            "failed": through.failed,
            "direct_median_ms": direct.stat(50),
            "direct_p99_ms": direct.stat(99),
            "server_median_ms": through.stat(50),
            "server_p99_ms": through.stat(99),
            "total_direct_median_ms": statistics.median(direct.total),
            "total_server_median_ms": statistics.median(through.total),
        }
        row["overhead_median_ms"] = row["server_median_ms"] - row["direct_median_ms"]
        row["overhead_p99_ms"] = row["server_p99_ms"] - row["direct_p99_ms"]
        row["ratio_median"] = row["server_median_ms"] / row["direct_median_ms"]
        # The machine is shared: other jobs come and go between rounds. The quietest round shows the server's cost.
        row["overhead_median_best_round_ms"] = min(round_overheads)
        rows.append(row)
        print(
            f"  {name:7} {level:3} clients: direct {row['direct_median_ms']:8.3f} / {row['direct_p99_ms']:8.3f} ms, "
            f"server {row['server_median_ms']:8.3f} / {row['server_p99_ms']:8.3f} ms (median / p99), "
            f"overhead {row['overhead_median_ms']:+.3f} / {row['overhead_p99_ms']:+.3f} ms "
            f"(quietest round {row['overhead_median_best_round_ms']:+.3f})",
            flush=True,
        )
    await engine.close()
    return rows


def failures(result: BenchResult) -> str:
    """ "; N failed (reason xK, ...)" for a progress line, or "" when every request succeeded."""
    reasons = result.error_counts()
    if not reasons:
        return ""
    return f"; {sum(reasons.values())} FAILED (" + ", ".join(f"{k} x{n}" for k, n in reasons.most_common()) + ")"


async def streaming_throughput(server: ServerProcess, engine: str, quick: bool) -> dict[str, Any]:
    """64 concurrent streaming requests of 60 s audio each; audio delivered per CPU second of the server."""
    clients = 64
    count = clients if quick else 2 * clients
    settings = BenchSettings(
        uri=server.uri, text=STREAM_TEXT, concurrency=clients, requests=count, stream=True, warmup=1, timeout=300
    )
    cpu_before = server.cpu_seconds()
    client_before = time.process_time()
    result = await run_bench(settings)
    server_cpu = server.cpu_seconds() - cpu_before
    client_cpu = time.process_time() - client_before
    summary = result.summary()
    audio = summary["audio_total_s"]
    ok = result.ok
    row = {
        "engine": engine,
        "streams": clients,
        "requests": count,
        "failed": summary["failed"],
        "audio_s": audio,
        "wall_s": result.wall_s,
        "server_cpu_s": server_cpu,
        "client_cpu_s": client_cpu,
        "x_real_time_per_server_core": audio / server_cpu if server_cpu else float("nan"),
        "x_real_time_wall": audio / result.wall_s,
        "x_real_time_per_core_wall": audio / result.wall_s / (os.cpu_count() or 1),
        "behind_real_time": summary["behind_real_time"],
        "max_stall_ms": max((r.stall_ms for r in ok), default=float("nan")),
        "slowest_stream_x_real_time": min((r.audio_s / (r.total_ms / 1000) for r in ok), default=float("nan")),
        "ttfa_median_ms": summary["ttfa_ms"]["median"],
        "ttfa_p99_ms": summary["ttfa_ms"]["p99"],
    }
    print(
        f"  {engine}: {audio:.0f} s audio in {result.wall_s:.2f} s; server CPU {server_cpu:.2f} s -> "
        f"{row['x_real_time_per_server_core']:.0f}x real time per server core; "
        f"{row['behind_real_time']} of {count} streams fell behind real time (max stall {row['max_stall_ms']:.1f} ms)"
        f"{failures(result)}",
        flush=True,
    )
    return row


async def readiness(config: Path, tmp: Path, runs: int) -> tuple[dict[str, Any], ServerProcess]:
    """Spawn the espeak server `runs` times; the last one stays up for the espeak measurements."""
    times = []
    server: Optional[ServerProcess] = None
    for _ in range(runs):
        if server is not None:
            server.stop()
        server = ServerProcess(config, "espeak", tmp / "server-espeak.log")
        times.append(await server.wait_ready())
    assert server is not None
    await asyncio.sleep(1.0)  # idle: let start-up garbage settle
    row = {
        "ready_s": times,
        "ready_median_s": statistics.median(times),
        "idle_rss_mb": server.status("VmRSS") / 1024,
        "idle_hwm_mb": server.status("VmHWM") / 1024,
        "torch_mapped": server.torch_mapped(),
    }
    print(
        f"  ready after {', '.join(f'{t:.2f}' for t in times)} s; idle RSS {row['idle_rss_mb']:.1f} MB "
        f"(peak {row['idle_hwm_mb']:.1f} MB); torch mapped: {row['torch_mapped'] or 'no'}",
        flush=True,
    )
    return row, server


def cpu_pressure() -> str:
    """Linux PSI line for CPU ("some avg10=.. avg60=.."): how often runnable tasks waited for a core (shared host)."""
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return "unavailable"


def machine() -> dict[str, Any]:
    """CPU model, cores, Python and load at the start (the machine is shared)."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": os.getloadavg(),
        "cpu_pressure_start": cpu_pressure(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def print_markdown(results: dict[str, Any]) -> None:
    """The tables for docs/benchmarks.md."""
    print("\n## Server overhead on time to first audio (ms; 20-word sentence; through the server minus direct)\n")
    print(
        "| engine | clients | requests | failed | direct median | direct p99 | server median | server p99 "
        "| overhead median | overhead p99 | overhead median, quietest round | ratio (median) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["overhead"]:
        print(
            f"| {r['engine']} | {r['clients']} | {r['requests']} | {r['failed']} | {r['direct_median_ms']:.3f} | "
            f"{r['direct_p99_ms']:.3f} | {r['server_median_ms']:.3f} | {r['server_p99_ms']:.3f} | "
            f"{r['overhead_median_ms']:+.3f} | {r['overhead_p99_ms']:+.3f} | "
            f"{r['overhead_median_best_round_ms']:+.3f} | {r['ratio_median']:.2f} |"
        )
    print("\n## Streaming throughput (64 concurrent streams, 24 kHz 16-bit, 60 s audio each)\n")
    print(
        "| engine | requests | failed | audio (s) | wall (s) | server CPU (s) | x real time per server core "
        "| x real time per core (wall, client included) | fell behind | max stall (ms) | slowest stream |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["streaming"]:
        print(
            f"| {r['engine']} | {r['requests']} | {r['failed']} | {r['audio_s']:.0f} | {r['wall_s']:.2f} | "
            f"{r['server_cpu_s']:.2f} | "
            f"{r['x_real_time_per_server_core']:.0f}x | {r['x_real_time_per_core_wall']:.0f}x | "
            f"{r['behind_real_time']} | {r['max_stall_ms']:.1f} | {r['slowest_stream_x_real_time']:.0f}x |"
        )
    ready = results["readiness"]
    espeak = {r["clients"]: r for r in results["overhead"] if r["engine"] == "espeak"}
    pcm = {r["clients"]: r for r in results["overhead"] if r["engine"] == "pcm"}
    stream = {r["engine"]: r for r in results["streaming"]}
    print("\n## Targets\n")
    print("| target | measured |")
    print("|---|---|")
    for level in (1, 16):
        if level in pcm:
            print(
                f"| overhead median < 1 ms, p99 < 5 ms at {level} client(s) (zero-cost pcm engine) | "
                f"{pcm[level]['overhead_median_ms']:+.3f} ms / {pcm[level]['overhead_p99_ms']:+.3f} ms |"
            )
        if level in espeak:
            print(
                f"| same, espeak engine, {level} client(s) | "
                f"{espeak[level]['overhead_median_ms']:+.3f} ms / {espeak[level]['overhead_p99_ms']:+.3f} ms |"
            )
    if "pcm" in stream:
        s = stream["pcm"]
        print(
            f"| streaming >= 500x real time per core (pcm) | {s['x_real_time_per_server_core']:.0f}x per server "
            f"core; {s['x_real_time_per_core_wall']:.0f}x per core counting the 64 clients on the same machine |"
        )
        print(
            f"| 64 streams, none behind real time | {s['behind_real_time']} behind (max stall "
            f"{s['max_stall_ms']:.1f} ms) |"
        )
    if 1 in espeak:
        print(
            f"| espeak through the server: first audio < 30 ms (20 words) | median "
            f"{espeak[1]['server_median_ms']:.2f} ms, p99 {espeak[1]['server_p99_ms']:.2f} ms |"
        )
    print(f"| ready < 1.5 s after start | {', '.join(f'{t:.2f}' for t in ready['ready_s'])} s |")
    print(
        f"| idle RSS < 80 MB, no torch | {ready['idle_rss_mb']:.1f} MB; torch mapped: "
        f"{'yes' if ready['torch_mapped'] else 'no'} |"
    )
    m = results["machine"]
    print(
        f"\nmachine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['date']}; load average "
        f"{m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}; CPU pressure at start: {m['cpu_pressure_start']}; "
        f"at end: {m['cpu_pressure_end']}"
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything, in order; servers are stopped at the end."""
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick, "text": TEXT}
    print(
        f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, load "
        f"{results['machine']['loadavg_start']}, CPU pressure {results['machine']['cpu_pressure_start']}",
        flush=True,
    )
    if args.gpu:  # first: it fails fast on a missing checkout, model or GPU
        from gpu_compare import gpu_compare  # benchmarks/gpu_compare.py; imports torch

        results["gpu"] = await gpu_compare(
            args.config,
            args.gpu_voice,
            args.gpu_tokens,
            args.gpu_requests,
            TEXT,
            args.gpu_repeats,
            args.gpu_levels,
            args.gpu_rounds,
            args.gpu_batch_compare,
        )
        if args.gpu_only:
            return results
    with tempfile.TemporaryDirectory(prefix="wyoming-cosyvoice-bench-") as tmp_name:
        tmp = Path(tmp_name)
        config_path = write_config(tmp)
        config = load_config(config_path)
        servers: list[ServerProcess] = []
        try:
            print("readiness and idle memory (espeak server):", flush=True)
            results["readiness"], espeak_server = await readiness(config_path, tmp, 2 if args.quick else 3)
            servers.append(espeak_server)
            print("time to first audio, direct vs through the server:", flush=True)
            results["overhead"] = []
            results["streaming"] = []
            for name in args.engines:
                if name == "espeak":
                    server = espeak_server
                else:
                    server = ServerProcess(config_path, name, tmp / f"server-{name}.log")
                    servers.append(server)
                    await server.wait_ready()
                results["overhead"] += await compare_engine(name, config, server, args.quick)
                if name != "espeak":
                    print(f"streaming throughput ({name}):", flush=True)
                    results["streaming"].append(await streaming_throughput(server, name, args.quick))
            results["readiness"]["rss_after_load_mb"] = espeak_server.status("VmRSS") / 1024
        finally:
            for server in servers:
                server.stop()
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["machine"]["cpu_pressure_end"] = cpu_pressure()
    return results


def main() -> int:
    """Parse flags, run, print the markdown tables, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run, noisier numbers)")
    parser.add_argument("--json", type=Path, help="write all results to this JSON file")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES), help="engines to compare")
    parser.add_argument("--gpu", action="store_true", help="also compare the CosyVoice engine with upstream (GPU)")
    parser.add_argument(
        "--config",
        type=Path,
        default=ROOT / "config" / "server.yaml",
        help="server.yaml with engines.cosyvoice.repo/model_dir and voices (for --gpu)",
    )
    parser.add_argument("--gpu-voice", help="voice profile with reference_audio + transcript (default: the default)")
    parser.add_argument(
        "--gpu-tokens",
        type=int,
        default=250,
        help="speech tokens forced per LLM call (25 per s of audio; 0: do not force)",
    )
    parser.add_argument("--gpu-requests", type=int, default=10, help="requests per path (after each path's warm-up)")
    parser.add_argument(
        "--gpu-repeats",
        type=int,
        default=1,
        help="with --gpu: load upstream's model afresh and run the requests again, this many times (per-request "
        "medians)",
    )
    parser.add_argument(
        "--gpu-levels",
        type=int,
        nargs="*",
        default=[1, 2, 4, 8],
        help="with --gpu: N requests at once per path for each N (ours vs N threads on one upstream model); none to "
        "skip",
    )
    parser.add_argument("--gpu-rounds", type=int, default=2, help="with --gpu-levels: batches per level and path")
    parser.add_argument("--gpu-only", action="store_true", help="with --gpu: skip the CPU benchmarks")
    parser.add_argument(
        "--gpu-batch-compare",
        action="store_true",
        help="with --gpu-levels: a third path per level, ours with batched flow passes off (same engine)",
    )
    args = parser.parse_args()
    if args.gpu:
        # Before torch (and its OpenMP runtime) loads: spin-waiting OpenMP teams of the LLM and flow threads
        # inflate CPU runs 4-6x on a busy machine. No effect on GPU work.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        results = asyncio.run(run(args))
    except CosyVoiceServiceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if "overhead" in results:
        print_markdown(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
