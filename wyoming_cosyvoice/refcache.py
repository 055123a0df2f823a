"""Where normalized references are written: the cache folder, else (read-only, full, not a folder) a temporary one.

A cache that cannot be written is a problem of this machine, not of any voice: it is said once, with the reason,
and the references go to a temporary folder (deleted at exit) so every voice keeps working. Only when that cannot
be written either does a voice fail, with `CacheUnwritable`, which the preparer retries (the cause may be fixed).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Mapping, Optional, Sequence

from .errors import CacheUnwritable

_LOGGER = logging.getLogger(__name__)

_PROBE_BYTES = 64 * 1024
"""Written and removed by `check`: enough to find a disk that is nearly full, not only a read-only one."""

_fallbacks: dict[Path, Path] = {}  # cache folder -> the temporary folder used instead
_lock = threading.Lock()


def _reason(err: OSError) -> str:
    return err.strerror or str(err) or type(err).__name__


def _write_atomic(target: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_all(folder: Path, files: Mapping[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        _write_atomic(folder / name, data)


def _fallback(cache: Path, reason: str) -> Path:
    """The temporary folder standing in for `cache` (made, and the switch logged, the first time)."""
    with _lock:
        temp = _fallbacks.get(cache)
        if temp is not None:
            return temp
        try:
            temp = Path(tempfile.mkdtemp(prefix="wyoming-cosyvoice-references-"))
        except OSError as err:
            raise CacheUnwritable(
                f"the reference cache {cache} cannot be written ({reason}), nor a temporary folder ({_reason(err)})"
            ) from None
        _fallbacks[cache] = temp
        atexit.register(shutil.rmtree, temp, ignore_errors=True)
    _LOGGER.warning(
        "Reference cache %s cannot be written (%s): normalized references go to %s until a restart "
        "(fix the folder's permissions or free space, or set WYOMING_COSYVOICE_CACHE)",
        cache,
        reason,
        temp,
    )
    return temp


def check(cache: Path) -> Optional[str]:
    """At start-up: write and remove a small file in `cache`; the reason it cannot be written (None: it can).

    When it cannot, the temporary folder is chosen now, and logged in one line.
    """
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache) as probe:  # a full disk refuses the write itself (no fsync needed)
            probe.write(b"\0" * _PROBE_BYTES)
            probe.flush()
    except OSError as err:
        reason = _reason(err)
        try:
            _fallback(cache, reason)
        except CacheUnwritable as problem:
            _LOGGER.warning("%s: voices with a reference recording fail until one can (they are retried)", problem)
        return reason
    return None


def holding(cache: Path, names: Sequence[str]) -> Path:
    """The folder (the cache, else its temporary stand-in) that holds all of `names`; the cache when neither does."""
    temp = _fallbacks.get(cache)
    for folder in (cache, temp):
        if folder is not None and all((folder / name).is_file() for name in names):
            return folder
    return cache


def write(cache: Path, files: Mapping[str, bytes]) -> Path:
    """Write `files` (name -> bytes) atomically into `cache`, else its temporary stand-in; the folder used.

    Raises CacheUnwritable (naming both folders and why) when neither can be written.
    """
    try:
        _write_all(cache, files)
        return cache
    except OSError as err:
        reason = _reason(err)
    temp = _fallback(cache, reason)
    try:
        _write_all(temp, files)
    except OSError as err:
        raise CacheUnwritable(
            f"the reference cache {cache} cannot be written ({reason}), nor the temporary folder {temp} "
            f"({_reason(err)})"
        ) from None
    return temp
