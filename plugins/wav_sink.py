"""`wav` sink: writes each stream to a WAV file as audio arrives, atomically (temporary name, rename on finish)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from wyoming_cosyvoice.audio import AudioFormat
from wyoming_cosyvoice.errors import SinkError
from wyoming_cosyvoice.hookspecs import Register, hookimpl
from wyoming_cosyvoice.sinks import StreamInfo

_LOGGER = logging.getLogger(__name__)

_SUBTYPES = {1: "PCM_U8", 2: "PCM_16", 4: "PCM_32"}

STALE_PART_SECONDS = 600.0
"""A `.part` file nobody has written to for this long is left over from a killed process (a live stream writes every
chunk)."""

_PART = re.compile(r"\..+\.(\d+)\.part")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def sweep_stale_parts(folder: Path, max_age: float = STALE_PART_SECONDS) -> list[Path]:
    """Delete the `.part` files a killed writer left in `folder`: its process is gone, or nothing wrote to it for
    `max_age` seconds. Returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:  # no archive folder yet
        return removed
    now = time.time()
    for path in entries:
        match = _PART.fullmatch(path.name)
        if match is None:
            continue
        pid = int(match.group(1))
        try:
            age = now - path.stat().st_mtime
            if age > max_age or (pid != os.getpid() and not _running(pid)):
                path.unlink()
                removed.append(path)
        except OSError:
            continue
    if removed:
        _LOGGER.warning("wav sink: removed %d partial file(s) left in %s by a killed process", len(removed), folder)
    return removed


@dataclass(frozen=True)
class WavSettings:
    """`sinks.wav` settings (server) or `--sink wav:PATH` / `--out PATH` (client)."""

    path: Optional[Path] = None
    """Write every stream to this one file (the client's `--out`)."""

    dir: Optional[Path] = None
    """Write each stream to a new file in this folder, named `{time}-{label}-{voice}.wav` (server archive)."""

    overwrite: bool = False
    """Replace an existing file; otherwise an existing file is an error and is left alone."""

    def validate(self) -> Optional[tuple[str, str]]:
        """Exactly one of path and dir."""
        if (self.path is None) == (self.dir is None):
            return ("path", "set exactly one of 'path' (one file) or 'dir' (a file per reply)")
        if self.path is not None and self.path.suffix.lower() != ".wav":
            return ("path", f"expected a .wav file name, got {str(self.path)!r}")
        return None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:40] or "x"


class _WavStream:
    """One file being written; all file I/O runs in worker threads so the event loop never waits on the disk."""

    def __init__(self, final: Path, fmt: AudioFormat, overwrite: bool) -> None:
        self.final = final
        self.fmt = fmt
        self.overwrite = overwrite
        self.tmp = final.with_name(f".{final.name}.{os.getpid()}.part")
        self.frames = 0
        self._file: Any = None
        self._lock = threading.Lock()  # a cancelled write may still be running in its thread when close starts

    def _open(self) -> None:
        import soundfile

        self.final.parent.mkdir(parents=True, exist_ok=True)
        self._file = soundfile.SoundFile(
            str(self.tmp),
            "w",
            samplerate=self.fmt.rate,
            channels=self.fmt.channels,
            subtype=_SUBTYPES[self.fmt.width],
            format="WAV",
        )

    def _write(self, pcm: bytes) -> None:
        with self._lock:
            if self._file is not None:
                try:
                    self._append(pcm)
                except BaseException:
                    self._discard()  # a failed write (disk full) leaves no partial file behind
                    raise

    def _discard(self) -> None:
        """Close and delete the temporary file (called with the lock held)."""
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except Exception:  # noqa: BLE001 - the file is deleted anyway
                pass
        try:
            self.tmp.unlink()
        except OSError:
            pass

    def _append(self, pcm: bytes) -> None:
        import numpy as np

        dtype: Any = {1: np.uint8, 2: "<i2", 4: "<i4"}[self.fmt.width]
        usable = len(pcm) - len(pcm) % self.fmt.frame_bytes
        data = np.frombuffer(pcm[:usable], dtype=dtype).reshape(-1, self.fmt.channels)
        if self.fmt.width == 1:
            # libsndfile takes signed data; 8-bit WAV is unsigned on disk, so shift into int16.
            data = ((data.astype(np.int16) - 128) << 8).astype(np.int16)
        self._file.buffer_write(data.tobytes(), dtype=_BUFFER_DTYPES[self.fmt.width])
        self.frames += len(data)

    def _finish(self) -> None:
        """Close (libsndfile writes the final header) and move into place without clobbering unless allowed."""
        with self._lock:
            if self._file is None:
                return
            try:
                self._file.close()
            except BaseException:
                self._discard()
                raise
            self._file = None
        if self.overwrite:
            os.replace(self.tmp, self.final)
            return
        try:
            os.link(self.tmp, self.final)  # fails if the name exists: no silent overwrite, even in a race
            os.unlink(self.tmp)
        except FileExistsError:
            raise SinkError(f"{self.final} exists (appeared while writing); audio kept in {self.tmp}") from None
        except OSError:
            if self.final.exists():
                raise SinkError(f"{self.final} exists; audio kept in {self.tmp}") from None
            os.replace(self.tmp, self.final)  # file systems without hard links

    async def start(self) -> None:
        await asyncio.to_thread(self._open)

    async def write(self, pcm: bytes) -> None:
        """Append a chunk to the file."""
        await asyncio.to_thread(self._write, pcm)

    async def close(self, ok: bool) -> str:
        """Finish the file; an aborted stream still leaves a valid WAV of the audio received."""
        await asyncio.to_thread(self._finish)
        seconds = self.frames / self.fmt.rate
        state = "" if ok else " (stream interrupted; kept the audio received)"
        return f"wrote {self.final} ({seconds:.2f} s){state}"


_BUFFER_DTYPES = {1: "int16", 2: "int16", 4: "int32"}


class WavSink:
    """Writes each audio stream to a WAV file."""

    def __init__(self, settings: WavSettings) -> None:
        self.settings = settings
        target = settings.path if settings.path is not None else settings.dir
        self.name = f"wav:{target}"
        if settings.path is not None and settings.path.exists() and not settings.overwrite:
            raise SinkError(f"{settings.path} exists; pass --overwrite (or overwrite: true) to replace it")
        if settings.dir is not None:
            sweep_stale_parts(settings.dir)  # an archive outlives the processes writing to it

    def _target(self, info: StreamInfo) -> Path:
        if self.settings.path is not None:
            return self.settings.path
        assert self.settings.dir is not None
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(info.started))
        stem = "-".join([stamp, _safe(info.label)] + ([_safe(info.voice)] if info.voice else []))
        path = self.settings.dir / f"{stem}.wav"
        n = 1
        while path.exists():  # an archive never replaces an earlier reply
            n += 1
            path = self.settings.dir / f"{stem}-{n}.wav"
        return path

    def _free_target(self, info: StreamInfo) -> Path:
        final = self._target(info)
        if final.exists() and not self.settings.overwrite:
            raise SinkError(f"{final} exists; pass --overwrite (or overwrite: true) to replace it")
        return final

    async def open(self, fmt: AudioFormat, info: StreamInfo) -> _WavStream:
        """Create the temporary file for one stream."""
        if fmt.width not in _SUBTYPES:
            raise SinkError(f"{self.name}: cannot write {fmt.width}-byte samples")
        final = await asyncio.to_thread(self._free_target, info)  # stat calls: off the event loop
        stream = _WavStream(final, fmt, self.settings.overwrite)
        await stream.start()
        return stream


@hookimpl
def register_sinks(register: Register) -> None:
    """Register the `wav` sink."""
    register("wav", lambda section: WavSink(section.parse(WavSettings)), spec_key="path")
