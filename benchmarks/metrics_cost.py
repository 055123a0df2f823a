#!/usr/bin/env python3
"""What recording metrics costs the request path: the same server with metrics on and off (docs/benchmarks.md).

    .venv/bin/python benchmarks/metrics_cost.py [--rounds 8] [--requests 200] [--clients 16] [--json out.json]
    .venv/bin/python benchmarks/metrics_cost.py --in-process   # the recorder alone; the reply path without sockets

Two `serve` processes on the zero-cost `pcm` engine (benchmarks/plugins), one with `metrics.enabled: true` and a
/metrics listener that this script scrapes every `--scrape-interval` s while it measures (15 s: the compose profile's),
one with `metrics.enabled: false`. The `bench` command's client measures time to first audio at `--clients` clients,
`--requests` requests per round, rounds alternated ABBA (on, off, off, on, ...) so that load from other jobs on the
machine hits both alike, after `--warmup` unmeasured requests per server. Prints the median, p90 and p99 of each,
the difference, the median over ABBA blocks of on-minus-off, and the server's CPU time per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
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

from run_benchmarks import ServerProcess, cpu_pressure, free_port, write_config  # noqa: E402

from wyoming_cosyvoice.bench import BenchSettings, percentile, run_bench, sentence  # noqa: E402


def config_with_metrics(base: Path, directory: Path, enabled: bool, port: int) -> Path:
    """A copy of the benchmark config with metrics on (and a /metrics port) or off."""
    doc = yaml.safe_load(base.read_text())
    doc["metrics"] = {"enabled": enabled, "port": port if enabled else None}
    path = directory / f"server-metrics-{'on' if enabled else 'off'}-{port}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


async def scrape_every(interval: float, url: str, stop: asyncio.Event, counts: dict[str, int]) -> None:
    """GET /metrics every `interval` s until `stop` (a raw HTTP/1.0 request: no client library needed)."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    while not stop.is_set():
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        body = await reader.read()
        writer.close()
        counts["scrapes"] += 1
        counts["bytes"] = len(body)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="metrics-cost-") as tmp:
        directory = Path(tmp)
        base = write_config(directory)
        metrics_port = free_port()
        servers = {
            "on": ServerProcess(
                config_with_metrics(base, directory, not args.control, metrics_port), "pcm", directory / "on.log"
            ),
            "off": ServerProcess(config_with_metrics(base, directory, False, 0), "pcm", directory / "off.log"),
        }
        try:
            for server in servers.values():
                await server.wait_ready()
                # A fresh process is slower for its first requests (run_benchmarks.py does the same).
                await run_bench(
                    BenchSettings(
                        uri=server.uri, text=sentence(20), concurrency=args.clients, requests=args.warmup, warmup=1
                    )
                )
            ttfa: dict[str, list[float]] = {"on": [], "off": []}
            rounds: list[dict[str, Any]] = []
            load_before = (os.getloadavg(), cpu_pressure())
            counts = {"scrapes": 0, "bytes": 0}
            stop = asyncio.Event()
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            scraper = asyncio.create_task(
                scrape_every(args.scrape_interval, url, stop, counts) if not args.control else stop.wait()
            )
            order = ["on", "off", "off", "on"]
            for index in range(args.rounds):
                which = order[index % 4]
                settings = BenchSettings(
                    uri=servers[which].uri,
                    text=sentence(20),
                    concurrency=args.clients,
                    requests=args.requests,
                    warmup=args.clients,
                )
                cpu = servers[which].cpu_seconds()
                result = await run_bench(settings)
                cpu = servers[which].cpu_seconds() - cpu
                values = [r.ttfa_ms for r in result.ok]
                ttfa[which] += values
                ordered = sorted(values)
                rounds.append(
                    {
                        "metrics": which,
                        "failed": result.summary()["failed"],
                        "median_ms": percentile(ordered, 50),
                        "p99_ms": percentile(ordered, 99),
                        "server_cpu_ms_per_request": cpu * 1000.0 / (args.requests + args.clients),
                    }
                )
                print(
                    f"round {index + 1}: metrics {which:3} median {rounds[-1]['median_ms']:.3f} ms "
                    f"p99 {rounds[-1]['p99_ms']:.3f} ms, server CPU {rounds[-1]['server_cpu_ms_per_request']:.3f} ms "
                    "per request",
                    flush=True,
                )
            stop.set()
            await scraper
            load_after = (os.getloadavg(), cpu_pressure())
        finally:
            for server in servers.values():
                server.stop()
    summary = {}
    for which, values in ttfa.items():
        ordered = sorted(values)
        summary[which] = {
            "requests": len(ordered),
            "median_ms": percentile(ordered, 50),
            "p90_ms": percentile(ordered, 90),
            "p99_ms": percentile(ordered, 99),
        }
    for which in ("on", "off"):
        cpu = sorted(r["server_cpu_ms_per_request"] for r in rounds if r["metrics"] == which)
        summary[which]["server_cpu_ms_per_request"] = percentile(cpu, 50)
    # ABBA blocks: each block's on-minus-off of the round medians, then the median over the blocks.
    blocks = [rounds[i : i + 4] for i in range(0, len(rounds) - 3, 4)]
    paired = sorted(
        statistics.fmean(r["median_ms"] for r in block if r["metrics"] == "on")
        - statistics.fmean(r["median_ms"] for r in block if r["metrics"] == "off")
        for block in blocks
    )
    on, off = summary["on"], summary["off"]
    added = {k: on[k] - off[k] for k in ("median_ms", "p90_ms", "p99_ms")}
    added_pct = {k: 100.0 * (on[k] - off[k]) / off[k] for k in ("median_ms", "p90_ms", "p99_ms")}
    print(f"metrics on : median {on['median_ms']:.3f} ms, p90 {on['p90_ms']:.3f} ms, p99 {on['p99_ms']:.3f} ms")
    print(f"metrics off: median {off['median_ms']:.3f} ms, p90 {off['p90_ms']:.3f} ms, p99 {off['p99_ms']:.3f} ms")
    print(
        f"added by metrics: median {added['median_ms']:+.3f} ms ({added_pct['median_ms']:+.1f}%), "
        f"p90 {added['p90_ms']:+.3f} ms ({added_pct['p90_ms']:+.1f}%), "
        f"p99 {added['p99_ms']:+.3f} ms ({added_pct['p99_ms']:+.1f}%); {counts['scrapes']} scrapes of "
        f"{counts['bytes']} bytes"
    )
    if paired:
        print(
            f"paired ABBA blocks (on - off of round medians): median {percentile(paired, 50):+.3f} ms over "
            f"{len(paired)} blocks, from {paired[0]:+.3f} to {paired[-1]:+.3f} ms"
        )
    print(
        f"server CPU per request (median of rounds): on {on['server_cpu_ms_per_request']:.3f} ms, "
        f"off {off['server_cpu_ms_per_request']:.3f} ms"
    )
    return {
        "paired_block_differences_ms": paired,
        "settings": vars(args),
        "load": {"before": load_before, "after": load_after},
        "rounds": rounds,
        "summary": summary,
        "added_ms": added,
        "added_percent": added_pct,
        "scrapes": counts,
    }


def recorder_cost(repeat: int = 5, number: int = 2000) -> dict[str, float]:
    """Microseconds the recorder takes (best of `repeat` x `number`), on and off: a reply up to its first chunk,
    and a whole reply of 60 chunks (the 20-word sentence on `pcm`)."""
    import timeit

    from wyoming_cosyvoice.metrics import create_metrics

    def up_to_first(metrics: Any) -> None:
        record = metrics.request("wyoming", "bench")
        record.speaking()
        record.engine_called()
        record.engine_started()
        record.written(0.1)

    def whole(metrics: Any) -> None:
        record = metrics.request("wyoming", "bench")
        record.speaking()
        record.engine_called()
        record.engine_started()
        for _ in range(60):
            record.written(0.1)
        record.spoken()
        record.finish(True)

    result = {}
    for name, enabled in (("on", True), ("off", False)):
        metrics = create_metrics(enabled)
        for label, func in (("first_chunk", up_to_first), ("reply_60_chunks", whole)):
            best = min(timeit.repeat(lambda f=func, m=metrics: f(m), number=number, repeat=repeat))
            result[f"{label}_{name}_us"] = best / number * 1e6
    return result


async def reply_path_cost(rounds: int = 8, replies: int = 500) -> dict[str, list[float]]:
    """Microseconds of process CPU per reply through `Reply.speak` on `pcm` (no sockets), metrics on and off,
    alternated `rounds` times."""
    import dataclasses
    import logging

    from run_benchmarks import PLUGINS_DIR

    from wyoming_cosyvoice.config import load_config
    from wyoming_cosyvoice.plugins import Plugins
    from wyoming_cosyvoice.server import build_service

    logging.disable(logging.INFO)  # the per-request log line is the same either way; keep the output readable
    text = sentence(20)
    with tempfile.TemporaryDirectory(prefix="metrics-cost-") as tmp:
        config = load_config(write_config(Path(tmp)))
        config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, name="pcm"))
        services = {
            name: await build_service(
                dataclasses.replace(config, metrics=dataclasses.replace(config.metrics, enabled=enabled)),
                Plugins(PLUGINS_DIR),
            )
            for name, enabled in (("on", True), ("off", False))
        }
        result: dict[str, list[float]] = {"on": [], "off": []}
        for _ in range(rounds):
            for name, service in services.items():
                started = time.process_time()
                for _ in range(replies):
                    reply = service.open_reply(None, None)
                    reply.start()
                    async for _chunk in reply.speak(text):
                        pass
                    reply.finish(True)
                result[name].append((time.process_time() - started) / replies * 1e6)
        for service in services.values():
            await service.engines.close()
    return result


async def in_process() -> dict[str, Any]:
    """The recorder alone and the reply path without sockets; printed and returned."""
    recorder = recorder_cost()
    for key, value in recorder.items():
        print(f"recorder {key}: {value:.1f} us")
    path = await reply_path_cost()
    for name, values in path.items():
        ordered = sorted(values)
        print(f"reply path, metrics {name}: min {ordered[0]:.1f} us, median {percentile(ordered, 50):.1f} us per reply")
    return {"recorder_us": recorder, "reply_path_us": path}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8, help="rounds in all, alternated ABBA (default 8)")
    parser.add_argument("--requests", type=int, default=200, help="requests per round (default 200)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument(
        "--control", action="store_true", help="A/A control: metrics off on both servers (the noise floor)"
    )
    parser.add_argument(
        "--scrape-interval", type=float, default=15.0, help="seconds between scrapes of /metrics (default 15)"
    )
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured requests per server first (default 200)")
    parser.add_argument("--json", type=Path, help="write rounds and summary here")
    parser.add_argument(
        "--in-process", action="store_true", help="instead: the recorder alone and the reply path without sockets"
    )
    arguments = parser.parse_args()
    report = asyncio.run(in_process() if arguments.in_process else main(arguments))
    if arguments.json:
        arguments.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
