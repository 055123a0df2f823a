"""Keeps the engine's prepared voices in step with the catalog while the server runs (hot reload).

Every `describe` refreshes the catalog; profiles that are new or changed (any field, or the reference file's
modification time or size) are checked and prepared in the background: the reference audio is validated and
normalized on a thread, then `engine.prepare([profile])` runs. A broken profile is logged once (per version of it)
and left out of `describe` and voice resolution; the others keep working. Unchanged profiles are not prepared again.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Optional

from .engine import Engine
from .errors import CosyVoiceServiceError, VoiceNotFound
from .reference import ReferenceInfo, profile_reference
from .voices import VoiceCatalog, VoiceProfile, problem_line

_LOGGER = logging.getLogger(__name__)

_Fingerprint = tuple[str, Optional[tuple[int, int]]]


def fingerprint(profile: VoiceProfile) -> _Fingerprint:
    """What must change for a profile to be prepared again: its fields and its reference file's mtime/size."""
    stamp: Optional[tuple[int, int]] = None
    if profile.reference_audio is not None:
        try:
            stat = profile.reference_audio.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            stamp = (-1, -1)
    return repr(profile), stamp


class VoicePreparer:
    """Checks and prepares new or changed profiles off the event loop; marks broken ones in the catalog."""

    def __init__(self, catalog: VoiceCatalog, engine: Engine, cache_dir: Optional[Path] = None) -> None:
        self.catalog = catalog
        self.engine = engine
        self.cache_dir = cache_dir
        self.references: dict[str, ReferenceInfo] = {}
        """Validation results of the prepared profiles' reference audio, by voice name."""
        self._seen: dict[str, _Fingerprint] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def prepare_all(self) -> None:
        """Startup: check and prepare every loaded profile, one at a time (one bad profile stops nothing)."""
        for profile in self.catalog.all_profiles:
            self._seen[profile.name] = fingerprint(profile)
            await self._prepare(profile)

    def sync(self) -> list[VoiceProfile]:
        """Refresh the catalog, start preparing new or changed profiles, and return the usable ones."""
        self.catalog.refresh()
        current = {p.name: p for p in self.catalog.all_profiles}
        for name in [n for n in self._seen if n not in current]:
            _LOGGER.info("Voice %r removed", name)
            self._forget(name)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # not serving (a command or a synchronous caller): nothing to schedule
            return self.catalog.profiles
        for name, profile in current.items():
            stamp = fingerprint(profile)
            if self._seen.get(name) == stamp:
                continue
            if name in self._seen:
                _LOGGER.info("Voice %r changed; preparing it again", name)
            else:
                _LOGGER.info("Voice %r added; preparing it", name)
            self._forget(name)
            self._seen[name] = stamp
            self._tasks[name] = asyncio.create_task(self._prepare(profile), name=f"prepare voice {name}")
        return self.catalog.profiles

    def _forget(self, name: str) -> None:
        self._seen.pop(name, None)
        self.catalog.broken.pop(name, None)
        self.references.pop(name, None)
        task = self._tasks.pop(name, None)
        if task is not None and not task.done():
            task.cancel()

    async def ready(self, profile: VoiceProfile) -> None:
        """Wait until `profile` is prepared (requests right after a change); VoiceNotFound when it is broken."""
        task = self._tasks.get(profile.name)
        if task is not None and not task.done():
            await asyncio.shield(task)
        problem = self.catalog.broken.get(profile.name)
        if problem is not None:
            raise VoiceNotFound(f"{problem} (voice unavailable)")

    async def wait_idle(self) -> None:
        """Wait for every preparation in progress (tests, shutdown)."""
        pending = [t for t in self._tasks.values() if not t.done()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def close(self) -> None:
        """Cancel preparations still running (shutdown: the engine is about to close)."""
        pending = [t for t in self._tasks.values() if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def _prepare(self, profile: VoiceProfile) -> None:
        try:
            checked = await asyncio.to_thread(profile_reference, profile, self.cache_dir)
            await self.engine.prepare([profile])
        except asyncio.CancelledError:
            raise
        except CosyVoiceServiceError as err:
            text = str(err)
            problem = text if f"voice {profile.name!r}" in text else problem_line(profile.source, profile.name, text)
        except Exception as err:  # an engine may raise anything; one voice must not take the server down
            problem = problem_line(
                profile.source,
                profile.name,
                f"engine {self.engine.name} could not prepare it: {type(err).__name__}: {err}",
            )
        else:
            if checked is not None:
                self.references[profile.name] = checked[1]
                for warning in checked[1].warnings:
                    _LOGGER.warning("%s", problem_line(profile.source, profile.name, f"reference audio: {warning}"))
            self.catalog.broken.pop(profile.name, None)
            return
        self.catalog.broken[profile.name] = problem
        _LOGGER.warning("%s (voice skipped)", problem)
