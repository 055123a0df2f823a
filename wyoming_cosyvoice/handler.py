"""Wyoming event handler: the protocol state machine only (describe, synthesize, streaming synthesize, errors)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from wyoming.audio import AudioChunk as WyomingAudioChunk
from wyoming.audio import AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe
from wyoming.ping import Ping, Pong
from wyoming.server import AsyncEventHandler
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

from .audio import split_pcm
from .config import Limits
from .engine import ENGINE_PARK, ENGINE_STATE, ENGINE_WAKE
from .errors import BadRequest, CosyVoiceServiceError, LimitExceeded, ServerBusy
from .guard import client_name
from .service import Opening, Reply, Service
from .text import SentenceSplitter
from .wire import EventChannel

_LOGGER = logging.getLogger(__name__)

MAX_CHUNK_SECONDS = 0.5
"""Engine chunks longer than this are sent as several Wyoming audio chunks."""

MIN_JOB_CHARS = 16
"""Every queued job counts at least this many characters toward `limits.max_stream_chars`: an empty request costs
memory and a reply too, and a flood of them must hit the bound."""


@dataclass
class _Stream:
    """State of one streaming synthesis (synthesize-start .. synthesize-stop)."""

    voice_name: Optional[str]
    language: Optional[str]
    splitter: SentenceSplitter = field(default_factory=SentenceSplitter)
    reply: Optional[Reply] = None  # opened at the first sentence, when its audio starts
    failed: bool = False
    chars: int = 0
    opening: Optional[Opening] = None  # voice and engine found at synthesize-start (the engine starts waking)

    def ended(self) -> None:
        """The stream is over: its engine may park again once idle (dropped unreleased, it releases when collected)."""
        if self.opening is not None:
            self.opening.close()


@dataclass
class _OneShot:
    text: str
    voice_name: Optional[str]
    language: Optional[str]


@dataclass
class _Sentence:
    stream: _Stream
    text: str


@dataclass
class _StreamEnd:
    stream: _Stream


_Job = Union[_OneShot, _Sentence, _StreamEnd]


def _string(value: Any, key: str, limit: int) -> str:
    """`value` checked to be a string of valid Unicode (JSON allows lone surrogates) within `limit` characters."""
    if not isinstance(value, str):
        raise BadRequest(f"'{key}' must be a string")
    if len(value) > limit:
        raise LimitExceeded(f"'{key}' has {len(value)} characters; the limit is {limit} (limits.max_text_chars)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"'{key}' is not valid Unicode (lone surrogate)") from None
    return value


def _voice_fields(data: dict[str, Any]) -> tuple[Optional[str], Optional[str]]:
    """(name, language) from an event's `voice` field, checked for type."""
    voice = data.get("voice")
    if voice is None:
        return None, None
    if not isinstance(voice, dict):
        raise BadRequest("'voice' must be an object")
    name, language = voice.get("name"), voice.get("language")
    if name is not None:
        name = _string(name, "voice.name", 256)
    if language is not None:
        language = _string(language, "voice.language", 256)
    return name or None, language or None


def _text_field(data: dict[str, Any], limit: int) -> str:
    return _string(data.get("text"), "text", limit)


async def _flush(writer: asyncio.StreamWriter, timeout: float = 5.0) -> None:
    """Wait until the transport has sent what it buffered (drain() only waits above the high-water mark)."""
    transport = writer.transport
    deadline = asyncio.get_running_loop().time() + timeout
    while not transport.is_closing() and transport.get_write_buffer_size() > 0:
        if asyncio.get_running_loop().time() > deadline:
            return
        await asyncio.sleep(0.005)


class TtsEventHandler(AsyncEventHandler):
    """One client connection. Reading and synthesis run side by side so a vanished client cancels its work."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        service: Service,
        *,
        finish_on_eof: bool = False,
        limits: Optional[Limits] = None,
    ) -> None:
        super().__init__(reader, writer)
        self.service = service
        self.finish_on_eof = finish_on_eof
        self._jobs: asyncio.Queue[Optional[_Job]] = asyncio.Queue()
        self._stream: Optional[_Stream] = None
        self._worker: Optional[asyncio.Task[None]] = None
        self._closing = False
        self._reply: Optional[Reply] = None  # the reply whose audio is on the wire (cut off if the connection ends)
        self.limits = limits or service.limits
        """This connection's limits (`service.limits` unless given: a pipe has no idle timeout)."""
        self.peer = client_name(writer.get_extra_info("peername"))
        self.channel = EventChannel(reader, writer, self.limits, self.peer, service.log_throttle)
        self._queued_chars = 0
        self._pending = 0

    def busy(self) -> bool:
        """True while this connection has synthesis queued or running (it is then not idle)."""
        return self._pending > 0

    def in_progress(self) -> bool:
        """True while a reply is unfinished: synthesis queued or running, or a stream open between sentences."""
        return self._pending > 0 or (self._stream is not None and not self._closing)

    def abort(self) -> None:
        """Drop the connection now, unsent data discarded: the read loop ends and its synthesis is cancelled."""
        self.channel.abort()

    async def stop(self) -> None:
        """End the conversation: reading stops, the synthesis in progress is cancelled, the connection closes.

        Overrides the wyoming base's `stop()`, which calls `feed_eof()` on the reader: see `EventChannel.stop_reading`
        for why that must never happen here.
        """
        self._is_running = False
        self._close()

    async def write_event(self, event: Event) -> None:
        """Send an event (serialized, under the write timeout)."""
        await self.channel.write(event)

    async def run(self) -> None:
        """Read events until EOF; EOF means the client left, so its synthesis is cancelled."""
        self._is_running = True
        self._worker = asyncio.create_task(self._work(), name="tts synthesis")
        try:
            while self._is_running and not self._closing:
                try:
                    event = await self.channel.read(self.busy)
                except CosyVoiceServiceError as err:  # broken framing, a limit, or the idle timeout
                    await self._send_error(err)
                    break
                if event is None:
                    break
                if not await self.handle_event(event):
                    break
            if self.finish_on_eof and not self._closing:
                self._jobs.put_nowait(None)
                await self._worker
        except ConnectionError:  # ClientStalled included (the channel logged it)
            pass
        finally:
            if not self._worker.done():
                self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            if self._reply is not None:
                self._reply.finish(ok=False)
            await self.disconnect()
            await _flush(self.writer)
            self.writer.close()

    async def handle_event(self, event: Event) -> bool:
        """Dispatch one event; protocol errors become `error` events."""
        try:
            return await self._dispatch(event)
        except CosyVoiceServiceError as err:
            await self._send_error(err)
            return False
        except (KeyError, TypeError, ValueError) as err:
            await self._send_error(BadRequest(f"malformed {event.type[:64]!r} event: {err}"))
            return False

    async def _dispatch(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            await self.write_event((await self.service.info()).event())
            return True
        if Ping.is_type(event.type):
            text = event.data.get("text")
            await self.write_event(Pong(text=_text_field(event.data, 256) if text is not None else None).event())
            return True
        if (Synthesize.is_type(event.type) and self._stream is None) or SynthesizeStart.is_type(event.type):
            if self.service.closing:
                self.service.metrics.refused("shutting_down")
                raise ServerBusy("server is shutting down; try again shortly")
        if Synthesize.is_type(event.type):
            if self._stream is not None:
                _LOGGER.debug("synthesize inside a stream ignored (sent for compatibility)")
                return True
            text = _text_field(event.data, self.limits.max_text_chars)
            name, language = _voice_fields(event.data)
            self._queue(_OneShot(text, name, language), len(text))
            return True
        if SynthesizeStart.is_type(event.type):
            if self._stream is not None:
                raise BadRequest("synthesize-start while a stream is already open")
            name, language = _voice_fields(event.data)
            self._stream = _Stream(name, language, SentenceSplitter(self.service.first_clause_words))
            # The LLM has just begun its reply: a parked model wakes while its text arrives. A voice that cannot be
            # found is reported at the first sentence, as before (the stream then ends with synthesize-stopped).
            with contextlib.suppress(CosyVoiceServiceError):
                self._stream.opening = self.service.reply_opening(name, language, client=self.peer)
            return True
        if SynthesizeChunk.is_type(event.type):
            if self._stream is None:
                raise BadRequest("synthesize-chunk without synthesize-start")
            text = _text_field(event.data, self.limits.max_text_chars)
            self._stream.chars += max(len(text), 1)  # empty chunks count too: a flood of them is bounded
            if self._stream.chars > self.limits.max_stream_chars:
                raise LimitExceeded(
                    f"stream text exceeds {self.limits.max_stream_chars} characters (limits.max_stream_chars)"
                )
            for sentence in self._stream.splitter.feed(text):
                self._queue(_Sentence(self._stream, sentence), len(sentence))
            return True
        if SynthesizeStop.is_type(event.type):
            if self._stream is None:
                raise BadRequest("synthesize-stop without synthesize-start")
            rest = self._stream.splitter.flush()
            if rest:
                self._queue(_Sentence(self._stream, rest), len(rest))
            self._queue(_StreamEnd(self._stream), 0)
            self._stream = None
            return True
        if event.type in (ENGINE_PARK, ENGINE_WAKE):
            # Our own events (`wyoming-cosyvoice park` / `wake`): free the GPU before a big job, or wake ahead of use.
            states = await (self.service.park() if event.type == ENGINE_PARK else self.service.wake())
            await self.write_event(Event(ENGINE_STATE, {"engines": states}))
            return True
        raise BadRequest(f"unsupported event type {event.type[:64]!r}")

    def _queue(self, job: _Job, chars: int) -> None:
        """Queue a job for synthesis; the text waiting per connection is bounded (a pipelining client)."""
        chars = _job_cost(chars)
        if self._queued_chars + chars > self.limits.max_stream_chars:
            raise LimitExceeded(
                f"more than {self.limits.max_stream_chars} characters queued on one connection "
                "(limits.max_stream_chars)"
            )
        self._queued_chars += chars
        self._pending += 1
        self._jobs.put_nowait(job)

    async def _send_error(self, err: CosyVoiceServiceError) -> None:
        self.service.log_throttle.warning(_LOGGER, err.code, "client %s: %s: %s", self.peer, err.code, err)
        try:
            await self.write_event(Error(text=str(err), code=err.code).event())
        except Exception:  # the client may be gone or stalled; the error is logged either way
            pass

    # ------------------------------------------------------------------ synthesis, one job at a time

    async def _work(self) -> None:
        while True:
            job = await self._jobs.get()
            if job is None:
                return
            try:
                await self._run_job(job)
            except CosyVoiceServiceError as err:
                await self._fail(job, err)
                return
            except ConnectionError:  # ClientStalled included (the channel logged it)
                _LOGGER.debug("client %s went away during synthesis", self.peer)
                self._close()
                return
            finally:
                self._pending -= 1
                self._queued_chars -= _job_cost(_job_chars(job))

    async def _run_job(self, job: _Job) -> None:
        if isinstance(job, _OneShot):
            reply = self.service.open_reply(job.voice_name, job.language, client=self.peer)
            await self._start(reply)
            await self._speak(reply, job.text)
            await self._finish(reply)
        elif isinstance(job, _Sentence):
            stream = job.stream
            if stream.failed:
                return
            if stream.reply is None:
                stream.reply = self.service.open_reply(
                    stream.voice_name, stream.language, client=self.peer, opening=stream.opening
                )
                await self._start(stream.reply)
            await self._speak(stream.reply, job.text)
        else:
            job.stream.ended()
            if job.stream.reply is not None:
                await self._finish(job.stream.reply)
            await self.write_event(SynthesizeStopped().event())

    async def _fail(self, job: _Job, err: CosyVoiceServiceError) -> None:
        """Report a failed request; a failed stream still ends with synthesize-stopped, then the connection closes."""
        await self._send_error(err)
        if isinstance(job, _Sentence):
            job.stream.failed = True
            job.stream.ended()
            # The rest of this stream is dropped; the client still gets its terminating event.
            await self.write_event(SynthesizeStopped().event())
        self._close()

    def _close(self) -> None:
        self._closing = True
        self.channel.stop_reading()

    async def _start(self, reply: Reply) -> None:
        """`audio-start` in the format of the engine serving the voice; the reply's copy for the sinks opens."""
        fmt = reply.format
        if self._reply is not None:  # a reply left open (not expected: a failure ends the connection) is cut off
            self._reply.finish(ok=False)
        self._reply = reply  # before writing: a client gone already still ends the reply (its metrics count it)
        await self.write_event(AudioStart(rate=fmt.rate, width=fmt.width, channels=fmt.channels).event())
        reply.start()

    async def _speak(self, reply: Reply, text: str) -> None:
        """The audio of `text`, in Wyoming chunks of at most MAX_CHUNK_SECONDS."""
        fmt = reply.format
        max_bytes = fmt.nbytes(MAX_CHUNK_SECONDS)
        async with contextlib.aclosing(reply.speak(text)) as chunks:
            async for chunk in chunks:
                for piece in split_pcm(chunk.audio, max_bytes, fmt.frame_bytes):
                    await self.write_event(
                        WyomingAudioChunk(rate=fmt.rate, width=fmt.width, channels=fmt.channels, audio=piece).event()
                    )

    async def _finish(self, reply: Reply) -> None:
        """`audio-stop`; the reply ends whole."""
        await self.write_event(AudioStop().event())
        reply.finish(ok=True)
        self._reply = None


def _job_chars(job: _Job) -> int:
    return len(job.text) if isinstance(job, (_OneShot, _Sentence)) else 0


def _job_cost(chars: int) -> int:
    return max(chars, MIN_JOB_CHARS)
