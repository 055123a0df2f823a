"""The server end to end: a real AsyncServer on port 0 and the `wyoming` library's client."""

from __future__ import annotations

import asyncio
import dataclasses
import socket

from wyoming.audio import AudioStart
from wyoming.event import Event
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

from wyoming_cosyvoice.config import Config
from wyoming_cosyvoice.wire import encode_event, read_event

from .helpers import TIMEOUT, assert_speech, collect, connect, read, refusing_unknown_voices, running_server, similar

SENTENCE_20 = (
    "Hello there, this is a test of the embedded speech engine, speaking twenty words for a quick latency "
    "measurement today."
)


async def test_describe_lists_voice_profiles(config: Config) -> None:
    async with running_server(config) as server, connect(server) as client:
        await client.write_event(Describe().event())
        event = await read(client)
        assert event is not None and Info.is_type(event.type)
        info = Info.from_event(event)
        assert len(info.tts) == 1
        program = info.tts[0]
        assert program.name == "cosyvoice" and program.installed
        assert program.supports_synthesize_streaming is True
        assert "espeak" in (program.description or "")
        voices = {v.name: v for v in program.voices}
        assert list(voices) == ["tars", "anna"]
        assert voices["tars"].description == "TARS" and voices["tars"].languages == ["en-US"]
        assert voices["anna"].languages == ["de-DE"] and voices["anna"].installed


async def test_describe_reports_streaming_off(config: Config) -> None:
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, streaming=False))
    async with running_server(config) as server, connect(server) as client:
        await client.write_event(Describe().event())
        info = Info.from_event(await read(client))
        assert info.tts[0].supports_synthesize_streaming is False
        # Streaming events are still accepted.
        await client.write_event(SynthesizeStart().event())
        await client.write_event(SynthesizeChunk(text="Still streaming.").event())
        await client.write_event(SynthesizeStop().event())
        reply = await collect(client, until="synthesize-stopped")
        assert reply.stopped and reply.chunks > 0 and not reply.errors


async def test_synthesize_returns_speech(config: Config) -> None:
    async with running_server(config) as server, connect(server) as client:
        await client.write_event(Synthesize(text=SENTENCE_20).event())
        reply = await collect(client)
        assert not reply.errors
        assert len(reply.starts) == 1 and reply.stops == 1
        start = reply.starts[0]
        assert (start.rate, start.width, start.channels) == (22050, 2, 1)
        assert reply.chunks > 1
        for event in reply.events:
            if event.type == "audio-chunk":
                assert (event.data["rate"], event.data["width"], event.data["channels"]) == (22050, 2, 1)
        assert_speech(reply.samples(), reply.rate, words=20)


async def test_synthesize_with_named_voice_and_language(config: Config) -> None:
    async with running_server(config) as server:
        replies = {}
        for key, voice in {
            "tars": SynthesizeVoice(name="tars"),
            "anna": SynthesizeVoice(name="anna"),
            "german": SynthesizeVoice(language="de-DE"),
        }.items():
            async with connect(server) as client:
                await client.write_event(Synthesize(text="Guten Tag, wie geht es Ihnen?", voice=voice).event())
                reply = await collect(client)
                assert not reply.errors, reply.errors
                assert_speech(reply.samples(), reply.rate, words=5)
                replies[key] = reply.audio
        # The German voice is a different voice from the English default; language alone picks it.
        assert not similar(replies["anna"], replies["tars"])
        assert similar(replies["german"], replies["anna"])


async def test_streaming_split_mid_word(config: Config) -> None:
    async with running_server(config) as server, connect(server) as client:
        await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="tars")).event())
        for piece in ["Hel", "lo wor", "ld. The sec"]:
            await client.write_event(SynthesizeChunk(text=piece).event())
        # The first sentence is complete: its audio arrives before the stream ends.
        first = await read(client)
        assert first is not None and AudioStart.is_type(first.type)
        chunk = await read(client)
        assert chunk is not None and chunk.type == "audio-chunk"
        for piece in ["ond sent", "ence is he", "re."]:
            await client.write_event(SynthesizeChunk(text=piece).event())
        await client.write_event(Synthesize(text="Hello world. The second sentence is here.").event())
        await client.write_event(SynthesizeStop().event())
        reply = await collect(client, until="synthesize-stopped")
        assert reply.stopped and not reply.errors
        assert reply.starts == [], "one audio-start per stream"
        assert reply.stops == 1
        audio = (chunk.payload or b"") + bytes(reply.audio)
        seconds = len(audio) / 2 / 22050
        assert 1.5 < seconds < 6.0
        # The synthesize sent inside the stream was ignored: the next answer is to describe.
        await client.write_event(Describe().event())
        event = await read(client)
        assert event is not None and Info.is_type(event.type)


async def test_streaming_audio_matches_sentence_synthesis(config: Config) -> None:
    async with running_server(config) as server:
        async with connect(server) as client:
            await client.write_event(SynthesizeStart().event())
            await client.write_event(SynthesizeChunk(text="One sentence here. And ").event())
            await client.write_event(SynthesizeChunk(text="another one.").event())
            await client.write_event(SynthesizeStop().event())
            streamed = await collect(client, until="synthesize-stopped")
        pieces = b""
        for text in ["One sentence here.", "And another one."]:
            async with connect(server) as client:
                await client.write_event(Synthesize(text=text).event())
                pieces += (await collect(client)).audio
        assert similar(streamed.audio, pieces)


async def test_empty_text(config: Config) -> None:
    async with running_server(config) as server:
        async with connect(server) as client:
            await client.write_event(Synthesize(text="").event())
            reply = await collect(client)
            assert len(reply.starts) == 1 and reply.stops == 1 and reply.chunks == 0 and not reply.errors
        async with connect(server) as client:
            await client.write_event(SynthesizeStart().event())
            await client.write_event(SynthesizeChunk(text="   ").event())
            await client.write_event(SynthesizeStop().event())
            reply = await collect(client, until="synthesize-stopped")
            assert reply.stopped and reply.chunks == 0 and not reply.errors
        async with connect(server) as client:
            await client.write_event(SynthesizeStart().event())
            await client.write_event(SynthesizeStop().event())
            reply = await collect(client, until="synthesize-stopped")
            assert reply.stopped and reply.events[-1].type == "synthesize-stopped"


async def test_unknown_voice_gets_error_and_others_unaffected(config: Config) -> None:
    """With `server.unknown_voice: error` (for clients that prefer an error to the default voice)."""
    async with running_server(refusing_unknown_voices(config)) as server, connect(server) as good:
        async with connect(server) as bad:
            await bad.write_event(Synthesize(text="Hi.", voice=SynthesizeVoice(name="nobody")).event())
            reply = await collect(bad)
            assert len(reply.errors) == 1
            assert reply.errors[0].code == "VoiceNotFound"
            assert "nobody" in reply.errors[0].text and "tars" in reply.errors[0].text
            assert await read(bad) is None, "connection ends cleanly after an error"
        await good.write_event(Synthesize(text="Still here.").event())
        reply = await collect(good)
        assert not reply.errors and reply.chunks > 0


async def test_unknown_voice_in_stream_still_ends_stream(config: Config) -> None:
    async with running_server(refusing_unknown_voices(config)) as server, connect(server) as client:
        await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="nobody")).event())
        await client.write_event(SynthesizeChunk(text="Hello there. ").event())
        await client.write_event(SynthesizeStop().event())
        reply = await collect(client, until="synthesize-stopped")
        assert [e.code for e in reply.errors] == ["VoiceNotFound"]
        assert reply.stopped


async def test_unknown_voice_is_spoken_by_the_default_voice(config: Config) -> None:
    """Home Assistant plays nothing on an `error`: by default a voice that is not there (renamed, removed) is spoken
    by the default voice, or the first voice of the asked language; the same speech as asking for that voice."""
    async with running_server(config) as server:
        replies = {}
        for name, voice in (("gone", SynthesizeVoice(name="gone")), ("tars", SynthesizeVoice(name="tars"))):
            async with connect(server) as client:
                await client.write_event(Synthesize(text="Hello there.", voice=voice).event())
                replies[name] = await collect(client)
        async with connect(server) as client:  # a stream, asking for a German voice that is not there
            # (the wyoming library's SynthesizeVoice leaves the language out when a name is given)
            await client.write_event(Event("synthesize-start", {"voice": {"name": "gone", "language": "de-DE"}}))
            await client.write_event(SynthesizeChunk(text="Guten Tag. ").event())
            await client.write_event(SynthesizeStop().event())
            streamed = await collect(client, until="synthesize-stopped")
        async with connect(server) as client:
            await client.write_event(Synthesize(text="Guten Tag.", voice=SynthesizeVoice(name="anna")).event())
            anna = await collect(client)
        assert not replies["gone"].errors and similar(replies["gone"].audio, replies["tars"].audio)
        assert not streamed.errors and streamed.stopped and similar(streamed.audio, anna.audio)
        assert server.service.degraded.counts()["default_voice"] == 2


async def test_two_clients_at_once(config: Config) -> None:
    async with running_server(config) as server:
        async with connect(server) as solo:
            await solo.write_event(Synthesize(text=SENTENCE_20).event())
            expected = (await collect(solo)).audio

        async def one() -> bytes:
            async with connect(server) as client:
                await client.write_event(Synthesize(text=SENTENCE_20).event())
                reply = await collect(client)
                assert not reply.errors
                return reply.audio

        first, second = await asyncio.gather(one(), one())
        assert similar(first, expected) and similar(second, expected)


async def test_bad_request_gets_error_event(config: Config) -> None:
    from wyoming.event import Event

    async with running_server(config) as server:
        async with connect(server) as client:
            await client.write_event(Event(type="synthesize", data={"text": 42}))
            reply = await collect(client)
            assert [e.code for e in reply.errors] == ["BadRequest"]
        async with connect(server) as client:
            await client.write_event(SynthesizeChunk(text="no start").event())
            reply = await collect(client)
            assert [e.code for e in reply.errors] == ["BadRequest"]
        async with connect(server) as client:
            await client.write_event(Describe().event())
            assert Info.is_type((await read(client)).type)


async def test_server_busy_when_bound_reached(config: Config) -> None:
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, max_concurrent=1))
    long_text = " ".join([SENTENCE_20] * 30)
    async with running_server(config) as server, connect(server) as first, connect(server) as second:
        await first.write_event(Synthesize(text=long_text).event())
        assert AudioStart.is_type((await read(first)).type)
        assert (await read(first)).type == "audio-chunk"
        await second.write_event(Synthesize(text="Me too.").event())
        reply = await collect(second)
        assert [e.code for e in reply.errors] == ["ServerBusy"]
        rest = await collect(first)
        assert not rest.errors and rest.stops == 1


async def test_handler_stop_ends_the_conversation_without_feed_eof(config: Config) -> None:
    """`stop()` ends the read loop and closes the connection, but never calls `feed_eof()` on the reader (the wyoming
    base's `stop()` does: a socket that still receives then makes asyncio log "feed_data after feed_eof")."""
    from wyoming_cosyvoice.handler import TtsEventHandler
    from wyoming_cosyvoice.plugins import Plugins
    from wyoming_cosyvoice.server import build_service

    service = await build_service(config, Plugins())
    ours, theirs = socket.socketpair()
    try:
        reader, writer = await asyncio.open_connection(sock=ours)
        client_reader, client_writer = await asyncio.open_connection(sock=theirs)
        handler = TtsEventHandler(reader, writer, service)
        running = asyncio.create_task(handler.run())
        client_writer.write(encode_event(Describe().event()))
        assert (await asyncio.wait_for(read_event(client_reader, service.limits), TIMEOUT)) is not None
        await handler.stop()
        assert not reader.at_eof(), "stop() fed EOF to a socket that may still receive"
        await asyncio.wait_for(running, TIMEOUT)
        assert await asyncio.wait_for(client_reader.read(), TIMEOUT) == b"", "the connection was closed"
        client_writer.close()
    finally:
        await service.close()
