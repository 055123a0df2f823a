#!/usr/bin/env python3
"""Re-run issue 21's attacks on the web port (the studio) against a real server process, as a user would (not a test).

    .venv/bin/python benchmarks/web_attack.py [--json out.json] [--code DIR]

Each finding gets its own `python -m wyoming_cosyvoice serve` (espeak engine, studio on, default limits):
2. a symlinked language folder `voices/en_US` -> a folder holding `precious/thesis.txt`; add a voice `precious` in
   the studio, then `voices add precious --force`: does thesis.txt survive?
3. a 355 KB FLAC of 2 h of constant audio posted to `api/check` and `api/voices`: the answers and the server's RSS;
5. a file limit of 200 and 192 idle studio connections: does Wyoming answer `describe`, are they closed, how large
   is the log;
6. `web.token` set, 40 clients uploading 16 MiB without it: the answers, bytes sent before them, the RSS;
13. `bob\\n` in voices.yaml: what `describe` offers;
15. `X-Ingress-Path: //evil.example/a`: the page's `<base href>`.
`--code DIR` runs the server from another checkout (e.g. `git archive main | tar -x -C /tmp/main`) to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import aiohttp
import numpy as np
import soundfile as sf
import yaml
from wyoming.client import AsyncTcpClient
from wyoming.info import Describe, Info

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token-1"


class Server:
    """`serve` with the studio on port 0, its log in a file (a flooded log cannot block it on a full pipe)."""

    def __init__(self, directory: Path, code: Optional[Path], voices: list[dict[str, Any]], **web: Any) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "voices.yaml").write_text(yaml.safe_dump({"voices": voices}))
        config = {
            "server": {"uri": "tcp://127.0.0.1:0"},
            "engine": {"name": "espeak", "fallback": None},
            "voice_providers": {"yaml": {"path": "voices.yaml"}, "folder": {"path": "voices"}},
            "web": {"enabled": True, "port": 0, **web},
        }
        (directory / "server.yaml").write_text(yaml.safe_dump(config))
        self.directory, self.code = directory, code
        self.log = directory / "server.log"

    def start(self, file_limit: Optional[int] = None) -> "Server":
        """Start and wait for both ports."""
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (file_limit, hard))) if file_limit else None
        cmd = [sys.executable, "-m", "wyoming_cosyvoice", "serve", "--config", str(self.directory / "server.yaml")]
        with self.log.open("wb") as sink:
            self.proc = subprocess.Popen(
                cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=self.code or ROOT, env=self.env(), preexec_fn=limit
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.proc.poll() is None:
            text = self.log.read_text(errors="replace")
            ready = re.search(r"Ready on tcp://127\.0\.0\.1:(\d+)", text)
            studio = re.search(r"Voice studio on http://127\.0\.0\.1:(\d+)/", text)
            if ready and studio:
                self.port, self.web = int(ready.group(1)), int(studio.group(1))
                return self
            time.sleep(0.1)
        raise RuntimeError("server did not start: " + self.log.read_text(errors="replace")[-2000:])

    def env(self) -> dict[str, str]:
        env = {**os.environ, "WYOMING_COSYVOICE_CACHE": str(self.directory / "cache"), "PYTHONUNBUFFERED": "1"}
        if self.code is not None:
            env["PYTHONPATH"] = str(self.code)
        return env

    def memory(self) -> dict[str, float]:
        """RSS and peak RSS in MB (/proc)."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return {key: int(re.search(rf"{name}:\s+(\d+)", status).group(1)) // 1024 for key, name in  # type: ignore
                (("rss_mb", "VmRSS"), ("peak_rss_mb", "VmHWM"))}  # fmt: skip

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def describe(port: int, timeout: float = 10.0) -> dict[str, Any]:
    """The voices a Wyoming `describe` offers and how long it took (or the error)."""
    started = time.perf_counter()
    try:
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Describe().event())
            event = await asyncio.wait_for(client.read_event(), timeout)
            assert event is not None
            voices: Any = [v.name for v in Info.from_event(event).tts[0].voices]
    except (OSError, asyncio.TimeoutError, AssertionError) as err:
        voices = type(err).__name__
    return {"voices": voices, "seconds": round(time.perf_counter() - started, 2)}


def constant_flac(seconds: float, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", samplerate=rate, channels=1, format="FLAC", subtype="PCM_16") as handle:
        block = np.full(rate * 60, 0.5, dtype=np.float32)
        for _ in range(int(seconds // 60)):
            handle.write(block)
    return buffer.getvalue()


def tone_wav() -> bytes:
    buffer = io.BytesIO()
    t = np.arange(16000 * 3) / 16000
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, format="WAV")
    return buffer.getvalue()


def form(audio: bytes, name: str) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("name", name)
    data.add_field("language", "en-US")
    data.add_field("audio", audio, filename="a.flac", content_type="audio/flac")
    return data


async def post(url: str, data: aiohttp.FormData) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.post(url, data=data) as response:
        body = await response.json()
        return {"status": response.status, "error": body.get("error") or (body.get("errors") or [None])[0]}


async def symlinked_language_folder(work: Path, code: Optional[Path]) -> dict[str, Any]:
    outside = work / "outside"
    (outside / "precious").mkdir(parents=True)
    thesis = outside / "precious" / "thesis.txt"
    thesis.write_text("years of work\n")
    (work / "voices").mkdir()
    (work / "voices" / "en_US").symlink_to(outside, target_is_directory=True)
    server = Server(work, code, [{"name": "tars", "languages": ["en-US"]}]).start()
    try:
        studio = await post(f"http://127.0.0.1:{server.web}/api/voices", form(tone_wav(), "precious"))
    finally:
        server.stop()
    result: dict[str, Any] = {"studio_add": studio, "thesis_kept_after_studio": thesis.exists()}
    (work / "in.wav").write_bytes(tone_wav())
    cmd = [sys.executable, "-m", "wyoming_cosyvoice", "voices", "add", "precious", str(work / "in.wav")]
    cmd += ["--language", "en-US", "--force", "--folder", str(work / "voices")]
    done = subprocess.run(cmd, cwd=code or ROOT, env=server.env(), capture_output=True, text=True)
    lines = (done.stderr + done.stdout).strip().splitlines()
    result["voices_add_force"] = {"exit": done.returncode, "last_line": lines[-1] if lines else ""}
    result["thesis_kept_after_voices_add"] = thesis.exists()
    result["outside_now"] = sorted(str(p.relative_to(outside)) for p in outside.rglob("*"))
    return result


async def decompression_bomb(work: Path, code: Optional[Path]) -> dict[str, Any]:
    server = Server(work, code, [{"name": "tars", "languages": ["en-US"]}]).start()
    bomb = constant_flac(7200.0)
    try:
        result: dict[str, Any] = {"bomb_bytes": len(bomb), "before": server.memory()}
        started = time.perf_counter()
        result["check"] = await post(f"http://127.0.0.1:{server.web}/api/check", form(bomb, "bomb"))
        result["check"]["seconds"] = round(time.perf_counter() - started, 1)
        result["save"] = await post(f"http://127.0.0.1:{server.web}/api/voices", form(bomb, "bomb"))
        result["after"] = server.memory()
        voices = work / "voices"
        result["written"] = sorted(str(p.relative_to(work)) for p in voices.rglob("*")) if voices.exists() else []
    finally:
        server.stop()
    return result


async def _until_closed(reader: asyncio.StreamReader, started: float, limit: float) -> tuple[Optional[bytes], float]:
    received = b""
    try:
        async with asyncio.timeout(limit):
            while chunk := await reader.read(65536):
                received += chunk
    except TimeoutError:
        return None, limit
    return received, time.perf_counter() - started


async def idle_connections(work: Path, code: Optional[Path]) -> dict[str, Any]:
    server = Server(work, code, [{"name": "tars", "languages": ["en-US"]}]).start(file_limit=200)
    connections = []
    try:
        for _ in range(192):
            connections.append(await asyncio.open_connection("127.0.0.1", server.web))
        result: dict[str, Any] = {"describe_with_192_idle": await describe(server.port)}
        started = time.perf_counter()
        ends = await asyncio.gather(*(_until_closed(reader, started, 60.0) for reader, _ in connections))
        refused = [s for data, s in ends if data and data.startswith(b"HTTP/1.1 503")]
        closed = [s for data, s in ends if data == b""]
        result["refused_503"] = len(refused)
        result["idle_closed"] = len(closed)
        result["last_closed_after_s"] = round(max(closed), 1) if closed else None
        result["still_open_after_60_s"] = sum(1 for data, _ in ends if data is None)
        result["describe_after"] = await describe(server.port)
        text = server.log.read_text(errors="replace")
        result["log_kb"] = server.log.stat().st_size // 1000
        result["tracebacks"] = text.count("Traceback")
    finally:
        for _, writer in connections:
            writer.close()
        server.stop()
    return result


async def _tokenless_upload(port: int, length: int) -> tuple[str, int]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST /api/voices HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; boundary=BB\r\n"
        f'Content-Length: {length}\r\n\r\n--BB\r\nContent-Disposition: form-data; name="name"\r\n\r\nx\r\n'
        '--BB\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n\r\n'
    ).encode()
    writer.write(head)
    sent, answer = len(head), asyncio.ensure_future(reader.readline())
    try:
        while sent < length and not answer.done():
            piece = min(65536, length - sent)
            writer.write(b"\0" * piece)
            sent += piece
            await asyncio.wait_for(writer.drain(), 5.0)
    except (OSError, asyncio.TimeoutError):
        pass  # the server closed or stopped reading: what did it answer?
    try:
        status = (await asyncio.wait_for(answer, 30.0)).decode(errors="replace").strip()[:12] or "closed"
    except (OSError, asyncio.TimeoutError) as err:
        status = type(err).__name__
    writer.close()
    return status, sent


async def tokenless_uploads(work: Path, code: Optional[Path]) -> dict[str, Any]:
    server = Server(work, code, [{"name": "tars", "languages": ["en-US"]}], token=TOKEN).start()
    try:
        before = server.memory()
        ends = await asyncio.gather(*(_tokenless_upload(server.web, 16 * 1024 * 1024) for _ in range(40)))
        statuses: dict[str, int] = {}
        for status, _ in ends:
            statuses[status] = statuses.get(status, 0) + 1
        sent = sorted(s for _, s in ends)
        return {"answers": statuses, "median_kib_sent_before_answer": sent[len(sent) // 2] // 1024,
                "before": before, "after": server.memory()}  # fmt: skip
    finally:
        server.stop()


async def names_and_ingress(work: Path, code: Optional[Path]) -> dict[str, Any]:
    voices = [{"name": "bob\n", "languages": ["en-US"]}, {"name": "tars", "languages": ["en-US"]}]
    server = Server(work, code, voices).start()
    try:
        result: dict[str, Any] = {"describe_offers": (await describe(server.port))["voices"]}
        async with aiohttp.ClientSession() as session:
            headers = {"X-Ingress-Path": "//evil.example/a"}
            async with session.get(f"http://127.0.0.1:{server.web}/", headers=headers) as response:
                base = re.search(r'<base href="[^"]*">', await response.text())
        result["base_for_//evil.example/a"] = base.group(0) if base else None
    finally:
        server.stop()
    return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="web-attack-"))
    results: dict[str, Any] = {"code": str(args.code or ROOT), "findings": {}}
    for name, attack in (
        ("2_symlinked_language_folder", symlinked_language_folder),
        ("3_decompression_bomb", decompression_bomb),
        ("5_idle_connections_file_limit_200", idle_connections),
        ("6_tokenless_uploads", tokenless_uploads),
        ("13_15_names_and_ingress", names_and_ingress),
    ):
        try:
            results["findings"][name] = await attack(work / name, args.code)
        except Exception as err:  # report the others anyway
            results["findings"][name] = {"failed": f"{type(err).__name__}: {err}"}
    results["work"] = str(work)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--code", type=Path, help="run the server from this checkout (its wyoming_cosyvoice)")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
