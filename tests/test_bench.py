"""`wyoming-cosyvoice bench` against a real server on an ephemeral port (few requests; nothing here is timed)."""

from __future__ import annotations

import asyncio
import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wyoming_cosyvoice.__main__ import main
from wyoming_cosyvoice.bench import PERCENTILES, BenchSettings, percentile, run_bench, sentence
from wyoming_cosyvoice.config import Config

from .helpers import refusing_unknown_voices, running_server

CLI_TIMEOUT = 120.0


def _check_ordered(row: dict, count: int) -> None:
    assert row["count"] == count
    values = [row[p] for p in PERCENTILES]
    assert values == sorted(values), row
    assert row["min"] <= row["mean"] <= row["max"]


async def test_bench_command_measures_real_requests(
    config: Config, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The CLI sends the requests, prints the summary and writes JSON whose percentiles come from those requests."""
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    async with running_server(config) as server:
        uri = f"tcp://127.0.0.1:{server.port}"
        argv = ["bench", "--uri", uri, "--concurrency", "2", "--requests", "5", "--json", str(out), "--plot", str(png)]
        status = await asyncio.wait_for(asyncio.to_thread(main, argv), CLI_TIMEOUT)
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert "first audio (ms)" in printed.out and "5 requests (0 failed), concurrency 2" in printed.out

    doc = json.loads(out.read_text())
    assert doc["settings"]["concurrency"] == 2 and doc["settings"]["text"] == sentence(20)
    assert doc["server"]["voices"] == ["tars", "anna"]
    assert doc["summary"]["requests"] == 5 and doc["summary"]["failed"] == 0
    requests = doc["requests"]
    assert sorted(r["index"] for r in requests) == list(range(5))
    for r in requests:
        assert r["ok"] and r["error"] == ""
        assert 0 < r["ttfa_ms"] <= r["total_ms"]
        assert r["chunks"] >= 1 and r["connect_ms"] > 0
        # espeak speaks 20 words in a few seconds; the client's own sum of chunk bytes says so.
        assert 0.12 * 20 < r["audio_s"] < 21
        assert r["rtf"] == pytest.approx(r["total_ms"] / 1000 / r["audio_s"])
    for metric in ("ttfa_ms", "total_ms", "audio_s", "rtf"):
        row = doc["metrics"][metric]
        _check_ordered(row, 5)
        values = sorted(r[metric] for r in requests)
        assert row["min"] == values[0] and row["max"] == values[-1]
        assert row["median"] == pytest.approx(values[2])
    assert doc["summary"]["audio_total_s"] == pytest.approx(sum(r["audio_s"] for r in requests))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plot: matplotlib is not installed" in printed.err
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_bench_streaming_counts_every_request(config: Config) -> None:
    """Streaming synthesis: each request ends with synthesize-stopped and carries audio."""
    async with running_server(config) as server:
        settings = BenchSettings(
            uri=f"tcp://127.0.0.1:{server.port}",
            text=sentence(8),
            voice="anna",
            concurrency=3,
            requests=4,
            stream=True,
            timeout=60,
        )
        result = await asyncio.wait_for(run_bench(settings), CLI_TIMEOUT)
    assert len(result.requests) == 4 and all(r.ok for r in result.requests)
    summary = result.summary()
    _check_ordered(summary["ttfa_ms"], 4)
    assert all(r.audio_s > 0.12 * 8 and r.chunks >= 1 for r in result.requests)
    assert summary["x_real_time"] > 0 and summary["behind_real_time"] >= 0


async def test_bench_records_server_errors(config: Config, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Requests the server refuses are counted as failed with the server's error code; the exit status is 1."""
    out = tmp_path / "bench.json"
    async with running_server(refusing_unknown_voices(config)) as server:
        argv = [
            "bench",
            "--uri",
            f"tcp://127.0.0.1:{server.port}",
            "--voice",
            "nobody",
            "--requests",
            "3",
            "--warmup",
            "0",
            "--json",
            str(out),
        ]
        status = await asyncio.wait_for(asyncio.to_thread(main, argv), CLI_TIMEOUT)
    assert status == 1
    doc = json.loads(out.read_text())
    assert doc["summary"]["failed"] == 3
    assert all(r["error"].startswith("VoiceNotFound") for r in doc["requests"])
    assert doc["metrics"]["ttfa_ms"]["count"] == 0 and doc["metrics"]["ttfa_ms"]["median"] is None
    assert "3 requests (3 failed)" in capsys.readouterr().out


def test_bench_unreachable_server_is_one_line_error(capsys: pytest.CaptureFixture) -> None:
    """Nothing listening: exit status 2 and one line naming the address."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        status = main(["bench", "--uri", f"tcp://127.0.0.1:{port}", "--requests", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith(f"error: tcp://127.0.0.1:{port}: no Wyoming server answered describe")


@given(st.lists(st.floats(min_value=-1e6, max_value=1e6), min_size=1, max_size=50), st.floats(0, 100))
def test_percentile_matches_numpy(values: list[float], q: float) -> None:
    """Linear-interpolation percentiles, as numpy computes them."""
    assert math.isclose(percentile(sorted(values), q), float(np.percentile(values, q)), rel_tol=1e-9, abs_tol=1e-6)
