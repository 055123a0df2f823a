"""Malformed traffic against a live server: each case gets an `error` event (or a clean close), is logged once,
and never disturbs another client that is being served at the same time."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize

from wyoming_cosyvoice.config import Limits
from wyoming_cosyvoice.errors import LimitExceeded, ProtocolError
from wyoming_cosyvoice.logs import BURST
from wyoming_cosyvoice.wire import read_event

from .helpers import (
    collect,
    connect,
    fault_config,
    fault_plugins,
    raw_connection,
    read,
    read_until_closed,
    running_server,
)

LIMITS = {
    "max_header_bytes": 1024,
    "max_data_bytes": 4096,
    "max_payload_bytes": 4096,
    "max_text_chars": 500,
    "max_stream_chars": 2000,
    "idle_timeout_s": 2.0,
}


def header(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def raw(event_type: str, body: bytes) -> bytes:
    return header({"type": event_type, "data_length": len(body)}) + body


def event(event_type: str, data: object, extra: bytes = b"", **fields: object) -> bytes:
    body = json.dumps(data, ensure_ascii=False).encode()
    return header({"type": event_type, "data_length": len(body), **fields}) + body + extra


STREAM_START = event("synthesize-start", {})

# (name, bytes sent, expected error code); after sending, the client half-closes its side.
CASES = [
    ("header not JSON", b"this is not json\n", "ProtocolError"),
    ("header a JSON list", b"[1, 2, 3]\n", "ProtocolError"),
    ("header a JSON string", b'"describe"\n', "ProtocolError"),
    ("header without type", header({"data": {}}), "ProtocolError"),
    ("type not a string", header({"type": 7}), "ProtocolError"),
    ("data not an object", header({"type": "synthesize", "data": "hello"}), "ProtocolError"),
    ("gigantic header", b'{"type": "describe", "x": "' + b"a" * 5000 + b'"}\n', "LimitExceeded"),
    ("gigantic header, no newline", b"{" * 4000, "LimitExceeded"),
    ("deeply nested header", b"[" * 900 + b"]" * 900 + b"\n", "LimitExceeded"),
    (
        "nesting inside data",
        header({"type": "synthesize", "data_length": 2000}) + b"[" * 1000 + b"]" * 1000,
        "ProtocolError",
    ),
    ("data_length negative", header({"type": "synthesize", "data_length": -5}), "ProtocolError"),
    ("data_length a string", header({"type": "synthesize", "data_length": "12"}), "ProtocolError"),
    ("data_length a float", header({"type": "synthesize", "data_length": 1.5}), "ProtocolError"),
    ("data_length true", header({"type": "synthesize", "data_length": True}), "ProtocolError"),
    ("data_length huge", header({"type": "synthesize", "data_length": 10**30}), "LimitExceeded"),
    (
        "data_length longer than what follows",
        header({"type": "synthesize", "data_length": 100}) + b'{"text"',
        "ProtocolError",
    ),
    ("payload_length negative", header({"type": "describe", "payload_length": -1}), "ProtocolError"),
    ("payload_length huge", header({"type": "describe", "payload_length": 2**40}), "LimitExceeded"),
    ("payload shorter than announced", header({"type": "ping", "payload_length": 50}) + b"abc", "ProtocolError"),
    ("invalid UTF-8 in header", b'{"type": "describe\xff\xfe"}\n', "ProtocolError"),
    ("invalid UTF-8 in data", raw("synthesize", b'{"text":"\xc3("}'), "ProtocolError"),
    ("data section not an object", header({"type": "synthesize", "data_length": 2}) + b"[]", "ProtocolError"),
    ("unknown event type", header({"type": "make-coffee"}), "BadRequest"),
    ("synthesize without text", event("synthesize", {"voice": {"name": "tars"}}), "BadRequest"),
    ("text not a string", event("synthesize", {"text": ["a", "b"]}), "BadRequest"),
    ("voice not an object", event("synthesize", {"text": "hi", "voice": "tars"}), "BadRequest"),
    ("voice name a number", event("synthesize", {"text": "hi", "voice": {"name": 3}}), "BadRequest"),
    ("language a list", event("synthesize", {"text": "hi", "voice": {"language": ["en"]}}), "BadRequest"),
    ("lone surrogate in text", raw("synthesize", b'{"text": "\\ud800"}'), "BadRequest"),
    ("text too long", event("synthesize", {"text": "word " * 200}), "LimitExceeded"),
    ("stream chunk too long", STREAM_START + event("synthesize-chunk", {"text": "x" * 600}), "LimitExceeded"),
    ("stream too long", STREAM_START + event("synthesize-chunk", {"text": "word " * 90}) * 6, "LimitExceeded"),
    ("queued text too long", event("synthesize", {"text": "word " * 90}) * 6, "LimitExceeded"),
    ("chunk without start", event("synthesize-chunk", {"text": "hi"}), "BadRequest"),
    ("stop without start", event("synthesize-stop", {}), "BadRequest"),
    ("double start", STREAM_START * 2, "BadRequest"),
]


async def test_malformed_traffic_gets_error_and_spares_others(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = fault_config(tmp_path, limits=LIMITS)
    caplog.set_level(logging.WARNING)
    async with running_server(config, fault_plugins()) as server, connect(server) as bystander:
        # A well-behaved client is mid-synthesis the whole time.
        await bystander.write_event(Synthesize(text="word " * 99).event())
        per_code: dict[str, int] = {}
        for name, data, code in CASES:
            per_code[code] = per_code.get(code, 0) + 1
            caplog.clear()
            async with raw_connection(server) as (reader, writer):
                writer.write(data)
                await writer.drain()
                if writer.can_write_eof():
                    writer.write_eof()
                events = await read_until_closed(reader)
            errors = [e for e in events if e.type == "error"]
            assert [e.data.get("code") for e in errors] == [code], f"{name}: {events}"
            assert errors[0].data.get("text"), name
            if name not in ("queued text too long", "stream too long"):  # these started speaking first
                assert not [e for e in events if e.type.startswith("audio")], name
            logged = [r for r in caplog.records if code in r.getMessage() and r.levelno >= logging.WARNING]
            # Once each; beyond BURST lines of one code a minute the rest are counted, not logged (logs.LogThrottle).
            expected = (1,) if per_code[code] <= BURST else (0, 1)
            assert len(logged) in expected, f"{name}: logged {len(logged)} times: {[r.getMessage() for r in logged]}"
        reply = await collect(bystander)
        assert not reply.errors and reply.stops == 1
        assert len(reply.audio) == 99 * 2 * 640, "the bystander got all of its audio"
        await bystander.write_event(Describe().event())
        assert Info.is_type((await read(bystander)).type)


async def test_truncated_event_without_eof_is_closed_by_idle_timeout(tmp_path: Path) -> None:
    config = fault_config(tmp_path, limits={**LIMITS, "idle_timeout_s": 0.5})
    async with running_server(config, fault_plugins()) as server, raw_connection(server) as (reader, writer):
        writer.write(header({"type": "synthesize", "data_length": 100}) + b'{"text": "hel')
        await writer.drain()
        events = await read_until_closed(reader, timeout=5.0)
        assert [e.data.get("code") for e in events] == ["ClientTimeout"]


async def test_blank_lines_between_events_are_tolerated(tmp_path: Path) -> None:
    config = fault_config(tmp_path, limits=LIMITS)
    async with running_server(config, fault_plugins()) as server, raw_connection(server) as (reader, writer):
        writer.write(b"\n\r\n" + header({"type": "describe"}) + b"\n")
        events = []
        writer.write_eof()
        events = await read_until_closed(reader)
        assert [e.type for e in events] == ["info"]


async def test_reader_accepts_inline_data_and_merges_data_section() -> None:
    reader = asyncio.StreamReader(limit=2048)
    body = b'{"text": "hi"}'
    reader.feed_data(
        header(
            {"type": "synthesize", "data": {"voice": {"name": "tars"}}, "data_length": len(body), "version": "1.5.3"}
        )
        + body
    )
    reader.feed_data(header({"type": "describe", "payload_length": 3}) + b"xyz")
    reader.feed_eof()
    first = await read_event(reader, Limits())
    assert first is not None and first.type == "synthesize"
    assert first.data == {"voice": {"name": "tars"}, "text": "hi"}
    second = await read_event(reader, Limits())
    assert second is not None and second.payload == b"xyz"
    assert await read_event(reader, Limits()) is None


@pytest.mark.parametrize(
    "data, error",
    [(b'{"type": 1}\n', ProtocolError), (header({"type": "x", "data_length": 99999999}), LimitExceeded)],
)
async def test_reader_errors_are_project_errors(data: bytes, error: type) -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    with pytest.raises(error):
        await read_event(reader, Limits())


def test_encode_event_matches_the_wyoming_library() -> None:
    """Our one-write framing is byte for byte what the wyoming library writes."""
    import io

    from wyoming.audio import AudioChunk, AudioStop
    from wyoming.event import write_event
    from wyoming.info import Describe
    from wyoming.tts import Synthesize

    from wyoming_cosyvoice.wire import encode_event

    for event in (
        AudioChunk(rate=24000, width=2, channels=1, audio=b"\x01\x02" * 100).event(),
        AudioStop().event(),
        Describe().event(),
        Synthesize(text="Grüße, 你好").event(),
    ):
        expected = io.BytesIO()
        write_event(event, expected)
        assert encode_event(event) == expected.getvalue()
