"""Request bodies of the studio's changing requests: multipart uploads, URL-encoded forms and JSON, all size-capped.

Everything is read into memory under hard caps (the upload cap for the one audio part, small caps for text
fields), so nothing is written to disk before it has been validated.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional
from urllib.parse import parse_qsl

from aiohttp import BodyPartReader, web

MAX_FIELD_BYTES = 16 * 1024
"""Longest text field (a transcript of 30 s of speech is well under 2 KB)."""

MAX_FIELDS = 16
"""Most parts one form may have."""

MAX_TEXT_BODY = 64 * 1024
"""Largest body of a request without audio (JSON or URL-encoded)."""

AUDIO_FIELD = "audio"
"""The form field that carries the recording."""

_CHUNK = 64 * 1024


class FormError(Exception):
    """A request body that cannot be accepted; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Form:
    """The fields of one request, and the uploaded recording when there is one."""

    fields: dict[str, str] = field(default_factory=dict)
    audio: Optional[bytes] = None
    filename: str = "upload.wav"
    """The upload's own name, cleaned (used in messages only, never as a path)."""

    def get(self, key: str, default: str = "") -> str:
        """A text field, or `default`."""
        return self.fields.get(key, default)

    def flag(self, key: str) -> bool:
        """A checkbox-like field: true for 1/true/on/yes."""
        return self.fields.get(key, "").strip().lower() in ("1", "true", "on", "yes")


def clean_filename(name: Optional[str]) -> str:
    """A harmless label for an uploaded file's name (its last component, safe characters, at most 64)."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("._")[:64]
    return base or "upload.wav"


async def _read_capped(stream: Any, limit: int, what: str, status: int = 413) -> bytes:
    """Read a stream (or a multipart part) to its end, failing as soon as it passes `limit` bytes."""
    data = bytearray()
    while True:
        chunk = await (stream.read_chunk(_CHUNK) if hasattr(stream, "read_chunk") else stream.read(_CHUNK))
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > limit:
            raise FormError(status, f"{what} is larger than {limit} bytes")


def _text(raw: bytes, key: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormError(400, f"field {key[:40]!r} is not UTF-8 text") from None


BeforeUpload = Callable[[Form], Awaitable[None]]
"""Awaited with the fields read so far before an upload is read; raises FormError to refuse it unread."""


async def _nothing(form: Form) -> None:
    return None


async def read_form(request: web.Request, max_upload: int, *, before_upload: BeforeUpload = _nothing) -> Form:
    """The request's body as a Form; FormError for a wrong type, a malformed body or one over the caps.

    Only a multipart body carries an upload, and `before_upload` decides before a byte of it is read; anything
    else is a small form (at most `MAX_TEXT_BODY`).
    """
    if request.content_length is not None and request.content_length > max_upload + MAX_TEXT_BODY:
        raise FormError(413, f"upload is larger than {max_upload} bytes (web.max_upload_bytes)")
    ctype = request.content_type
    if not request.body_exists:
        return Form()
    if ctype == "multipart/form-data":
        return await _multipart(request, max_upload, before_upload)
    if request.content_length is not None and request.content_length > MAX_TEXT_BODY:
        raise FormError(413, f"request body is larger than {MAX_TEXT_BODY} bytes")
    body = await _read_capped(request.content, MAX_TEXT_BODY, "request body")
    if ctype == "application/json":
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise FormError(400, "malformed JSON body") from None
        if not isinstance(data, dict):
            raise FormError(400, "expected a JSON object")
        form = Form()
        for key, value in data.items():
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                value = ",".join(value)
            if not isinstance(value, (str, bool, int, float)):
                raise FormError(400, f"field {str(key)[:40]!r}: expected text")
            form.fields[str(key)] = str(value).lower() if isinstance(value, bool) else str(value)
        return form
    if ctype == "application/x-www-form-urlencoded":
        try:
            pairs = parse_qsl(_text(body, "body"), keep_blank_values=True, max_num_fields=MAX_FIELDS)
        except ValueError:
            raise FormError(400, "too many form fields") from None
        return Form(fields=dict(pairs))
    if not body:
        return Form()
    raise FormError(415, f"unsupported content type {ctype[:60]!r} (send multipart/form-data or JSON)")


async def _multipart(request: web.Request, max_upload: int, before_upload: BeforeUpload) -> Form:
    form = Form()
    text_bytes = 0
    try:
        reader = await request.multipart()
        for _ in range(MAX_FIELDS + 1):
            part = await reader.next()
            if part is None:
                return form
            if not isinstance(part, BodyPartReader):
                raise FormError(400, "nested multipart bodies are not accepted")
            key = part.name or ""
            if key == AUDIO_FIELD:
                if form.audio is not None:
                    raise FormError(400, "only one recording per request")
                await before_upload(form)
                form.audio = await _read_capped(
                    part, max_upload, f"upload {clean_filename(part.filename)!r} (web.max_upload_bytes)"
                )
                form.filename = clean_filename(part.filename)
            else:
                raw = await _read_capped(part, MAX_FIELD_BYTES, f"field {key[:40]!r}", 400)
                form.fields[key] = _text(raw, key)
                text_bytes += len(raw)
                if text_bytes > MAX_TEXT_BODY:
                    raise FormError(413, f"form fields are larger than {MAX_TEXT_BODY} bytes in all")
        raise FormError(400, f"too many form fields (max {MAX_FIELDS})")
    except FormError:
        raise
    except (ValueError, AssertionError, KeyError, RuntimeError) as err:
        raise FormError(400, f"malformed multipart body ({type(err).__name__})") from None
