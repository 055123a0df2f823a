"""A streamed reply starts speaking at its first clause (server.first_clause_words), through the real server."""

from __future__ import annotations

import asyncio
import dataclasses

from wyoming.audio import AudioChunk, AudioStart
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop

from wyoming_cosyvoice.config import Config
from wyoming_cosyvoice.server import Server

from .helpers import collect, connect, read, running_server, similar

# 101 characters, the first comma at character 55 (the shape of the benchmark in docs/benchmarks.md).
FIRST = "The heating in the living room was running all the day, so I have turned it down a bit for the night."
CLAUSE, REST = FIRST.split(", ", 1)
TEXT = FIRST + " It cost 1,000 dollars, e.g., more than last year."
PIECE = 4  # characters per synthesize-chunk, as an LLM's reply arrives


async def send_paced(client: object, text: str) -> None:
    """Send `text` as synthesize-chunks of a few characters, with a short pause between them."""
    for at in range(0, len(text), PIECE):
        await client.write_event(SynthesizeChunk(text=text[at : at + PIECE]).event())  # type: ignore[attr-defined]
        await asyncio.sleep(0.005)


async def one_shot(server: Server, texts: list[str]) -> bytes:
    """The audio of each text synthesized on its own (`synthesize`), concatenated."""
    audio = b""
    for text in texts:
        async with connect(server) as client:
            await client.write_event(Synthesize(text=text).event())
            reply = await collect(client)
            assert not reply.errors, reply.errors
            audio += bytes(reply.audio)
    return audio


def with_words(config: Config, words: int) -> Config:
    return dataclasses.replace(config, server=dataclasses.replace(config.server, first_clause_words=words))


async def test_long_first_sentence_is_heard_before_it_ends(config: Config) -> None:
    assert config.server.first_clause_words == 5  # the default
    async with running_server(config) as server:
        async with connect(server) as client:
            await client.write_event(SynthesizeStart().event())
            # Everything but the first sentence's final period: the sentence is not complete yet.
            await send_paced(client, FIRST[:-1])
            start = await read(client)
            assert start is not None and AudioStart.is_type(start.type), start
            first = await read(client)
            assert first is not None and AudioChunk.is_type(first.type), first
            await send_paced(client, TEXT[len(FIRST) - 1 :])
            await client.write_event(SynthesizeStop().event())
            reply = await collect(client, until="synthesize-stopped")
            assert reply.stopped and not reply.errors and reply.stops == 1
            streamed = (first.payload or b"") + bytes(reply.audio)
        # The stream spoke exactly these pieces: the first clause, the rest of its sentence, then whole sentences
        # (the number and the abbreviation in the second sentence were not cut).
        pieces = await one_shot(server, [CLAUSE + ",", REST, "It cost 1,000 dollars, e.g., more than last year."])
        assert similar(streamed, pieces)
        # And it is the same text as the reply cut only at sentence ends: about as long.
        uncut = await one_shot(server, [FIRST, "It cost 1,000 dollars, e.g., more than last year."])
        assert abs(len(streamed) - len(uncut)) < 0.1 * len(uncut), (len(streamed), len(uncut))


async def test_zero_waits_for_the_sentence_end(config: Config) -> None:
    async with running_server(with_words(config, 0)) as server:
        async with connect(server) as client:
            await client.write_event(SynthesizeStart().event())
            await send_paced(client, TEXT)
            await client.write_event(SynthesizeStop().event())
            reply = await collect(client, until="synthesize-stopped")
            assert reply.stopped and not reply.errors
        sentences = await one_shot(server, [FIRST, "It cost 1,000 dollars, e.g., more than last year."])
        assert similar(bytes(reply.audio), sentences)


async def test_short_first_clause_speaks_sentences_as_before(config: Config) -> None:
    text = "Okay, the kitchen light is on now. Anything else, maybe the hallway too?"
    async with running_server(config) as server:
        async with connect(server) as client:
            await client.write_event(SynthesizeStart().event())
            await send_paced(client, text)
            await client.write_event(SynthesizeStop().event())
            reply = await collect(client, until="synthesize-stopped")
            assert reply.stopped and not reply.errors
        sentences = await one_shot(
            server, ["Okay, the kitchen light is on now.", "Anything else, maybe the hallway too?"]
        )
        assert similar(bytes(reply.audio), sentences)
