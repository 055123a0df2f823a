"""The OpenAI speech API's response formats: 24 kHz 16-bit mono PCM, encoded chunk by chunk (libsndfile via soundfile).

`pcm` and `wav` are the samples themselves (a WAV header of unknown length first, as streaming players expect).
`mp3` (constant bit rate) and `opus` (in Ogg) leave as the encoder makes them. `flac` is sent whole at the end: its
header holds the length, and libsndfile cannot read a FLAC stream whose length is left unknown.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Optional

import soundfile

from ..audio import AudioFormat
from .audition import wav_header

OUTPUT = AudioFormat(24000, 2, 1)
"""What every format carries: OpenAI's `pcm` is 24 kHz 16-bit mono little-endian, and so are the others here."""


@dataclass(frozen=True)
class Format:
    """One `response_format`: its content type and how libsndfile writes it (None: raw samples)."""

    name: str
    content_type: str
    container: Optional[str] = None
    subtype: Optional[str] = None
    streams: bool = True
    """Bytes leave as they are made (False: the whole file at the end)."""


_FORMATS = (
    Format("pcm", "audio/pcm"),
    Format("wav", "audio/wav"),
    Format("mp3", "audio/mpeg", "MP3", "MPEG_LAYER_III"),
    Format("opus", "audio/ogg; codecs=opus", "OGG", "OPUS"),
    Format("flac", "audio/flac", "FLAC", "PCM_16", streams=False),
    Format("aac", "audio/aac", "AAC"),  # libsndfile has no AAC encoder: listed so the refusal can say so
)


def _available(fmt: Format) -> bool:
    if fmt.container is None:
        return True
    return fmt.container in soundfile.available_formats() and fmt.subtype in soundfile.available_subtypes(fmt.container)


FORMATS = {fmt.name: fmt for fmt in _FORMATS if _available(fmt)}
"""The formats this installation can write (MP3 needs libsndfile 1.1 or later)."""

KNOWN = tuple(fmt.name for fmt in _FORMATS)
"""Every format OpenAI defines, available here or not."""


class _AppendOnly(io.RawIOBase):
    """A file libsndfile writes into whose bytes are taken away as they come; a later rewrite of bytes already
    taken (a header completed at close: MP3's Info tag, FLAC's length) is dropped, as a stream cannot take it back."""

    def __init__(self) -> None:
        super().__init__()
        self._new = bytearray()
        self._taken = 0  # bytes handed out before _new
        self._pos = 0

    def take(self) -> bytes:
        """The bytes written since the last call."""
        out = bytes(self._new)
        self._taken += len(out)
        self._new.clear()
        return out

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:  # libsndfile's writers do not read back what they wrote
        return b""

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        end = self._taken + len(self._new)
        self._pos = offset if whence == io.SEEK_SET else self._pos + offset if whence == io.SEEK_CUR else end + offset
        return self._pos

    def write(self, data: bytes) -> int:  # type: ignore[override]
        data = bytes(data)
        count, start = len(data), self._pos
        self._pos += count
        if start < self._taken:  # already sent: only what goes beyond it is kept
            data, start = data[self._taken - start :], self._taken
        offset = start - self._taken
        if offset > len(self._new):
            self._new.extend(bytes(offset - len(self._new)))
        self._new[offset : offset + len(data)] = data
        return count


class Encoder:
    """Turns 16-bit PCM in OUTPUT's format into the bytes of one response, chunk by chunk.

    `header()` first, `encode(pcm)` for each chunk, `close()` at the end; each returns the bytes to send now.
    The libsndfile formats are CPU work: call `encode` and `close` off the event loop.
    """

    def __init__(self, fmt: Format) -> None:
        self.format = fmt
        self._sink: Optional[_AppendOnly] = None
        self._file: Optional[soundfile.SoundFile] = None
        self._whole = io.BytesIO() if not fmt.streams else None
        if fmt.container is not None:
            self._sink = _AppendOnly()
            target = self._whole if self._whole is not None else self._sink
            self._file = _open(target, fmt)
        self._first = fmt.container == "MP3"

    @property
    def cheap(self) -> bool:
        """True when encoding is a copy (pcm, wav): no need to leave the event loop for it."""
        return self._file is None

    def header(self) -> bytes:
        """The bytes before any audio."""
        if self.format.name == "wav":
            return wav_header(OUTPUT.rate, OUTPUT.width, OUTPUT.channels)
        return self._drain()

    def encode(self, pcm: bytes) -> bytes:
        """The bytes of one chunk of audio (possibly none yet: encoders work in frames and pages)."""
        if self._file is None:
            return pcm
        self._file.buffer_write(pcm, dtype="int16")
        return self._drain()

    def close(self) -> bytes:
        """The last bytes (the encoder's tail; the whole file for a format that does not stream)."""
        if self._file is None:
            return b""
        self._file.close()
        if self._whole is not None:
            return self._whole.getvalue()
        return self._drain()

    def _drain(self) -> bytes:
        if self._sink is None or self._whole is not None:
            return b""
        data = self._sink.take()
        if self._first and data:
            self._first = False
            data = _skip_placeholder(data)
        return data


def _open(target: io.RawIOBase | io.BytesIO, fmt: Format) -> soundfile.SoundFile:
    """A libsndfile writer for `fmt` into `target`."""
    args: dict[str, Any] = dict(
        samplerate=OUTPUT.rate, channels=OUTPUT.channels, format=fmt.container, subtype=fmt.subtype
    )
    if fmt.container == "MP3":
        # Constant bit rate (80 kbit/s at 24 kHz): a stream has no Info tag, so players estimate its length from the
        # first frame's rate. libsndfile applies the mode only together with a compression level.
        try:
            return soundfile.SoundFile(target, "w", bitrate_mode="CONSTANT", compression_level=0.5, **args)
        except TypeError:  # soundfile before 0.13 cannot choose it
            pass
    return soundfile.SoundFile(target, "w", **args)


def _skip_placeholder(data: bytes) -> bytes:
    """MP3: LAME starts with an empty frame that it fills with the Info tag at close (a stream cannot go back to
    it); left empty it misleads decoders about the bit rate, so the stream starts at the first audio frame."""
    if len(data) > 4 and data[0] == 0xFF and not any(data[4:16]):
        end = 4
        while end < len(data) and data[end] == 0:
            end += 1
        return data[end:]
    return data
