#!/usr/bin/env python3
"""Re-run the outside attack on a real server process and report memory, descriptors and log volume (not a test).

    .venv/bin/python benchmarks/attack.py [--quick] [--json out.json] [--code DIR]

The server is `python -m wyoming_cosyvoice serve` on the embedded espeak engine with the default limits, except
idle and write timeouts of 5 s (so the clients that ping, dribble or stop reading finish quickly). Phases:
1. fuzz: N connections (default 15,000) of random or mutated input, 8 at a time;
2. crowds of 64 and of 200 concurrent clients running the attacker mix of tests/attackers.py (polite requests and
   streams, random disconnects with FIN or reset, stalled readers, ping-only, slowloris, empty floods, unknown
   voices that keep sending, fuzz);
3. hostile voice folders: `options.espeak_voice` naming /dev/zero and /etc/passwd, alias-bomb YAML in a
   profile.yaml and in voices.yaml, a 512 MiB sparse reference.wav, a reference written slowly while `describe`
   polls;
4. SIGTERM while a stream waits for its second sentence.
Reports the server's RSS (VmRSS, peak VmHWM) and open file descriptors after each phase, warning lines per phase,
"Fatal error" and "Traceback" lines in its log, describe latency, and the outcome counts. `--code DIR` runs the
server from another checkout (e.g. `git archive main | tar -x -C /tmp/main`) to compare before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
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

from wyoming.event import Event, async_read_event  # noqa: E402

from tests import attackers, audiogen  # noqa: E402  (the attackers are shared with tests/test_soak.py)


def free_port() -> int:
    """An unused loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """The server process, its log, and what /proc says about it."""

    def __init__(self, directory: Path, code: Optional[Path]) -> None:
        self.directory = directory
        self.port = free_port()
        self.log_path = directory / "server.log"
        self.log = self.log_path.open("wb")
        env = {**os.environ, "WYOMING_COSYVOICE_CACHE": str(directory / "cache"), "PYTHONUNBUFFERED": "1"}
        if code is not None:
            env["PYTHONPATH"] = str(code)
        cmd = [sys.executable, "-m", "wyoming_cosyvoice", "serve", "--config", str(directory / "server.yaml")]
        cmd += ["--uri", f"tcp://127.0.0.1:{self.port}"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=code or ROOT, env=env)
        self.log_offset = 0

    async def ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-2000:]}")
            try:
                await describe(self.port)
                return
            except OSError:
                await asyncio.sleep(0.1)
        raise RuntimeError("server not ready")

    def status(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return -1

    def snapshot(self) -> dict[str, Any]:
        """RSS, peak RSS (MB), open fds, threads, and the log lines written since the last snapshot."""
        text = self.log_path.read_text(errors="replace")
        new, self.log_offset = text[self.log_offset :], len(text)
        return {
            "rss_mb": round(self.status("VmRSS") / 1024, 1),
            "peak_rss_mb": round(self.status("VmHWM") / 1024, 1),
            "fds": len(os.listdir(f"/proc/{self.proc.pid}/fd")),
            "threads": self.status("Threads"),
            "warning_lines": new.count(" WARNING "),
            "error_lines": new.count(" ERROR "),
            "fatal_asyncio_errors": new.count("Fatal error"),
            "tracebacks": new.count("Traceback"),
        }


async def describe(port: int, timeout: float = 60.0) -> list[str]:
    """Voice names of one describe on a new connection."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(attackers.ev("describe"))
        event = await asyncio.wait_for(async_read_event(reader), timeout)
        assert event is not None and event.type == "info", event
        return [v["name"] for v in event.data["tts"][0]["voices"]]
    finally:
        writer.close()


async def timed_describes(port: int, count: int = 10) -> dict[str, float]:
    """Median and worst describe round trip, in ms."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        await describe(port)
        times.append((time.perf_counter() - started) * 1000)
    return {"median_ms": round(statistics.median(times), 1), "max_ms": round(max(times), 1)}


async def fuzz(port: int, count: int, seed: int) -> dict[str, int]:
    """`count` fuzzed connections, 8 at a time; outcome counts."""
    counts: dict[str, int] = {}
    next_index = iter(range(count))

    async def worker() -> None:
        for index in next_index:
            try:
                outcome = await attackers.fuzzed("127.0.0.1", port, random.Random(seed * 1000003 + index))
            except OSError as err:
                outcome = f"client: {type(err).__name__}"
            counts[outcome] = counts.get(outcome, 0) + 1

    await asyncio.gather(*(worker() for _ in range(8)))
    return counts


def write_config(directory: Path) -> None:
    audiogen.write(directory / "robot.wav", 3.0, 22050)
    voices = {"voices": [{"name": "robot", "reference_audio": "robot.wav", "languages": ["en-US"]}]}
    (directory / "voices.yaml").write_text(yaml.safe_dump(voices, sort_keys=False))
    doc = {
        "engine": {"name": "espeak", "fallback": None},
        "voice_providers": {"yaml": {"path": "voices.yaml"}, "folder": {"path": "voices"}},
        "limits": {"idle_timeout_s": 5.0, "write_timeout_s": 5.0, "shutdown_grace_s": 10.0},
    }
    (directory / "server.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def alias_bomb(levels: int) -> str:
    parts = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    parts += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "{" + ", ".join(parts) + "}"


def voice_folder(root: Path, name: str, profile: Optional[str] = None) -> Path:
    staging = root / "en_US" / f".{name}"
    audiogen.write(staging / "reference.wav", 2.0, 16000)
    if profile is not None:
        (staging / "profile.yaml").write_text(profile)
    staging.rename(root / "en_US" / name)
    return root / "en_US" / name


async def speak(port: int, voice: Optional[str] = None, timeout: float = 60.0) -> str:
    """One request; its outcome (ok, an error code, or timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        data = {"text": "Checking that the server still speaks."}
        if voice:
            data["voice"] = {"name": voice}
        writer.write(attackers.ev("synthesize", **data))
        try:
            while True:
                event = await asyncio.wait_for(async_read_event(reader), timeout)
                if event is None:
                    return "closed"
                if event.type == "error":
                    return str(event.data.get("code"))
                if event.type == "audio-stop":
                    return "ok"
        except asyncio.TimeoutError:
            return "timeout"
    finally:
        writer.close()


async def hostile_voices(server: Server) -> dict[str, Any]:
    """Hostile and half-written voice folders; what describe and requests do meanwhile."""
    root = server.directory / "voices"
    (root / "en_US").mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"describe_before": await timed_describes(server.port)}
    voice_folder(root, "zero", "options:\n  espeak_voice: " + "../" * 10 + "dev/zero\n")
    voice_folder(root, "passwd", "options: {espeak_voice: ../../etc/passwd}\n")
    voice_folder(root, "bomb", f"options: {alias_bomb(6)}\n")
    huge = root / "en_US" / ".huge"
    huge.mkdir()
    with open(huge / "reference.wav", "wb") as handle:  # a WAV header announcing 512 MiB, the rest sparse
        size = 512 * 1024 * 1024
        handle.write(b"RIFF" + (36 + size).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little"))
        handle.write((1).to_bytes(2, "little") + (1).to_bytes(2, "little") + (16000).to_bytes(4, "little"))
        handle.write((32000).to_bytes(4, "little") + (2).to_bytes(2, "little") + (16).to_bytes(2, "little"))
        handle.write(b"data" + size.to_bytes(4, "little"))
        handle.truncate(44 + size)
    huge.rename(root / "en_US" / "huge")
    voices_yaml = server.directory / "voices.yaml"
    original = voices_yaml.read_text()
    voices_yaml.write_text(original + f"- name: yamlbomb\n  reference_audio: robot.wav\n  options: {alias_bomb(6)}\n")
    started = time.perf_counter()
    result["listed_after_hostile"] = await describe(server.port)
    result["first_describe_after_hostile_ms"] = round((time.perf_counter() - started) * 1000, 1)
    await asyncio.sleep(5)  # background preparations
    result["describe_with_hostile"] = await timed_describes(server.port)
    describing = asyncio.ensure_future(timed_describes(server.port, 3))
    started = time.perf_counter()
    result["request_during_describes"] = await speak(server.port, timeout=60)
    result["request_during_describes_ms"] = round((time.perf_counter() - started) * 1000, 1)
    await describing
    voices_yaml.write_text(original)

    # A reference written slowly (40 pieces, 75 ms apart) while describe polls every 50 ms.
    cache = server.directory / "cache" / "references"
    before = set(cache.glob("*.wav")) if cache.exists() else set()
    complete = audiogen.write(server.directory / "complete.wav", 4.0, 16000).read_bytes()
    folder = root / "en_US" / "slow"
    folder.mkdir()
    done = asyncio.Event()

    async def write_slowly() -> None:
        with open(folder / "reference.wav", "wb") as handle:
            step = len(complete) // 40 + 1
            for start in range(0, len(complete), step):
                handle.write(complete[start : start + step])
                handle.flush()
                await asyncio.sleep(0.075)
        done.set()

    writer = asyncio.ensure_future(write_slowly())
    polls = listed = 0
    while not done.is_set():
        names = await describe(server.port)
        polls += 1
        listed += "slow" in names and not done.is_set()
        await asyncio.sleep(0.05)
    await writer
    await asyncio.sleep(3)
    listed_when_complete = "slow" in await describe(server.port)
    await asyncio.sleep(3)  # its preparation
    result["slow_writer"] = {
        "describes_while_writing": polls,
        "listed_while_partial": listed,
        "listed_when_complete": listed_when_complete,
        "new_cache_entries": len(set(cache.glob("*.wav")) - before) if cache.exists() else 0,
    }
    result["requests_after"] = {voice: await speak(server.port, voice) for voice in ("robot", "slow", "zero")}
    return result


async def sigterm_with_open_stream(server: Server) -> dict[str, Any]:
    """A stream with one sentence spoken gets SIGTERM, then sends its second sentence."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(attackers.ev("synthesize-start") + attackers.ev("synthesize-chunk", text="The first sentence. "))
    await asyncio.wait_for(async_read_event(reader), 30)  # audio-start
    await asyncio.sleep(2.0)  # the first sentence is spoken; the stream waits for more text
    started = time.perf_counter()
    server.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    events: list[str] = []
    try:
        writer.write(attackers.ev("synthesize-chunk", text="And the second one.") + attackers.ev("synthesize-stop"))
        while True:
            event: Optional[Event] = await asyncio.wait_for(async_read_event(reader), 30)
            if event is None:
                break
            events.append(event.type)
            if event.type == "synthesize-stopped":
                break
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError) as err:
        events.append(type(err).__name__)
    writer.close()
    code = await asyncio.to_thread(server.proc.wait, 30)
    return {
        "stream_ended_with": events[-1] if events else "nothing",
        "audio_chunks_after_sigterm": events.count("audio-chunk"),
        "exit_code": code,
        "exit_s": round(time.perf_counter() - started, 2),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix="attack-"))
    write_config(directory)
    server = Server(directory, args.code)
    results: dict[str, Any] = {"code": str(args.code or ROOT), "phases": {}}
    phases = results["phases"]
    try:
        await server.ready()
        assert await speak(server.port) == "ok"
        phases["baseline"] = server.snapshot()
        count = 2000 if args.quick else 15000
        started = time.perf_counter()
        outcomes = await fuzz(server.port, count, seed=1)
        phases["fuzz"] = {"connections": count, "seconds": round(time.perf_counter() - started, 1)}
        phases["fuzz"].update(outcomes=outcomes, **server.snapshot())
        for clients in (64, 200):
            started = time.perf_counter()
            rounds = 2 if args.quick else 5
            counts = await attackers.crowd("127.0.0.1", server.port, clients, rounds, seed=clients)
            seconds = time.perf_counter() - started
            snap = server.snapshot()
            snap["warning_lines_per_minute"] = round(snap["warning_lines"] / seconds * 60)
            phases[f"crowd_{clients}"] = {"clients": clients, "rounds": rounds, "seconds": round(seconds, 1)}
            phases[f"crowd_{clients}"].update(outcomes={k: v for k, v in counts.items() if v}, **snap)
        await asyncio.sleep(6)  # let idle connections time out
        phases["settled"] = {"after_polite_request": await speak(server.port), **server.snapshot()}
        phases["hostile_voices"] = await asyncio.wait_for(hostile_voices(server), 600)
        phases["hostile_voices"].update(server.snapshot())
    except Exception as err:  # report what was measured up to the failure
        results["failed"] = f"{type(err).__name__}: {err}"
    try:
        if server.proc.poll() is None:
            phases["sigterm"] = await sigterm_with_open_stream(server)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
        server.log.close()
        results["log"] = str(server.log_path)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 fuzzed connections and 2 rounds per crowd")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--code", type=Path, help="run the server from this checkout (its wyoming_cosyvoice)")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 1 if "failed" in results else 0


if __name__ == "__main__":
    sys.exit(main())
