"""Engine health for the page, and auditions: a sentence synthesized through the Service, streamed as WAV chunks.

An audition is an ordinary reply (`Service.open_reply`, without the server-side sinks' copy): it takes an admission
slot (`server.max_concurrent`), waits for a voice still being prepared, and stops the engine when the browser goes
away. The response starts once the engine's first chunk exists (so an error before it is a JSON answer with a status)
and carries each chunk as it comes.
"""

from __future__ import annotations

import logging
import struct
import time
from typing import Any

from aiohttp import web

from .. import __version__
from ..errors import CosyVoiceServiceError, ServerBusy, VoiceNotFound
from ..reference import MAX_SECONDS, MIN_RATE
from ..voice_store import MAX_DESCRIPTION_CHARS, MAX_LANGUAGES, MAX_TRANSCRIPT_CHARS
from .app import FORM_KEY, STUDIO_KEY, problem

_LOGGER = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """A health value as JSON: numbers, text, flags; anything else as its text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


async def status(request: web.Request) -> web.Response:
    """Engine health (whatever each engine's health() reports), admission, limits, whether a token is needed."""
    studio = request.app[STUDIO_KEY]
    service = studio.service
    engines = []
    for name, engine in service.engines.running.items():
        try:
            health = engine.health()
        except Exception as err:  # health is informational: a failing engine still gets listed
            health = {"state": f"health() failed: {type(err).__name__}"}
        engines.append(
            {
                "name": name,
                "main": engine is service.engine,
                "sample_rate": engine.sample_rate,
                "health": {k: studio.redact(str(v)) if isinstance(v, str) else _plain(v) for k, v in health.items()},
            }
        )
    return web.json_response(
        {
            "version": __version__,
            "engines": engines,
            "failed_engines": {k: studio.redact(v) for k, v in service.engines.failed.items()},
            "note": studio.redact(service.engines.note),
            "in_flight": service.concurrency_limit.active,
            "degraded": service.degraded.counts(),
            "metrics": service.metrics.summary(),
            "max_concurrent": service.concurrency_limit.limit,
            "preparing": sorted(service.preparer.preparing()),
            "token_required": bool(studio.token),
            "limits": {
                "max_upload_bytes": studio.settings.max_upload_bytes,
                "max_text_chars": service.limits.max_text_chars,
                "max_transcript_chars": MAX_TRANSCRIPT_CHARS,
                "max_description_chars": MAX_DESCRIPTION_CHARS,
                "max_languages": MAX_LANGUAGES,
                "min_rate": MIN_RATE,
                "max_seconds": MAX_SECONDS,
            },
        }
    )


def wav_header(rate: int, width: int, channels: int) -> bytes:
    """A WAV header for a stream of unknown length (sizes set to the maximum, as streaming players expect)."""
    unknown = 0xFFFFFFFF
    return (
        b"RIFF"
        + struct.pack("<I", unknown)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * width * channels, width * channels, width * 8)
        + b"data"
        + struct.pack("<I", unknown)
    )


async def audition(request: web.Request) -> web.StreamResponse:
    """Synthesize `text` with `voice` and stream it as audio/wav while the engine makes it."""
    studio = request.app[STUDIO_KEY]
    service = studio.service
    form = request[FORM_KEY]
    if service.closing:
        service.metrics.refused("shutting_down")
        return problem(503, "server is shutting down")
    text = form.get("text").strip()
    if not text:
        return problem(400, "type a sentence to hear")
    if len(text) > service.limits.max_text_chars:
        return problem(413, f"text has {len(text)} characters; the limit is {service.limits.max_text_chars}")
    try:
        reply = service.open_reply(
            form.get("voice") or None, None, sinks=False, unknown_voice="error", protocol="studio"
        )
    except VoiceNotFound as err:
        return problem(404, studio.redact(str(err)))
    profile = reply.profile
    started = time.perf_counter()
    chunks = reply.speak(text)
    response = None
    complete = False
    try:
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            first = None
        except ServerBusy as err:
            return problem(503, str(err))
        except CosyVoiceServiceError as err:
            return problem(502 if not isinstance(err, VoiceNotFound) else 404, studio.redact(str(err)))
        first_ms = (time.perf_counter() - started) * 1000
        fmt = first.format if first else reply.format
        response = web.StreamResponse(
            headers={
                "Content-Type": "audio/wav",
                "X-Voice": profile.name,
                "X-Sample-Rate": str(fmt.rate),
                "X-First-Audio-Ms": f"{first_ms:.0f}",
            }
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        reply.start()
        await response.write(wav_header(fmt.rate, fmt.width, fmt.channels))
        sent = 0
        if first is not None:
            await response.write(first.audio)
            sent += len(first.audio)
            async for chunk in chunks:
                await response.write(chunk.audio)
                sent += len(chunk.audio)
        await response.write_eof()
        complete = True
        _LOGGER.info(
            "studio audition: voice=%s chars=%d first_audio=%.0f ms audio=%.2f s",
            profile.name,
            len(text),
            first_ms,
            fmt.seconds(sent),
        )
        return response
    except (ConnectionResetError, ConnectionError):
        _LOGGER.info("studio audition: browser left; synthesis stopped")
        return response or web.Response(status=499)
    except CosyVoiceServiceError as err:  # after the first chunk: the stream just ends early
        _LOGGER.warning("studio audition: voice=%s failed mid-stream: %s", profile.name, err)
        return response or problem(502, studio.redact(str(err)))
    finally:
        await chunks.aclose()
        reply.finish(complete)
