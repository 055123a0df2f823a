"""`wyoming-cosyvoice bench`: load-test any Wyoming TTS server and report latency percentiles."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from . import seconds
from .say import DEFAULT_URI


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register the `bench` subcommand."""
    parser = subparsers.add_parser(
        "bench",
        help="measure time to first audio and real-time factor of any Wyoming TTS server",
        description="Send requests from concurrent clients (a new connection per request, as Home Assistant does) "
        "and print min/median/p90/p99/max of time to first audio, total time, audio length and real-time factor.",
    )
    parser.add_argument("--uri", default=DEFAULT_URI, help=f"server (default: {DEFAULT_URI})")
    parser.add_argument("--voice", help="voice name (default: the server's default voice)")
    parser.add_argument("--concurrency", type=int, default=1, help="clients at once (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=10, help="measured requests in total (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured requests first (default: %(default)s)")
    parser.add_argument("--stream", action="store_true", help="use streaming synthesis (synthesize-start/chunk/stop)")
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--text", help="text of every request")
    text.add_argument("--words", type=int, default=20, help="use a standard sentence of N words (default: %(default)s)")
    parser.add_argument("--timeout", type=seconds, default=120.0, help="seconds per request (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="write every request and the summary to this JSON file")
    parser.add_argument("--plot", type=Path, help="write a PNG of the latency distribution (needs matplotlib)")
    parser.add_argument("--debug", action="store_true", help="log debug messages")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the summary, write JSON/PNG; exit 1 when any request failed."""
    from ..bench import BenchSettings, plot, run_bench, sentence, write_json

    settings = BenchSettings(
        uri=args.uri,
        text=args.text if args.text is not None else sentence(args.words),
        voice=args.voice,
        concurrency=args.concurrency,
        requests=args.requests,
        stream=args.stream,
        warmup=args.warmup,
        timeout=args.timeout,
    )
    result = asyncio.run(run_bench(settings))
    print(f"server: {result.server['name']} ({result.server['description']})")
    print(result.table())
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        if plot(result, args.plot):
            print(f"wrote {args.plot}")
        else:
            print("no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    return 1 if result.summary()["failed"] else 0
