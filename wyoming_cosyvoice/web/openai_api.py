"""The OpenAI-compatible speech API under /v1 (docs/openai-api.md): `POST /v1/audio/speech`, streamed as it is made,
`GET /v1/models`, `GET /v1/audio/models` and `GET /v1/audio/voices`.

A speech request is an ordinary reply (`Service.open_reply`, the sinks' copy, admission, the request log line): its
input is cut into pieces as a Wyoming stream's text is (the first clause early, then sentences), each piece spoken
in turn, and the audio leaves as each chunk comes, resampled to 24 kHz and encoded (`encoders.py`). Errors are
OpenAI's JSON shape `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, AsyncGenerator, Awaitable, Callable, Optional

from aiohttp import web

from ..audio import PcmConverter
from ..config import OPENAI_VOICE_NAMES
from ..errors import CosyVoiceServiceError, EngineError, ServerBusy, VoiceNotFound
from ..service import Reply
from ..text import SentenceSplitter
from .app import STUDIO_KEY, Studio
from .connections import request_client
from .encoders import FORMATS, KNOWN, OUTPUT, Encoder, Format

_LOGGER = logging.getLogger(__name__)

PREFIX = "/v1"
"""Where the API's routes live (the studio's guard leaves their bodies and keys to this module)."""

MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "wyoming-cosyvoice")
"""Model names accepted; all mean the configured engine (the main engine's own name is accepted too)."""

MAX_INSTRUCTIONS = 4096
_OWNER = "wyoming-cosyvoice"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(
        self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None, kind: str = ""
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code
        self.kind = kind or ("server_error" if status >= 500 else "invalid_request_error")

    def response(self) -> web.Response:
        """The JSON answer."""
        body = {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return web.json_response(body, status=self.status, headers=headers)


@dataclass(frozen=True)
class SpeechRequest:
    """A checked `POST /v1/audio/speech` body."""

    input: str
    voice: Optional[str]
    format: Format
    speed: float
    instructions: str
    sse: bool


def add_routes(router: web.UrlDispatcher) -> None:
    """Register the /v1 routes."""
    router.add_post(f"{PREFIX}/audio/speech", speech)
    router.add_get(f"{PREFIX}/models", models)
    router.add_get(f"{PREFIX}/audio/models", audio_models)
    router.add_get(f"{PREFIX}/audio/voices", voices)
    router.add_route("*", f"{PREFIX}/{{tail:.*}}", not_found)


def _model_names(studio: Studio) -> list[str]:
    return list(dict.fromkeys((*MODELS, studio.service.engine.name)))


def _check_key(request: web.Request) -> None:
    """ApiError 401 unless the request carries `web.token` or one of `web.openai.api_keys` as its bearer token (with
    neither set: always, unless the port is bound to a loopback address)."""
    studio = request.app[STUDIO_KEY]
    keys = [key for key in (studio.token, *studio.settings.openai.api_keys) if key]
    if not keys:
        if studio.loopback_only:
            return
        raise ApiError(
            401,
            "no API key is configured: set web.token or web.openai.api_keys (without one the API answers only "
            "while web.host is a loopback address)",
            code="invalid_api_key",
        )
    auth = request.headers.get("Authorization", "")
    if not auth.lower().startswith("bearer "):
        raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
    given = auth[7:].strip().encode("utf-8", "replace")
    # Every key is compared (no early exit): the time taken says nothing about which one nearly matched.
    matches = [hmac.compare_digest(given, key.encode("utf-8")) for key in keys]
    if not any(matches):
        raise ApiError(401, "incorrect API key", code="invalid_api_key")


def _answer(*, needs_key: bool) -> Callable[[Handler], Handler]:
    """A route whose key is checked first (`needs_key`), whose ApiErrors and unexpected failures are answered in
    OpenAI's shape, never with a traceback."""

    def wrap(handler: Handler) -> Handler:
        async def run(request: web.Request) -> web.StreamResponse:
            try:
                if needs_key:
                    _check_key(request)
                return await handler(request)
            except ApiError as err:
                return err.response()
            except web.HTTPException as err:
                return ApiError(err.status, err.reason).response()
            except Exception:
                _LOGGER.exception("openai api: %s %s failed", request.method, request.path)
                return ApiError(500, "internal error (logged on the server)").response()

        return run

    return wrap


@_answer(needs_key=False)
async def not_found(request: web.Request) -> web.StreamResponse:
    """Any other /v1 path."""
    raise ApiError(404, f"no such route: {request.method} {request.path[:100]}", code="unknown_url")


@_answer(needs_key=False)  # lists are read without a key, as the studio's: Open WebUI sends none
async def models(request: web.Request) -> web.StreamResponse:
    """OpenAI's model list: every accepted name (all serve with the configured engine)."""
    studio = request.app[STUDIO_KEY]
    data = [{"id": name, "object": "model", "created": 0, "owned_by": _OWNER} for name in _model_names(studio)]
    return web.json_response({"object": "list", "data": data})


@_answer(needs_key=False)  # lists are read without a key, as the studio's: Open WebUI sends none
async def audio_models(request: web.Request) -> web.StreamResponse:
    """The speech models as Open WebUI and Kokoro-FastAPI list them."""
    return web.json_response({"models": [{"id": name} for name in _model_names(request.app[STUDIO_KEY])]})


@_answer(needs_key=False)  # lists are read without a key, as the studio's: Open WebUI sends none
async def voices(request: web.Request) -> web.StreamResponse:
    """The usable voices (as Open WebUI and Kokoro-FastAPI read them) and the configured aliases."""
    studio = request.app[STUDIO_KEY]
    profiles = await studio.service.preparer.refresh()
    default = studio.service.catalog.default
    listed = [
        {
            "id": p.name,
            "name": p.name,
            "description": p.description or p.name,
            "languages": list(p.languages),
            "default": default is not None and p.name == default.name,
        }
        for p in profiles
    ]
    return web.json_response({"voices": listed, "aliases": dict(studio.settings.openai.voices)})


async def _read_json(request: web.Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, read under `limit` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"request body over {limit} bytes", code="request_too_large")
    body = bytearray()
    while True:
        piece = await request.content.read(65536)
        if not piece:
            break
        body += piece
        if len(body) > limit:
            raise ApiError(413, f"request body over {limit} bytes", code="request_too_large")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the body is not JSON: {err}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return data


def _text(data: dict[str, Any], key: str, limit: int, default: Optional[str] = None) -> Optional[str]:
    value = data.get(key, default)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"'{key}' must be a string", param=key, code="invalid_type")
    if len(value) > limit:
        raise ApiError(
            413, f"'{key}' has {len(value)} characters; the limit is {limit}", param=key, code="string_above_max_length"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"'{key}' is not valid Unicode (lone surrogate)", param=key) from None
    return value


def parse_speech(data: dict[str, Any], studio: Studio) -> SpeechRequest:
    """Check a speech body; ApiError naming the field otherwise."""
    model = _text(data, "model", 256, "tts-1")
    if model not in _model_names(studio):
        names = ", ".join(_model_names(studio))
        raise ApiError(
            400, f"unknown model {model!r}; this server takes {names}", param="model", code="model_not_found"
        )
    text = _text(data, "input", studio.service.limits.max_text_chars)
    if text is None or not text.strip():
        raise ApiError(400, "'input' must be a non-empty string", param="input")
    voice = data.get("voice")
    if isinstance(voice, dict):  # OpenAI's newer form {"id": "..."} for custom voices
        voice = voice.get("id")
    voice = _text({"voice": voice}, "voice", 256) or None
    name = _text(data, "response_format", 32, "mp3")
    fmt = FORMATS.get(name or "")
    if fmt is None:
        available = ", ".join(FORMATS)
        why = "is not available here (no encoder)" if name in KNOWN else "is not a format"
        raise ApiError(400, f"response_format {name!r} {why}; available: {available}", param="response_format")
    speed = data.get("speed", 1.0)
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not math.isfinite(speed):
        raise ApiError(400, "'speed' must be a number", param="speed")
    if not 0.25 <= speed <= 4.0:
        raise ApiError(400, f"'speed' must be between 0.25 and 4.0, got {speed}", param="speed")
    instructions = _text(data, "instructions", MAX_INSTRUCTIONS) or ""
    stream_format = data.get("stream_format", "audio")
    if stream_format not in ("audio", "sse"):
        raise ApiError(400, "'stream_format' must be 'audio' or 'sse'", param="stream_format")
    return SpeechRequest(text, voice, fmt, float(speed), instructions.strip(), stream_format == "sse")


def open_reply(studio: Studio, voice: Optional[str], client: str = "") -> Reply:
    """The reply for a request's voice: an alias from `web.openai.voices`, a profile, or, for OpenAI's built-in
    names without an alias or a voice of that name, the default voice. Any other unknown name follows
    `server.unknown_voice` (the default voice and one log line naming `client`, or ApiError 404)."""
    service, aliases = studio.service, studio.settings.openai.voices
    name = aliases.get(voice, voice) if voice else None
    try:
        if voice in OPENAI_VOICE_NAMES and voice not in aliases:
            try:
                return service.open_reply(
                    voice=name, language=None, client=client, unknown_voice="error", protocol="http"
                )
            except VoiceNotFound:
                return service.open_reply(voice=None, language=None, client=client, protocol="http")
        return service.open_reply(voice=name, language=None, client=client, protocol="http")
    except VoiceNotFound as err:
        raise ApiError(404, studio.redact(str(err)), param="voice", code="voice_not_found") from None


def _api_error(err: CosyVoiceServiceError, studio: Studio) -> ApiError:
    """The answer for a service error raised before any audio."""
    if isinstance(err, ServerBusy):
        return ApiError(429, str(err), code="server_busy", kind="rate_limit_error")
    if isinstance(err, VoiceNotFound):
        return ApiError(404, studio.redact(str(err)), param="voice", code="voice_not_found")
    status = 500 if isinstance(err, EngineError) else 400 if err.code in ("BadRequest", "LimitExceeded") else 500
    return ApiError(status, studio.redact(str(err)), code=err.code)


async def _pcm(reply: Reply, pieces: list[str], speed: float) -> AsyncGenerator[bytes, None]:
    """The reply's audio at 24 kHz, piece after piece (each one request: admission slot, log line)."""
    converter = PcmConverter(reply.format, OUTPUT)
    for piece in pieces:
        async with contextlib.aclosing(reply.speak(piece, speed=speed)) as chunks:
            async for chunk in chunks:
                pcm = converter.convert(chunk.audio)
                if pcm:
                    yield pcm


def _pieces(text: str, first_clause_words: int) -> list[str]:
    """The input cut as a Wyoming stream's text: its first clause early, then sentence by sentence."""
    splitter = SentenceSplitter(first_clause_words)
    pieces = splitter.feed(text)
    rest = splitter.flush()
    return pieces + ([rest] if rest else [])


@_answer(needs_key=True)
async def speech(request: web.Request) -> web.StreamResponse:
    """Synthesize `input` and stream it in `response_format` as it is made."""
    studio = request.app[STUDIO_KEY]
    service = studio.service
    limit = service.limits.max_text_chars * 12 + 65536  # a character may take 12 bytes as JSON escapes
    speech_request = parse_speech(await _read_json(request, limit), studio)
    if service.closing:
        service.metrics.refused("shutting_down")
        raise ApiError(503, "server is shutting down; try again shortly", code="shutting_down")
    reply = open_reply(studio, speech_request.voice, client=f"http {request_client(request)}")
    return await _stream(request, studio, reply, speech_request)


async def _encode(encoder: Encoder, pcm: Optional[bytes]) -> bytes:
    """Encoded bytes of `pcm` (None: the encoder's end), off the event loop unless it is a copy."""
    if pcm is None:
        return encoder.close() if encoder.cheap else await asyncio.to_thread(encoder.close)
    return encoder.encode(pcm) if encoder.cheap else await asyncio.to_thread(encoder.encode, pcm)


class _Writer:
    """Writes encoded audio to the response: as it is (`audio`) or as OpenAI's SSE events (`sse`)."""

    def __init__(self, response: web.StreamResponse, sse: bool) -> None:
        self.response = response
        self.sse = sse
        self.sent = 0

    async def audio(self, data: bytes) -> None:
        if not data:
            return
        self.sent += len(data)
        if self.sse:
            event = {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")}
            data = f"data: {json.dumps(event)}\n\n".encode()
        await self.response.write(data)

    async def done(self, chars: int) -> None:
        if self.sse:
            usage = {"input_tokens": chars, "output_tokens": 0, "total_tokens": chars}
            await self.response.write(f"data: {json.dumps({'type': 'speech.audio.done', 'usage': usage})}\n\n".encode())
        await self.response.write_eof()

    async def error(self, err: ApiError) -> None:
        if self.sse:
            body = {"type": "error", "error": {"message": str(err), "type": err.kind, "code": err.code}}
            with contextlib.suppress(ConnectionError):  # the client may have gone too
                await self.response.write(f"data: {json.dumps(body)}\n\n".encode())
                await self.response.write_eof()


async def _stream(request: web.Request, studio: Studio, reply: Reply, ask: SpeechRequest) -> web.StreamResponse:
    """Wait for the first audio (errors until then are JSON answers), then send each chunk as it comes."""
    pieces = _pieces(ask.input, studio.service.first_clause_words)
    audio = _pcm(reply, pieces, ask.speed)
    encoder = Encoder(ask.format)
    started = time.perf_counter()
    outcome, complete = "failed", False
    reply.start()
    try:
        try:
            first: Optional[bytes] = await audio.__anext__()
        except StopAsyncIteration:
            first = None
        except CosyVoiceServiceError as err:
            raise _api_error(err, studio) from None
        first_ms = (time.perf_counter() - started) * 1000
        response = web.StreamResponse(headers=_headers(reply, ask, first_ms))
        response.enable_chunked_encoding()
        await response.prepare(request)
        writer = _Writer(response, ask.sse)
        outcome = "client left"
        try:
            await writer.audio(encoder.header())
            if first is not None:
                await writer.audio(await _encode(encoder, first))
                async for pcm in audio:
                    await writer.audio(await _encode(encoder, pcm))
            await writer.audio(await _encode(encoder, None))
            await writer.done(len(ask.input))
            outcome, complete = "done", True
        except ConnectionError:
            pass  # the client left: its synthesis was stopped with the stream
        except Exception as err:  # after the first audio: the stream ends early, and says so
            outcome = type(err).__name__
            if isinstance(err, CosyVoiceServiceError):
                _LOGGER.warning("openai api: voice=%s failed mid-stream: %s", reply.profile.name, err)
                await writer.error(_api_error(err, studio))
            else:
                _LOGGER.exception("openai api: voice=%s failed mid-stream", reply.profile.name)
                await writer.error(ApiError(500, "internal error (logged on the server)"))
            if not ask.sse and request.transport is not None:
                request.transport.close()  # no end-of-stream marker: the client sees a cut-off reply, not a short one
        _LOGGER.info(
            "openai api: voice=%s format=%s%s chars=%d first_audio=%.0f ms bytes=%d end=%s",
            reply.profile.name,
            ask.format.name,
            "/sse" if ask.sse else "",
            len(ask.input),
            first_ms,
            writer.sent,
            outcome,
        )
        return response
    finally:
        await audio.aclose()
        reply.finish(complete)


def _headers(reply: Reply, ask: SpeechRequest, first_ms: float) -> dict[str, str]:
    headers = {
        "Content-Type": "text/event-stream" if ask.sse else ask.format.content_type,
        "X-Voice": reply.profile.name,
        "X-Sample-Rate": str(OUTPUT.rate),
        "X-First-Audio-Ms": f"{first_ms:.0f}",
    }
    if ask.instructions:
        headers["X-Instructions"] = "ignored: this server's engines take no per-request instructions"
    return headers
