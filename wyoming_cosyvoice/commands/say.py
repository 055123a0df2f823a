"""`wyoming-cosyvoice say`: synthesize text on any Wyoming TTS server and play/save/forward it as it streams."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import threading
from pathlib import Path
from typing import IO, Any, AsyncIterator, Optional

from ..client import ReplyStats, TtsClient
from ..errors import CosyVoiceServiceError, NoAudioDevice, UsageError
from ..plugins import Plugins
from ..sinks import Sink, SinkResult, StreamInfo, Tee, TeeStream, parse_spec, sink_from_spec
from . import seconds

DEFAULT_URI = "tcp://127.0.0.1:10200"

MAX_LAG_SECONDS = 3 * 3600.0
"""The speaker plays in real time while the server runs ahead, so the client lets a sink lag by up to 3 h of audio."""


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register the `say` subcommand."""
    parser = subparsers.add_parser(
        "say",
        help="speak text through a Wyoming TTS server (plays as it streams)",
        description="Synthesize TEXT on a Wyoming TTS server and play it on the speaker as it streams; "
        "save it (--out) or forward it to a Wyoming sound service (--sink wyoming:URI).",
    )
    parser.add_argument("text", nargs="?", help="text to speak ('-': read all of standard input)")
    parser.add_argument("--uri", default=DEFAULT_URI, help=f"TTS server (default: {DEFAULT_URI})")
    parser.add_argument("--voice", help="voice name (default: the server's default voice)")
    parser.add_argument("--language", help="language tag, e.g. en-US (servers may pick a voice by it)")
    parser.add_argument(
        "--out", type=Path, metavar="FILE.wav", help="save the audio to a WAV file (same as --sink wav:FILE)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing WAV file")
    parser.add_argument(
        "--sink",
        action="append",
        default=[],
        metavar="NAME[:ARG]",
        help="where audio goes, repeatable: speaker[:DEVICE], wav:FILE, wyoming:tcp://HOST:PORT (default: speaker)",
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="read text line by line from standard input (or --file) and stream it as it comes",
    )
    parser.add_argument("--file", type=Path, help="with --stream: read lines from this file instead of stdin")
    parser.add_argument("--device", help="speaker output device: index or part of its name")
    parser.add_argument(
        "--jitter-ms", type=int, default=None, help="speaker: audio buffered before playback (default 150)"
    )
    parser.add_argument("--device-rate", type=int, default=None, help="speaker: play at this rate (resampled)")
    parser.add_argument(
        "--timeout", type=seconds, default=60.0, help="seconds to wait for any reply event (default 60)"
    )
    parser.add_argument("--plugins-dir", type=Path, help="extra plugins folder (for third-party sinks)")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument("--debug", action="store_true", help="log debug messages")
    parser.set_defaults(func=run)


def build_sinks(args: argparse.Namespace, plugins: Plugins) -> list[Sink]:
    """Sinks from --sink/--out (speaker when none is given); a sink that cannot start is a one-line error."""
    specs = list(args.sink)
    if args.out is not None:
        specs.append(f"wav:{args.out}")
    default = not specs
    if default:
        specs = ["speaker"]
    sinks = []
    for spec in specs:
        name, _ = parse_spec(plugins, spec)
        extra: dict[str, Any] = {}
        if name == "speaker":
            if args.device is not None and ":" not in spec:
                extra["device"] = args.device
            if args.jitter_ms is not None:
                extra["jitter_ms"] = args.jitter_ms
            if args.device_rate is not None:
                extra["rate"] = args.device_rate
        elif name == "wav" and args.overwrite:
            extra["overwrite"] = True
        try:
            sinks.append(sink_from_spec(plugins, spec, extra))
        except NoAudioDevice as err:
            raise NoAudioDevice(f"{err}; use --out FILE.wav to save the audio instead") from None
    return sinks


def _line_reader(source: IO[str]) -> AsyncIterator[str]:
    """Lines of `source` as they arrive, read by a daemon thread so a blocked stdin never holds up the exit."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[Optional[str]] = asyncio.Queue()

    def pump() -> None:
        try:
            for line in source:
                loop.call_soon_threadsafe(lines.put_nowait, line)
        finally:
            loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=pump, name="stdin lines", daemon=True).start()

    async def gen() -> AsyncIterator[str]:
        while True:
            line = await lines.get()
            if line is None:
                return
            yield line

    return gen()


class _Output:
    """Opens the Tee on the reply's first audio and feeds it."""

    def __init__(self, tee: Tee) -> None:
        self.tee = tee
        self.stream: Optional[TeeStream] = None

    async def finish(self, ok: bool) -> list[SinkResult]:
        if self.stream is None:
            return []
        return await self.stream.close(ok)


async def speak(args: argparse.Namespace, sinks: list[Sink], out: IO[str]) -> int:
    """Run one `say`: connect, synthesize, feed the sinks, report. Returns the exit status."""
    stats = ReplyStats()
    output = _Output(Tee(sinks, max_lag_seconds=MAX_LAG_SECONDS))
    ok = False
    problem: Optional[BaseException] = None
    try:
        async with TtsClient(args.uri, read_timeout=args.timeout) as client:
            if args.stream:
                source: IO[str] = open(args.file, encoding="utf-8") if args.file else sys.stdin
                pieces = client.synthesize_stream(_line_reader(source), args.voice, args.language, stats)
            else:
                text = sys.stdin.read() if args.text == "-" else args.text
                pieces = client.synthesize(text, args.voice, args.language, stats)
            async for piece in pieces:
                if output.stream is None:
                    output.stream = output.tee.open(piece.fmt, StreamInfo(label="reply", voice=args.voice))
                output.stream.write(piece.pcm)
        ok = True
    except CosyVoiceServiceError as err:
        problem = err
    except asyncio.CancelledError:
        problem = KeyboardInterrupt()
    results = await output.finish(ok)
    if not args.quiet:
        if stats.fmt is not None or ok:
            print(stats.line(), file=out)
            if args.stream and stats.input_closed is not None and stats.first_audio is not None:
                print(
                    f"first audio {'before' if stats.first_audio < stats.input_closed else 'after'} the input "
                    f"ended ({stats.first_audio:.2f} s vs {stats.input_closed:.2f} s)",
                    file=out,
                )
        for result in results:
            print(result.line(), file=out)
    if isinstance(problem, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    return 0 if all(r.ok for r in results) else 1


async def _main(args: argparse.Namespace, sinks: list[Sink]) -> int:
    """speak() with Ctrl-C turned into an orderly abort (sinks finish, WAV files stay valid)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    inner = asyncio.ensure_future(speak(args, sinks, sys.stdout))
    interrupted = False

    def on_signal() -> None:
        nonlocal interrupted
        if not interrupted:
            interrupted = True
            inner.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal)
    try:
        return await _until_done(inner)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)


async def _until_done(inner: "asyncio.Future[int]") -> int:
    # speak() catches its own cancellation to close the sinks; a second cancel (e.g. from a test) ends it hard.
    try:
        return await inner
    except asyncio.CancelledError:
        return 130


def run(args: argparse.Namespace) -> int:
    """Validate options, set up sinks (fails fast, before connecting), then speak."""
    if args.stream and args.text is not None:
        raise UsageError("--stream reads text from standard input or --file; do not also give TEXT")
    if not args.stream and args.text is None:
        raise UsageError("nothing to say: give TEXT, '-' to read standard input, or --stream")
    if args.file is not None and not args.stream:
        raise UsageError("--file needs --stream")
    if args.file is not None and not args.file.is_file():
        raise UsageError(f"{args.file}: file not found")
    plugins = Plugins(args.plugins_dir)
    sinks = build_sinks(args, plugins)
    return asyncio.run(_main(args, sinks))
