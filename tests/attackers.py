"""Misbehaving Wyoming clients over real TCP, for the soak test and the attack benchmark (benchmarks/attack.py).

Each attacker is `async (host, port, rng) -> outcome` and never raises for what the server does: the outcome names
what happened (`ok`, an error code, `closed`, `reset`, `dropped`, `timeout`). A `timeout` outcome means the server
kept a connection open longer than any limit allows; callers treat it as a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from typing import Awaitable, Callable, Optional

from wyoming.event import Event, async_read_event

from wyoming_cosyvoice.wire import encode_event

Attacker = Callable[[str, int, random.Random], Awaitable[str]]

LIMIT = 30.0
"""Longest any attacker waits for the server; beyond it the outcome is `timeout`."""

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def sentence(rng: random.Random, words: int) -> str:
    """`words` random words ending with a full stop."""
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + ". "


def ev(event_type: str, **data: object) -> bytes:
    """One event on the wire."""
    return encode_event(Event(event_type, dict(data)))


async def _open(
    host: str, port: int, rcvbuf: Optional[int] = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if rcvbuf is None:
        return await asyncio.wait_for(asyncio.open_connection(host, port), LIMIT)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), LIMIT)
    return await asyncio.open_connection(sock=sock)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed client would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _events_until(reader: asyncio.StreamReader, last: tuple[str, ...]) -> tuple[str, list[Event]]:
    """Read until an event whose type is in `last`, an error, or the end, for at most LIMIT s; (outcome, events)."""
    events: list[Event] = []
    deadline = asyncio.get_running_loop().time() + LIMIT  # in all: a server that keeps answering pings must end too
    try:
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return "timeout", events
            event = await asyncio.wait_for(async_read_event(reader), remaining)
            if event is None:
                return "closed", events
            events.append(event)
            if event.type == "error":
                return str(event.data.get("code")), events
            if event.type in last:
                return "ok", events
    except asyncio.TimeoutError:
        return "timeout", events
    except (ConnectionError, asyncio.IncompleteReadError):
        return "reset", events


async def _drain_until_closed(reader: asyncio.StreamReader) -> str:
    outcome, _ = await _events_until(reader, ())
    return outcome


async def polite_request(host: str, port: int, rng: random.Random) -> str:
    """A Home Assistant-like request: one `synthesize`, read to `audio-stop`."""
    reader, writer = await _open(host, port)
    try:
        writer.write(ev("synthesize", text=sentence(rng, rng.randint(2, 12))))
        return (await _events_until(reader, ("audio-stop",)))[0]
    finally:
        writer.close()


async def polite_stream(host: str, port: int, rng: random.Random) -> str:
    """A streamed LLM reply: start, sentences in pieces, stop; read to `synthesize-stopped`."""
    reader, writer = await _open(host, port)
    try:
        writer.write(ev("synthesize-start"))
        for _ in range(rng.randint(1, 3)):
            text = sentence(rng, rng.randint(2, 8))
            cut = rng.randint(1, len(text) - 1)
            writer.write(ev("synthesize-chunk", text=text[:cut]) + ev("synthesize-chunk", text=text[cut:]))
            await asyncio.sleep(rng.uniform(0, 0.05))
        writer.write(ev("synthesize-stop"))
        return (await _events_until(reader, ("synthesize-stopped",)))[0]
    finally:
        writer.close()


async def unknown_voice_keeps_sending(host: str, port: int, rng: random.Random) -> str:
    """A stream for a voice that does not exist, then 200 ms more chunks (asyncio's feed_data-after-eof case)."""
    reader, writer = await _open(host, port)
    try:
        writer.write(ev("synthesize-start", voice={"name": f"nobody-{rng.randint(0, 9)}"}))
        with contextlib.suppress(ConnectionError):
            for _ in range(40):
                writer.write(ev("synthesize-chunk", text="Hello there. "))
                await asyncio.wait_for(writer.drain(), LIMIT)
                await asyncio.sleep(0.005)
        return await _drain_until_closed(reader)
    finally:
        writer.close()


async def disconnect_mid_audio(host: str, port: int, rng: random.Random) -> str:
    """Ask for a long reply, read a few events, then vanish (half the time with a reset)."""
    reader, writer = await _open(host, port)
    writer.write(ev("synthesize", text=sentence(rng, 40)))
    with contextlib.suppress(Exception):
        for _ in range(rng.randint(0, 6)):
            if await asyncio.wait_for(async_read_event(reader), LIMIT) is None:
                break
    if rng.random() < 0.5:
        _reset(writer)
    else:
        writer.close()
    return "dropped"


def _tcp_state(writer: asyncio.StreamWriter) -> int:
    """The socket's TCP state from TCP_INFO (Linux; 1 is ESTABLISHED), read without reading any data."""
    sock = writer.get_extra_info("socket")
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except (OSError, AttributeError):
        return 0


async def stop_reading(host: str, port: int, rng: random.Random) -> str:
    """Ask for a long reply and never read it; the server must drop us (FIN or reset) after its write timeout."""
    reader, writer = await _open(host, port, rcvbuf=4096)
    try:
        writer.write(ev("synthesize", text=sentence(rng, 2000)))
        reader._limit = 4096  # type: ignore[attr-defined]  # asyncio stops reading the socket beyond 2 x this
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LIMIT
        while loop.time() < deadline:
            await asyncio.sleep(0.2)
            if _tcp_state(writer) != 1:
                return "dropped"
        return "timeout"
    finally:
        _reset(writer)


async def only_pings(host: str, port: int, rng: random.Random) -> str:
    """Ping forever; the idle timeout must close the connection anyway."""
    reader, writer = await _open(host, port)

    async def pinging() -> None:
        with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
            while True:
                writer.write(ev("ping", text="hi"))
                await asyncio.wait_for(writer.drain(), LIMIT)
                await asyncio.sleep(0.2)

    task = asyncio.ensure_future(pinging())
    try:
        return await _drain_until_closed(reader)
    finally:
        task.cancel()
        writer.close()


async def empty_flood(host: str, port: int, rng: random.Random) -> str:
    """Thousands of empty requests or chunks at once, nothing read until the end."""
    reader, writer = await _open(host, port)
    try:
        if rng.random() < 0.5:
            data = ev("synthesize", text=sentence(rng, 10)) + ev("synthesize", text="") * 3000
        else:
            data = ev("synthesize-start") + ev("synthesize-chunk", text="") * 3000 + ev("synthesize-stop")
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(writer.drain(), LIMIT)
        return await _drain_until_closed(reader)
    finally:
        writer.close()


async def slowloris(host: str, port: int, rng: random.Random) -> str:
    """Dribble a header one byte at a time; the idle timeout must close the connection."""
    reader, writer = await _open(host, port)
    try:
        data = b'{"type": "describe", "padding": "' + b"x" * 2000
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LIMIT
        for byte in data:
            if reader.at_eof() or loop.time() > deadline:
                break
            try:
                writer.write(bytes([byte]))
                await asyncio.wait_for(writer.drain(), LIMIT)
            except ConnectionError:
                break
            await asyncio.sleep(0.1)
            if reader._buffer:  # type: ignore[attr-defined]  # the server answered (it closes next)
                break
        return await _drain_until_closed(reader)
    finally:
        writer.close()


def fuzz_input(rng: random.Random) -> bytes:
    """Random bytes, or valid events mutated at the byte level (flip, insert, delete, duplicate, truncate)."""
    if rng.random() < 0.3:
        return rng.randbytes(rng.randint(0, 3000))
    pieces = [
        ev("describe"),
        ev("ping", text="x"),
        ev("synthesize", text="two words"),
        ev("synthesize", text=""),
        ev("synthesize", text="hello", voice={"name": "nobody"}),
        ev("synthesize-start", voice={"name": rng.choice(["tars", "nobody"])}),
        ev("synthesize-chunk", text="One. Two"),
        ev("synthesize-chunk", text=""),
        ev("synthesize-stop"),
        ev("audio-chunk", rate=16000, width=2, channels=1),
    ]
    data = bytearray(b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 6))))
    for _ in range(rng.randint(0, 4)):
        if not data:
            break
        i = rng.randrange(len(data))
        kind = rng.choice(["flip", "insert", "delete", "duplicate", "truncate"])
        if kind == "flip":
            data[i] = rng.randrange(256)
        elif kind == "insert":
            data[i:i] = rng.randbytes(rng.randint(1, 8))
        elif kind == "delete":
            del data[i : i + rng.randint(1, 8)]
        elif kind == "duplicate":
            data[i:i] = data[i : i + rng.randint(1, 64)]
        else:
            del data[i:]
    return bytes(data)


async def fuzzed(host: str, port: int, rng: random.Random) -> str:
    """One fuzzed input, half-close, read everything until the server closes; `bad` if it broke the protocol."""
    reader, writer = await _open(host, port)
    try:
        writer.write(fuzz_input(rng))
        with contextlib.suppress(ConnectionError, OSError):
            await asyncio.wait_for(writer.drain(), LIMIT)
            writer.write_eof()
        outcome, events = await _events_until(reader, ())
        if outcome not in ("closed", "reset", "timeout"):  # an error code: read what follows it too
            rest, more = await _events_until(reader, ())
            events += more
            outcome = rest if rest in ("timeout", "reset") else "closed"
        errors = [i for i, e in enumerate(events) if e.type == "error"]
        if errors and [e.type for e in events[errors[0] + 1 :]] not in ([], ["synthesize-stopped"]):
            return "bad: events after an error"
        return outcome
    finally:
        writer.close()


ATTACKERS: dict[str, Attacker] = {
    "polite_request": polite_request,
    "polite_stream": polite_stream,
    "unknown_voice_keeps_sending": unknown_voice_keeps_sending,
    "disconnect_mid_audio": disconnect_mid_audio,
    "stop_reading": stop_reading,
    "only_pings": only_pings,
    "empty_flood": empty_flood,
    "slowloris": slowloris,
    "fuzzed": fuzzed,
}
"""Every attacker by name."""

WEIGHTS = {
    "polite_request": 6,
    "polite_stream": 4,
    "unknown_voice_keeps_sending": 2,
    "disconnect_mid_audio": 4,
    "stop_reading": 1,
    "only_pings": 1,
    "empty_flood": 1,
    "slowloris": 1,
    "fuzzed": 6,
}
"""How often each attacker is picked in a mixed crowd (polite clients are the majority)."""


async def crowd(
    host: str, port: int, clients: int, rounds: int, seed: int = 0, weights: Optional[dict[str, int]] = None
) -> dict[str, dict[str, int]]:
    """`clients` concurrent clients, each running `rounds` attackers picked at random; outcome counts per attacker."""
    weights = weights or WEIGHTS
    names = list(weights)
    counts: dict[str, dict[str, int]] = {name: {} for name in names}

    async def client(index: int) -> None:
        rng = random.Random(seed * 100003 + index)
        for _ in range(rounds):
            name = rng.choices(names, [weights[n] for n in names])[0]
            try:
                outcome = await ATTACKERS[name](host, port, rng)
            except (ConnectionError, OSError, asyncio.TimeoutError) as err:  # refused (max_connections) etc.
                outcome = f"client: {type(err).__name__}"
            counts[name][outcome] = counts[name].get(outcome, 0) + 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    return counts
