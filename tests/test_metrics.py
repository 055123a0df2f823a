"""Metrics: each one moves as its event happens (a request, a refusal, an underrun, a client leaving), read back
through the Prometheus text format a scraper gets; /metrics protected like the studio; the shared playback rule."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Optional

import pytest

pytest.importorskip("prometheus_client")
aiohttp = pytest.importorskip("aiohttp")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from wyoming.tts import Synthesize, SynthesizeVoice  # noqa: E402

from wyoming_cosyvoice.audio import Playback  # noqa: E402
from wyoming_cosyvoice.config import MetricsSettings  # noqa: E402
from wyoming_cosyvoice.errors import ServerBusy  # noqa: E402
from wyoming_cosyvoice.metrics import Metrics, create_metrics, histogram_quantile  # noqa: E402
from wyoming_cosyvoice.plugins import Plugins  # noqa: E402
from wyoming_cosyvoice.server import Server  # noqa: E402
from wyoming_cosyvoice.web.metrics_route import MetricsListener  # noqa: E402

from .helpers import (  # noqa: E402
    TIMEOUT,
    collect,
    connect,
    fault_config,
    fault_plugins,
    load,
    read,
    running_server,
    write_config,
)
from .studio_support import GatePlugin, studio_server, wait_for  # noqa: E402

NS = "wyoming_cosyvoice_"


def samples(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the server's exposition: (name, sorted labels) -> value."""
    body, _ = server.service.metrics.exposition()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(server: Server, name: str, **labels: str) -> float:
    """One sample's value (0 when the series does not exist yet)."""
    return samples(server).get((NS + name, tuple(sorted(labels.items()))), 0.0)


def requests(server: Server, outcome: str, voice: str = "tars") -> float:
    return value(server, "requests_total", protocol="wyoming", voice=voice, outcome=outcome)


async def counted(server: Server, outcome: str, count: int = 1) -> None:
    """Wait until `count` replies ended with `outcome` (a reply is counted just after its last event is written)."""
    await wait_for(lambda: requests(server, outcome) == count, what=f"{count} {outcome} replies counted")


async def speak(server: Server, text: str, voice: Optional[str] = None) -> Any:
    async with connect(server) as client:
        await client.write_event(Synthesize(text=text, voice=SynthesizeVoice(name=voice) if voice else None).event())
        return await collect(client)


# -------------------------------------------------------------------------- the request path


async def test_a_request_moves_counters_and_histograms(config: Any) -> None:
    async with running_server(config) as server:
        assert requests(server, "ok") == 0
        reply = await speak(server, "Hello there, this is a test.")
        assert reply.stops == 1
        await counted(server, "ok")
        assert value(server, "first_audio_seconds_count") == 1
        assert value(server, "request_seconds_count") == 1
        assert value(server, "real_time_factor_count") == 1
        assert value(server, "queue_wait_seconds_count") == 1
        assert value(server, "audio_seconds_total") == pytest.approx(reply.seconds, rel=1e-3)
        assert value(server, "in_flight") == 0
        assert value(server, "engine_state", engine="espeak", state="ready") == 1
        assert value(server, "voices", state="ok") == 2
        assert value(server, "voice_preparations_total", outcome="ok") == 2
        assert samples(server)[("process_open_fds", ())] > 0  # prometheus_client's process collector
        summary = server.service.metrics.summary()
        assert summary["requests"] == 1 and summary["ok"] == 1
        assert summary["first_audio_p95_ms"] is not None and summary["first_audio_p95_ms"] > 0


async def test_describe_shows_the_recorders_numbers(config: Any) -> None:
    async with running_server(config) as server:
        await speak(server, "One sentence.")
        await counted(server, "ok")
        info = await server.service.info()
    description = info.tts[0].description or ""
    assert "requests=1" in description and "first_audio_p95_ms=" in description


async def test_refusal_at_the_admission_limit(tmp_path: Path) -> None:
    config = load(write_config(tmp_path / "cfg", server={"max_concurrent": 1}, engine={"name": "gate"}))
    plugins = Plugins(extra=(GatePlugin,))
    async with running_server(config, plugins) as server:
        engine: Any = server.service.engine
        async with connect(server) as first, connect(server) as second:
            await first.write_event(Synthesize(text="Held open.").event())
            assert (await read(first)).type == "audio-start"  # type: ignore[union-attr]
            await wait_for(lambda: value(server, "in_flight") == 1, what="first request in flight")
            await second.write_event(Synthesize(text="Refused.").event())
            refused = await collect(second)
            assert refused.errors and refused.errors[0].code == "ServerBusy"
            assert value(server, "refused_total", reason="busy") == 1
            engine.gate.set()
            assert (await collect(first)).stops == 1
        await counted(server, "error")
        await counted(server, "ok")


async def test_underrun_forced_by_a_slow_engine(tmp_path: Path) -> None:
    # 20 ms of audio per chunk, made 60 ms apart: playback runs dry about 40 ms per chunk after the first.
    slow = fault_config(tmp_path / "slow", engine={"chunk_ms": 60, "chunk_bytes": 640, "chunks_per_word": 2})
    async with running_server(slow, fault_plugins()) as server:
        reply = await speak(server, "three slow words")
        assert reply.stops == 1
        await counted(server, "ok")
        assert value(server, "underruns_total") == 1
        assert value(server, "underrun_seconds_total") > 0.1
    # One second of audio per chunk, made 1 ms apart: no underrun.
    fast = fault_config(tmp_path / "fast", engine={"chunk_ms": 1, "chunk_bytes": 32000, "chunks_per_word": 1})
    async with running_server(fast, fault_plugins()) as server:
        assert (await speak(server, "three fast words")).stops == 1
        await counted(server, "ok")
        assert value(server, "underruns_total") == 0


async def test_a_client_leaving_counts_as_cancelled(tmp_path: Path) -> None:
    config = load(write_config(tmp_path / "cfg", engine={"name": "gate"}))
    async with running_server(config, Plugins(extra=(GatePlugin,))) as server:
        engine: Any = server.service.engine
        async with connect(server) as client:
            await client.write_event(Synthesize(text="I will leave early.").event())
            events = [await read(client), await read(client)]
            assert [e.type for e in events if e] == ["audio-start", "audio-chunk"]
        await counted(server, "cancelled")
        await wait_for(lambda: engine.outcomes == ["cancelled"], what="the engine's work cancelled")
        assert value(server, "first_audio_seconds_count") == 1
        assert requests(server, "ok") == 0


async def test_a_fallback_and_a_default_voice_count_as_degraded(tmp_path: Path) -> None:
    config = load(
        write_config(
            tmp_path / "cfg", engine={"name": "fault", "fallback": "espeak"}, server={"unknown_voice": "default"}
        )
    )
    async with running_server(config, fault_plugins()) as server:
        reply = await speak(server, "FAIL so the fallback speaks")
        assert reply.stops == 1 and not reply.errors
        await counted(server, "degraded")
        assert value(server, "fallback_total", reason="failed") == 1
        assert (await speak(server, "Hello there.", voice="nobody-by-this-name")).stops == 1
        await counted(server, "degraded", 2)
        assert value(server, "fallback_total", reason="default_voice") == 1
        assert value(server, "degraded_total", kind="fallback") == 1  # describe's own counts, read at scrape
        assert value(server, "degraded_total", kind="default_voice") == 1


async def test_broken_voice_counts_in_voices_and_preparations(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF" + b"\x00" * 100)  # a reference that exists but is no audio: preparation fails
    voices = [
        {"name": "tars", "languages": ["en-US"]},
        {"name": "ghost", "languages": ["en-US"], "reference_audio": str(garbage), "transcript": "Hello."},
    ]
    config = load(write_config(tmp_path / "cfg", voices=voices, default="tars"))
    async with running_server(config) as server:
        assert value(server, "voices", state="broken") == 1
        assert value(server, "voices", state="ok") == 1
        assert value(server, "voice_preparations_total", outcome="broken") == 1
        assert value(server, "voice_preparations_total", outcome="ok") == 1


def test_record_failed_with_engine_busy_and_degraded_outcome() -> None:
    metrics: Any = create_metrics(True)
    record = metrics.request("http", "tars")
    record.speaking()
    record.failed(ServerBusy("engine at capacity"))
    record.spoken()
    record.finish(False)
    record.finish(False)  # counted once
    degraded = metrics.request("nonsense-protocol", "tars")
    degraded.degraded("engine_failed")
    degraded.written(0.5)
    degraded.finish(True)
    body = metrics.exposition()[0].decode()
    assert f'{NS}refused_total{{reason="engine_busy"}} 1.0' in body
    assert f'{NS}requests_total{{outcome="error",protocol="http",voice="tars"}} 1.0' in body
    assert f'{NS}requests_total{{outcome="degraded",protocol="other",voice="tars"}} 1.0' in body
    assert f'{NS}fallback_total{{reason="engine_failed"}} 1.0' in body
    metrics.fallback("engine_failed")
    assert metrics.summary()["fallbacks"] == 2


def test_voice_labels_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from wyoming_cosyvoice import prometheus

    monkeypatch.setattr(prometheus, "MAX_VOICE_LABELS", 2)
    metrics: Any = create_metrics(True)
    for name in ("a", "b", "c", "d"):
        metrics.request("wyoming", name).finish(True)
    body = metrics.exposition()[0].decode()
    assert 'voice="other"} 2.0' in body and 'voice="c"' not in body


def test_without_prometheus_client_the_recorder_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from wyoming_cosyvoice import metrics as metrics_module

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "wyoming_cosyvoice.prometheus", None)
    assert type(create_metrics(True)) is Metrics
    hint = metrics_module.missing_dependency()
    assert hint is not None and "wyoming-cosyvoice[metrics]" in hint


def test_off_records_nothing() -> None:
    off = create_metrics(False)
    assert type(off) is Metrics and not off.enabled
    off.request("wyoming", "tars").finish(True)
    assert off.summary() == {}


# -------------------------------------------------------------------------- the shared rules


def test_playback_rule_matches_bench() -> None:
    playback = Playback()
    playback.chunk(10.0, 0.1)
    playback.chunk(10.05, 0.1)  # ahead of playback
    assert playback.dry_seconds == 0
    playback.chunk(10.5, 0.1)  # 0.2 s played by 10.2: dry for 0.3 s
    assert playback.dry_seconds == pytest.approx(0.3)
    playback.rest(20.0)  # everything played long ago: waiting for text is no underrun
    playback.chunk(20.5, 1.0)
    playback.chunk(20.6, 1.0)
    assert playback.dry_seconds == pytest.approx(0.3)
    playback.rest(20.7)  # still playing: the clock goes on
    playback.chunk(23.0, 1.0)  # 2 s of audio from 20.5: dry from 22.5 to 23.0
    assert playback.dry_seconds == pytest.approx(0.8)


def test_histogram_quantile_like_prometheus() -> None:
    buckets = [(0.1, 0.0), (0.2, 50.0), (0.5, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.2)
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.2 + 0.3 * 0.9)
    assert math.isnan(histogram_quantile(0.5, [(math.inf, 0.0)]))
    assert histogram_quantile(0.99, [(0.1, 0.0), (math.inf, 5.0)]) == 0.1


# -------------------------------------------------------------------------- /metrics over HTTP


async def _get(url: str, **headers: str) -> tuple[int, str, str]:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(url, headers=headers) as response:
            return response.status, response.headers.get("Content-Type", ""), await response.text()


async def test_metrics_on_the_studio_port(tmp_path: Path) -> None:
    async with studio_server(tmp_path) as running:
        await speak(running.server, "Studio metrics.")
        await counted(running.server, "ok")
        status, content_type, body = await _get(running.url + "metrics")
        assert status == 200 and content_type.startswith("text/plain")
        assert f"{NS}first_audio_seconds_bucket" in body
        status, _, text = await _get(running.url + "api/status")
        assert status == 200 and '"requests": 1' in text.replace('"requests":1', '"requests": 1')


async def test_metrics_token_and_loopback_rules(tmp_path: Path) -> None:
    async with studio_server(tmp_path, token="studio-secret") as running:
        assert (await _get(running.url + "metrics"))[0] == 401
        assert (await _get(running.url + "metrics", Authorization="Bearer wrong-token"))[0] == 401
        assert (await _get(running.url + "metrics", Authorization="Bearer studio-secret"))[0] == 200
        service = running.server.service
        open_listener = MetricsListener(service, MetricsSettings(port=0, host="0.0.0.0"))
        await open_listener.start()
        try:  # off loopback without a token: refused
            status, _, body = await _get(f"http://127.0.0.1:{open_listener.port}/metrics")
            assert status == 403 and "token" in body
        finally:
            await open_listener.close()
        listener = MetricsListener(service, MetricsSettings(port=0, token="scrape-only-token"))
        await listener.start()
        try:
            url = f"http://127.0.0.1:{listener.port}/metrics"
            assert (await _get(url, Authorization="Bearer studio-secret"))[0] == 401
            assert (await _get(url, Authorization="Bearer scrape-only-token"))[0] == 200
            assert (await _get(url, Host="evil.example", Authorization="Bearer scrape-only-token"))[0] == 421
        finally:
            await listener.close()


async def test_metrics_off_answers_with_the_reason(tmp_path: Path) -> None:
    path = write_config(tmp_path / "cfg", metrics={"enabled": False})
    config = load(path)
    async with running_server(config) as server:
        assert not server.service.metrics.enabled
        listener = MetricsListener(server.service, dataclasses.replace(config.metrics, port=0))
        await listener.start()
        try:
            status, _, body = await _get(f"http://127.0.0.1:{listener.port}/metrics")
        finally:
            await listener.close()
    assert status == 503 and "metrics.enabled: false" in body


async def test_metrics_port_listener_from_config(tmp_path: Path) -> None:
    """`metrics.port` opens a listener of its own next to the Wyoming port (what `serve` does)."""
    from wyoming_cosyvoice.server import start_metrics_listener

    config = load(write_config(tmp_path / "cfg", metrics={"port": 0}))
    async with running_server(config) as server:
        listener = await start_metrics_listener(config, server.service)
        try:
            status, _, body = await _get(f"http://127.0.0.1:{listener.port}/metrics")
        finally:
            await listener.close()
    assert status == 200 and f"{NS}in_flight 0.0" in body


async def test_the_metrics_port_has_the_web_ports_connection_cap(tmp_path: Path) -> None:
    """`metrics.port` sheds connections like the web port: over `web.max_connections`, 503 at once; an idle one is
    closed after `web.header_timeout_s` (before, it accepted and held any number)."""
    import asyncio

    from wyoming_cosyvoice.config import WebSettings

    web = WebSettings(max_connections=3, header_timeout_s=1.0)
    async with studio_server(tmp_path) as running:
        listener = MetricsListener(running.server.service, MetricsSettings(port=0), web_settings=web)
        await listener.start()
        opened: list[Any] = []
        try:
            for _ in range(5):
                opened.append(await asyncio.open_connection("127.0.0.1", listener.port))
            answers = [await asyncio.wait_for(reader.read(), 10.0) for reader, _ in opened]
        finally:
            for _, writer in opened:
                writer.close()
            await listener.close()
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    assert len(refused) == 2, answers
    assert all(a == b"" for a in answers if a not in refused), "the idle ones are closed with nothing sent"
