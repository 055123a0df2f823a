"""Slow and vanishing clients, engine faults, overload and the connection bound, against a live server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import socket
import statistics
import time
from pathlib import Path

from wyoming.event import Event, async_write_event
from wyoming.info import Describe, Info
from wyoming.ping import Ping
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

from wyoming_cosyvoice.config import Config
from wyoming_cosyvoice.logs import LogThrottle
from wyoming_cosyvoice.wire import encode_event

from .helpers import (
    TIMEOUT,
    assert_speech,
    collect,
    connect,
    fault_config,
    fault_plugins,
    raw_connection,
    read,
    read_raw,
    read_until_closed,
    running_server,
)


async def wait_for(condition, timeout: float = TIMEOUT) -> None:  # type: ignore[no-untyped-def]
    """Poll `condition()` until true (fails on timeout)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_disconnect_mid_stream_cancels_within_one_chunk(tmp_path: Path) -> None:
    config = fault_config(tmp_path, engine={"chunk_ms": 100})
    async with running_server(config, fault_plugins()) as server:
        engine = server.service.engine
        async with connect(server) as client:
            await client.write_event(SynthesizeStart().event())
            await client.write_event(SynthesizeChunk(text="word " * 200 + ". And more").event())
            for _ in range(4):  # audio-start, then audio is flowing
                assert (await read(client)) is not None
            engine.finished.clear()
            produced_at_disconnect = engine.produced
        # The client is gone (socket closed). The engine stops at its next chunk boundary.
        assert await asyncio.to_thread(engine.finished.wait, TIMEOUT)
        assert engine.outcomes[-1] == "cancelled"
        extra = engine.produced - produced_at_disconnect
        assert extra <= 1, f"engine made {extra} chunks after the client left"
        await wait_for(lambda: server.service.concurrency_limit.active == 0)
        # The engine is free for the next client.
        async with connect(server) as client:
            await client.write_event(Synthesize(text="one two").event())
            reply = await collect(client)
            assert not reply.errors and len(reply.audio) == 2 * 2 * 640


async def test_client_that_stops_reading_is_bounded_then_dropped(tmp_path: Path) -> None:
    config = fault_config(tmp_path, limits={"write_timeout_s": 1.0}, engine={"chunk_ms": 1, "chunk_bytes": 32000})
    async with running_server(config, fault_plugins()) as server:
        engine = server.service.engine
        # A real TCP peer with a tiny receive window that never reads.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        total_words = 1500  # 3000 chunks of 32 kB = 96 MB if nothing pushed back
        await async_write_event(Synthesize(text="word " * total_words).event(), writer)
        await wait_for(lambda: engine.produced > 0)
        handler = next(iter(server._connections.values()))
        peak = sndbuf = 0
        server_sock = handler.writer.get_extra_info("socket")
        started = time.monotonic()
        while engine.outcomes == [] and time.monotonic() - started < TIMEOUT:
            peak = max(peak, handler.writer.transport.get_write_buffer_size())
            if server_sock.fileno() >= 0:
                sndbuf = max(sndbuf, server_sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
            await asyncio.sleep(0.01)
        # The stalled client was dropped after the write timeout and its synthesis cancelled.
        assert engine.outcomes == ["cancelled"]
        assert time.monotonic() - started < 5.0
        # What left the engine is bounded by the socket buffers (kernel) plus the transport's high-water mark and
        # the engine's own bound on audio made ahead, not by the length of the text (3000 chunks).
        bound = sndbuf + 2 * 4096 + 64 * 1024 + engine.max_ahead_bytes() + 2 * 32000
        print(
            f"stalled client: engine made {engine.produced} chunks ({engine.produced * 32000} B), "
            f"server SO_SNDBUF {sndbuf} B, transport buffer peak {peak} B"
        )
        assert engine.produced * 32000 <= bound, f"engine ran ahead: {engine.produced} chunks"
        assert peak <= 64 * 1024 + 2 * 32000 + 1024, f"server buffered {peak} bytes for one client"
        await wait_for(lambda: not server._connections)
        writer.close()
        # Everyone else is fine.
        async with connect(server) as client:
            await client.write_event(Synthesize(text="still fine").event())
            assert not (await collect(client)).errors


async def test_slowloris_is_closed_by_idle_timeout(tmp_path: Path) -> None:
    config = fault_config(tmp_path, limits={"idle_timeout_s": 1.0})
    async with running_server(config, fault_plugins()) as server, raw_connection(server) as (reader, writer):
        started = time.monotonic()
        data = b'{"type": "describe", "padding": "' + b"x" * 100
        closed_after = None
        for byte in data:  # one byte every 0.2 s, never completing the header
            writer.write(bytes([byte]))
            try:
                await writer.drain()
            except ConnectionError:
                break
            if reader.at_eof() or writer.is_closing():
                break
            await asyncio.sleep(0.2)
            if reader._buffer:  # type: ignore[attr-defined]  # the server answered (then closes)
                break
        events = await read_until_closed(reader, timeout=5.0)
        closed_after = time.monotonic() - started
        assert [e.data.get("code") for e in events] == ["ClientTimeout"]
        assert 0.9 <= closed_after < 4.0, closed_after


async def test_idle_timeout_spares_a_client_waiting_for_its_audio(tmp_path: Path) -> None:
    config = fault_config(tmp_path, limits={"idle_timeout_s": 0.3}, engine={"slow_s": 1.0})
    async with running_server(config, fault_plugins()) as server, connect(server) as client:
        await client.write_event(Synthesize(text="SLOW start then words").event())
        reply = await collect(client)
        assert not reply.errors and len(reply.audio) == 4 * 2 * 640


async def test_engine_exception_is_reported_and_engine_recovers(tmp_path: Path) -> None:
    async with running_server(fault_config(tmp_path), fault_plugins()) as server:
        async with connect(server) as client:
            await client.write_event(Synthesize(text="RAISE please now").event())
            reply = await collect(client)
            assert [e.code for e in reply.errors] == ["EngineError"]
            assert "simulated engine bug" in reply.errors[0].text
        async with connect(server) as client:
            await client.write_event(Synthesize(text="next request").event())
            reply = await collect(client)
            assert not reply.errors and len(reply.audio) == 2 * 2 * 640


async def test_hung_engine_times_out_and_worker_is_replaced(tmp_path: Path) -> None:
    config = fault_config(tmp_path, limits={"engine_timeout_s": 1.0})
    async with running_server(config, fault_plugins()) as server:
        engine = server.service.engine
        try:
            async with connect(server) as waiting, connect(server) as client:
                started = time.monotonic()
                await client.write_event(Synthesize(text="HANG forever").event())
                await asyncio.sleep(0.2)
                # A second request queued behind the hung one is served by the replacement worker.
                await waiting.write_event(Synthesize(text="queued behind").event())
                reply = await collect(client)
                assert [e.code for e in reply.errors] == ["EngineTimeout"]
                assert 1.9 < time.monotonic() - started < 6.0  # tried once more (a hung call may pass), hung again
                queued = await collect(waiting)
                assert not queued.errors and len(queued.audio) == 2 * 2 * 640
            assert engine.restarts == 2
            assert len(engine.worker_threads) == 2  # the queued request ran on the first replacement, then the retry
            async with connect(server) as client:
                await client.write_event(Synthesize(text="works again").event())
                assert not (await collect(client)).errors
        finally:
            engine.release.set()  # let the abandoned thread end


async def test_out_of_memory_is_reported_and_memory_released(tmp_path: Path) -> None:
    async with running_server(fault_config(tmp_path), fault_plugins()) as server:
        engine = server.service.engine
        async with connect(server) as client:
            await client.write_event(Synthesize(text="OOM now").event())
            reply = await collect(client)
            assert [e.code for e in reply.errors] == ["EngineOutOfMemory"]
            assert "CUDA out of memory" in reply.errors[0].text
        assert engine.memory_released == 2  # tried once more after freeing the cache (no fallback engine here)
        async with connect(server) as client:
            await client.write_event(Synthesize(text="after the fault").event())
            reply = await collect(client)
            assert not reply.errors and len(reply.audio) == 3 * 2 * 640


async def test_overload_refuses_clearly_and_describe_stays_fast(config: Config, tmp_path: Path) -> None:
    """More requests than the bound are refused clearly; describe latency measured while the engine is busy."""
    # Real espeak engine: the bound and the refusals.
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, max_concurrent=2))
    long_text = "This sentence keeps the engine busy for a while, one word after another. " * 12
    async with running_server(config) as server:

        async def request() -> tuple[list[str], float]:
            async with connect(server) as client:
                await client.write_event(Synthesize(text=long_text).event())
                reply = await collect(client, timeout=60)
                return [e.code for e in reply.errors], reply.seconds

        # Two long replies are in flight (audio-start read, the rest not yet) while three more arrive.
        async with connect(server) as one, connect(server) as two:
            for client in (one, two):
                await client.write_event(Synthesize(text=long_text).event())
                assert (await read(client)).type == "audio-start"
            results = await asyncio.gather(*(request() for _ in range(3)))
            assert all(codes == ["ServerBusy"] for codes, _ in results), results
            served = [await collect(one, timeout=60), await collect(two, timeout=60)]
        assert all(not r.errors and r.stops == 1 and len(r.audio) / 2 / 22050 > 20 for r in served)
        # Nothing is stuck afterwards.
        async with connect(server) as client:
            await client.write_event(Synthesize(text="All good again.").event())
            reply = await collect(client)
            assert not reply.errors
            assert_speech(reply.samples(), reply.rate, words=3)

    # An engine paced like a GPU model (20 ms per chunk): describe while it works through queued requests.
    paced = fault_config(tmp_path / "paced", max_concurrent=4)
    async with running_server(paced, fault_plugins()) as server:
        engine = server.service.engine

        async def busy_request() -> None:
            async with connect(server) as client:
                await client.write_event(Synthesize(text="word " * 30).event())
                assert not (await collect(client, timeout=60)).errors

        tasks = [asyncio.create_task(busy_request()) for _ in range(4)]  # ~4 x 1.2 s of engine work
        await wait_for(lambda: engine.busy)
        latencies = []
        async with connect(server) as probe:
            while engine.busy and len(latencies) < 50:
                started = time.perf_counter()
                await probe.write_event(Describe().event())
                assert Info.is_type((await read(probe)).type)
                latencies.append(time.perf_counter() - started)
                await asyncio.sleep(0.02)
        await asyncio.gather(*tasks)
        assert len(latencies) >= 10
        median, worst = statistics.median(latencies), max(latencies)
        print(f"describe while busy: n={len(latencies)} median={median * 1000:.1f} ms max={worst * 1000:.1f} ms")
        assert median < 0.1 and worst < 0.5, (median, worst)


async def test_connection_bound(tmp_path: Path) -> None:
    config = fault_config(tmp_path, limits={"max_connections": 2})
    async with running_server(config, fault_plugins()) as server:
        async with connect(server) as one, connect(server) as two:
            await wait_for(lambda: server.guard.open == 2)
            async with raw_connection(server) as (reader, _writer):
                events = await read_until_closed(reader)
                assert [e.data.get("code") for e in events] == ["ServerBusy"]
                assert "max_connections" in events[0].data["text"]
            for client in (one, two):
                await client.write_event(Describe().event())
                assert Info.is_type((await read(client)).type)
        await wait_for(lambda: server.guard.open == 0)
        async with raw_connection(server) as (reader, writer):
            await async_write_event(Describe().event(), writer)
            assert (await read_raw(reader)).type == "info"


async def test_data_after_an_error_logs_no_asyncio_traceback(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """A client that keeps sending after its stream failed must not make asyncio log "feed_data after feed_eof"."""
    loop = asyncio.get_running_loop()
    reported: list[dict] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        config = fault_config(tmp_path, unknown_voice="error")
        async with running_server(config, fault_plugins()) as server:

            async def keep_sending() -> list[str]:
                async with raw_connection(server) as (reader, writer):
                    await async_write_event(SynthesizeStart(voice=SynthesizeVoice(name="nobody")).event(), writer)
                    with contextlib.suppress(ConnectionError):
                        # About 200 ms of chunks: the server fails the stream (unknown voice) and closes meanwhile.
                        for _ in range(40):
                            await async_write_event(SynthesizeChunk(text="Hello there. ").event(), writer)
                            await asyncio.sleep(0.005)
                    return [e.data.get("code") or e.type for e in await read_until_closed(reader)]

            answers = await asyncio.gather(*(keep_sending() for _ in range(20)))
            await wait_for(lambda: not server._connections)
    finally:
        loop.set_exception_handler(previous)
    # What the client still reads depends on TCP: closing a socket with unread input sends a reset, which may
    # discard the answer in flight. Whatever arrived is the error and the stream's end, nothing else.
    assert all(a == ["VoiceNotFound", "synthesize-stopped"][: len(a)] for a in answers), answers
    assert not reported, [c.get("message") for c in reported]
    assert not [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]


async def test_engine_wedged_after_client_stopped_reading_is_recovered_and_logged(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """A client that stops reading is dropped by the write timeout while the engine wedges: the worker must still be
    replaced (the dropped request's task is cancelled meanwhile), and the request still gets its log line."""
    caplog.set_level(logging.INFO, logger="wyoming_cosyvoice")
    # 384 kHz: the engine may run 23 MB ahead of the client, more than the whole reply (16 MB), so it makes all of
    # it and wedges, while the client's socket (a few MB of kernel buffers) stalls the writer.
    config = fault_config(
        tmp_path,
        limits={"engine_timeout_s": 1.0, "write_timeout_s": 1.0},
        engine={"chunk_ms": 0, "chunk_bytes": 64000, "sample_rate": 384000},
    )
    async with running_server(config, fault_plugins()) as server:
        engine = server.service.engine
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
            _reader, writer = await asyncio.open_connection(sock=sock)
            await async_write_event(Synthesize(text="WEDGE " + "word " * 125).event(), writer)
            await wait_for(lambda: engine.restarts == 1)
            await wait_for(lambda: re.search(r"request \d+: voice=tars chars=631 .*end=cancelled", caplog.text))
            assert "client accepted no data for 1 s" in caplog.text
            writer.close()
            async with connect(server) as client:  # the replacement worker serves the next request
                await client.write_event(Synthesize(text="next request").event())
                reply = await collect(client)
                assert not reply.errors and len(reply.audio) == 2 * 2 * 64000
        finally:
            engine.release.set()


async def test_engine_timeout_reaches_the_client_after_one_timeout(tmp_path: Path) -> None:
    """EngineTimeout is sent when `engine_timeout_s` has passed, not after a second wait for the hung worker (the
    call is tried once more, as a hung call may pass: two timeouts, not four)."""
    config = fault_config(tmp_path, limits={"engine_timeout_s": 1.0})
    async with running_server(config, fault_plugins()) as server:
        engine = server.service.engine
        try:
            async with connect(server) as client:
                await client.write_event(Synthesize(text="HANG forever").event())
                started = time.monotonic()
                reply = await collect(client)
                elapsed = time.monotonic() - started
            assert [e.code for e in reply.errors] == ["EngineTimeout"]
            assert engine.restarts == 2
            # Two waits per call would take at least 4.0 s; one per call takes 2.0 s plus scheduling.
            assert 1.9 < elapsed < 3.5, elapsed
        finally:
            engine.release.set()


async def test_floods_of_empty_requests_hit_the_bounds(tmp_path: Path) -> None:
    """Empty `synthesize` and `synthesize-chunk` events count toward max_stream_chars: a flood of them, sent while the
    engine is busy, is refused with LimitExceeded instead of growing the connection's job queue."""
    config = fault_config(tmp_path, limits={"max_stream_chars": 2000, "idle_timeout_s": 2.0}, engine={"slow_s": 1.0})
    async with running_server(config, fault_plugins()) as server:
        empty_requests = encode_event(Synthesize(text="SLOW start").event()) + b"".join(
            encode_event(Synthesize(text="").event()) for _ in range(5000)
        )
        empty_chunks = (
            encode_event(SynthesizeStart().event())
            + encode_event(SynthesizeChunk(text="SLOW start. ").event())
            + b"".join(encode_event(SynthesizeChunk(text="").event()) for _ in range(5000))
        )
        for flood in (empty_requests, empty_chunks):
            async with raw_connection(server) as (reader, writer):
                writer.write(flood)  # all at once, while the engine works on the first request
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                events = await read_until_closed(reader)
                errors = [e for e in events if e.type == "error"]
                assert [e.data.get("code") for e in errors] == ["LimitExceeded"], errors
                assert "limits.max_stream_chars" in errors[0].data["text"]
                assert sum(e.type == "audio-stop" for e in events) < 200


async def test_a_connection_that_only_pings_is_idle(tmp_path: Path) -> None:
    """Pings keep no slot forever: they do not reset the idle timer (a synthesis in progress still does)."""
    config = fault_config(tmp_path, limits={"idle_timeout_s": 1.0})
    async with running_server(config, fault_plugins()) as server, raw_connection(server) as (reader, writer):

        async def keep_pinging() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(100):  # 20 s of pings, far beyond the idle timeout
                    await async_write_event(Ping(text="still here").event(), writer)
                    await asyncio.sleep(0.2)

        pinging = asyncio.create_task(keep_pinging())
        try:
            events = await read_until_closed(reader, timeout=30)
            assert not pinging.done(), "the server waited until the pings stopped"
        finally:
            pinging.cancel()
        assert [e.type for e in events][-1:] == ["error"], [e.type for e in events]
        assert events[-1].data["code"] == "ClientTimeout" and "pings do not count" in events[-1].data["text"]
        assert {e.type for e in events[:-1]} == {"pong"}
        await wait_for(lambda: not server._connections)


async def test_nothing_but_the_stream_end_follows_an_error(tmp_path: Path) -> None:
    """After its `error` the server sends no `info`, `pong` or second `error`; only a failed stream's end."""
    unknown = SynthesizeVoice(name="nobody")
    cases = {
        "request, describe": [Synthesize(text="hi", voice=unknown).event(), Describe().event()],
        "request, bad event": [Synthesize(text="hi", voice=unknown).event(), Event("bogus")],
        "stream, describes": [
            SynthesizeStart(voice=unknown).event(),
            SynthesizeChunk(text="One. Two. ").event(),
            *[Describe().event()] * 3,
        ],
        "stream, bad line": [SynthesizeStart(voice=unknown).event(), SynthesizeChunk(text="One. ").event()],
        "stream stopped, ping": [
            SynthesizeStart(voice=unknown).event(),
            SynthesizeChunk(text="One").event(),
            SynthesizeStop().event(),
            Describe().event(),
            Ping().event(),
        ],
    }
    async with running_server(fault_config(tmp_path, unknown_voice="error"), fault_plugins()) as server:
        for name, events in cases.items():
            for _ in range(10):
                async with raw_connection(server) as (reader, writer):
                    writer.write(b"".join(encode_event(e) for e in events) + (b"garbage\n" if "line" in name else b""))
                    writer.write_eof()
                    answer = [e.data.get("code") or e.type for e in await read_until_closed(reader)]
                expected = ["VoiceNotFound", "synthesize-stopped"] if "stream" in name else ["VoiceNotFound"]
                assert answer == expected, (name, answer)


async def test_repeated_warnings_are_rate_limited(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """A flood of refused connections logs a bounded number of lines, not one per connection."""
    caplog.set_level(logging.WARNING, logger="wyoming_cosyvoice")
    config = fault_config(tmp_path, limits={"max_connections": 1})
    async with running_server(config, fault_plugins()) as server, connect(server):
        await wait_for(lambda: server.guard.open == 1)
        for _ in range(40):
            async with raw_connection(server) as (reader, _writer):
                assert [e.data.get("code") for e in await read_until_closed(reader)] == ["ServerBusy"]
    refused = [r for r in caplog.records if "refused: too many connections" in r.getMessage()]
    assert len(refused) == 10, len(refused)


def test_log_throttle_counts_what_it_suppressed(caplog) -> None:  # type: ignore[no-untyped-def]
    now = [0.0]
    throttle = LogThrottle(burst=2, interval=60.0, clock=lambda: now[0])
    logger = logging.getLogger("wyoming_cosyvoice.test")
    with caplog.at_level(logging.WARNING, logger="wyoming_cosyvoice.test"):
        shown = [throttle.warning(logger, "busy", "refused %d", i) for i in range(5)]
        assert throttle.warning(logger, "other", "another kind")  # keys are counted apart
        now[0] = 61.0
        assert throttle.warning(logger, "busy", "refused %d", 5)
    assert shown == [True, True, False, False, False]
    assert [r.getMessage() for r in caplog.records] == [
        "refused 0",
        "refused 1",
        "another kind",
        "refused 5 (and 3 similar lines suppressed before this one)",
    ]


async def test_unknown_voice_is_one_clear_log_line(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """Home Assistant ignores `error` events: an unknown voice is spoken by the default voice, and the server's log
    names the client, the voice asked for, the choices and the voice used, in one line."""
    caplog.set_level(logging.INFO, logger="wyoming_cosyvoice")
    async with running_server(fault_config(tmp_path), fault_plugins()) as server, connect(server) as client:
        await client.write_event(Synthesize(text="Hello", voice=SynthesizeVoice(name="alice")).event())
        reply = await collect(client)
        port = client._writer.get_extra_info("sockname")[1]  # type: ignore[union-attr]
        assert not reply.errors and len(reply.audio) == 2 * 640
        assert server.service.degraded.counts()["default_voice"] == 1
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines == [
        f"client 127.0.0.1:{port} asked for voice 'alice', which is not there (unknown voice 'alice' (available: "
        "tars, anna)); speaking with voice tars instead (server.unknown_voice: default)"
    ]
