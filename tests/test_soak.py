"""Soak: 64 concurrent misbehaving clients (tests/attackers.py) against a live server for a bounded number of rounds.

Polite requests and streams are mixed with clients that vanish mid-audio (with FIN or reset), stop reading, only
ping, dribble bytes, flood empty requests, keep sending after their stream failed, and send fuzzed input. Every
client must get an outcome within the limits (no `timeout`), the polite ones their audio, and afterwards the server
must have no connection, task, thread or file descriptor left over, nothing logged by asyncio's exception handler,
and still synthesize exactly.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from . import attackers
from .helpers import fault_config
from .test_fuzz import ServerThread, encode, exchange, parse, speak

CLIENTS = 64
ROUNDS = 6
"""64 clients x 6 rounds = 384 connections (its running time: docs/reliability.md, "Fuzzing")."""


def open_fds() -> int:
    """File descriptors open in this process (server and clients share it)."""
    return len(os.listdir("/proc/self/fd"))


def test_soak_concurrent_misbehaving_clients(tmp_path: Path) -> None:
    config = fault_config(
        tmp_path,
        limits={"idle_timeout_s": 1.0, "write_timeout_s": 1.0, "max_stream_chars": 5000, "max_connections": 96},
        engine={"chunk_ms": 2, "chunk_bytes": 3200, "chunks_per_word": 1},
        max_concurrent=64,
        unknown_voice="error",  # the client that keeps sending after its stream failed needs a failing stream
    )
    server = ServerThread(config)
    reported: list[dict[str, Any]] = []
    server.loop.set_exception_handler(lambda _loop, context: reported.append(context))
    port = server.start()
    started = time.perf_counter()
    try:
        assert [e.type for e in speak(port, "warm up")][-1] == "audio-stop"
        assert [e.type for e in parse(exchange(port, encode("describe")))] == ["info"]
        server.settle()
        server.snapshot()
        fds_before = open_fds()

        counts = asyncio.run(attackers.crowd("127.0.0.1", port, CLIENTS, ROUNDS, seed=1))

        server.settle(timeout=30)
        summary = {name: dict(sorted(outcomes.items())) for name, outcomes in counts.items() if outcomes}
        print(f"soak: {CLIENTS} clients x {ROUNDS} rounds in {time.perf_counter() - started:.1f} s: {summary}")
        for name, outcomes in counts.items():
            assert "timeout" not in outcomes, (name, outcomes)
            assert not [o for o in outcomes if o.startswith(("bad", "client:"))], (name, outcomes)
        for name in ("polite_request", "polite_stream"):
            assert counts[name].get("ok", 0) == sum(counts[name].values()), counts[name]
        assert set(counts["only_pings"]) <= {"ClientTimeout"}, counts["only_pings"]
        # A flood is refused (LimitExceeded), or served as fast as it came and then idle (ClientTimeout).
        assert set(counts["empty_flood"]) <= {"LimitExceeded", "ClientTimeout", "reset"}, counts["empty_flood"]
        assert set(counts["unknown_voice_keeps_sending"]) <= {"VoiceNotFound", "reset", "closed"}

        # The server is unharmed and nothing is left behind.
        events = speak(port, "one two three four")
        assert sum(len(e.payload or b"") for e in events if e.type == "audio-chunk") == 4 * 3200
        server.assert_nothing_left()
        deadline = time.monotonic() + 10
        while open_fds() > fds_before and time.monotonic() < deadline:  # closed sockets go away asynchronously
            time.sleep(0.05)
        assert open_fds() <= fds_before, (open_fds(), fds_before)
        assert not reported, [c.get("message") for c in reported]
    finally:
        server.stop()
