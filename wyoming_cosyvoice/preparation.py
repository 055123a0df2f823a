"""Keeps the engine's prepared voices in step with the catalog while the server runs (hot reload).

Every `describe` refreshes the catalog (in a thread); profiles that are new or changed (any field, or the reference
file's modification time or size) are checked and prepared in the background: the reference audio is validated and
normalized on a thread, then `prepare([profile])` runs on the engine that serves it. A reference file modified in
the last `SETTLE_AGE` seconds is used only when two looks `SETTLE_GAP` apart see the same size and modification
time (a file still being copied in is neither listed nor prepared; a changed voice keeps its previous version until
then). Normalized copies in the reference cache that no voice uses any more are deleted. A profile whose engine is not
running is broken at once. A broken profile is logged once (per version of it) and left out of `describe` and voice
resolution; the others keep working. Unchanged profiles are not prepared again. When a profile is removed or changed,
the engine that prepared it is told to `forget` it (before it is prepared again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Optional

from . import refcache
from .aio import TaskSet, wait_within
from .engine import Engine, ThreadedEngine, worker_call_timeout
from .errors import CacheUnwritable, CosyVoiceServiceError, EngineTimeout, VoiceNotFound
from .metrics import Metrics
from .reference import ReferenceInfo, default_cache_dir, profile_reference
from .routing import Engines
from .voices import STALE_CACHE_HINT, VoiceCatalog, VoiceProfile, file_stamp, problem_line

_LOGGER = logging.getLogger(__name__)

_Stamp = tuple[int, int]
_Fingerprint = tuple[str, Optional[_Stamp]]

SETTLE_AGE = 2.0
"""A reference file last modified longer ago than this (seconds) is taken as complete."""

SETTLE_GAP = 0.25
"""A more recently modified one must show the same size and modification time on two looks this far apart."""

RETRY_FIRST_S = 5.0
"""A voice broken by this machine (a cache it cannot write, a full disk) is prepared again after this long..."""

RETRY_MAX_S = 300.0
"""...then after twice as long each time, up to this."""


def fingerprint(profile: VoiceProfile) -> _Fingerprint:
    """What must change for a profile to be prepared again: its fields and its reference file's mtime/size."""
    stamp = file_stamp(profile.reference_audio) if profile.reference_audio is not None else None
    return repr(profile), stamp


class VoicePreparer:
    """Checks and prepares new or changed profiles off the event loop; marks broken ones in the catalog.

    Its size (over the ~300 lines the layout asks for): scanning, preparing, waiting requests that follow a changed
    voice and retrying voices broken by the machine all read and change the same per-voice state under one lock."""

    def __init__(
        self,
        catalog: VoiceCatalog,
        engines: Engines,
        cache_dir: Optional[Path] = None,
        *,
        timeout: Optional[float] = None,
        max_reference_seconds: Optional[float] = None,
        metrics: Optional[Metrics] = None,
    ) -> None:
        self.catalog = catalog
        self.max_reference_seconds = max_reference_seconds
        """Longest reference recording accepted (`limits.max_reference_seconds`), checked before it is read."""
        self.timeout = timeout
        """Seconds one voice's preparation may take (`limits.engine_timeout_s`); beyond it the voice is broken."""
        self.engines = engines
        """The running engines; each profile is prepared by the one that serves it."""
        self.metrics = metrics or Metrics()
        """Counts each preparation's outcome."""
        self.engine = self.engines.main
        self.cache_dir = cache_dir
        self.references: dict[str, ReferenceInfo] = {}
        """Validation results of the prepared profiles' reference audio, by voice name."""
        self._seen: dict[str, _Fingerprint] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._prepared_by: dict[str, Engine] = {}  # who to tell when a profile goes away
        self._forgetting = TaskSet()
        self._scan: Optional["asyncio.Future[None]"] = None
        self._looks: dict[Path, tuple[_Stamp, float]] = {}  # reference file -> (stamp, when first seen so)
        self._settling: set[str] = set()  # new voices whose reference is still being written
        self._normalized: dict[str, Path] = {}  # voice -> its normalized reference in the cache
        self._versions: dict[str, VoiceProfile] = {}  # voice -> the version prepared, or being prepared
        self._retries: dict[str, tuple[float, asyncio.TimerHandle]] = {}  # voice -> (its last delay, the timer)

    async def prepare_all(self) -> None:
        """Startup: check and prepare every loaded profile, one at a time (one bad profile stops nothing)."""
        await asyncio.to_thread(refcache.check, self.cache_dir or default_cache_dir())  # one line when unwritable
        profiles = self.catalog.all_profiles
        stamps, unsettled = await asyncio.to_thread(self._stamps, profiles, {})
        for profile in profiles:
            if profile.name in unsettled:
                self._settle_later(profile)
                continue
            self._seen[profile.name] = stamps[profile.name]
            self._versions[profile.name] = profile
            if not self._unservable(profile):
                await self._prepare(profile)

    def recheck(self) -> None:
        """Mark the profiles whose engine stopped being available (an extra engine failed its warm-up) broken."""
        for profile in self.catalog.all_profiles:
            if profile.name not in self.catalog.broken:
                self._unservable(profile)

    def _unservable(self, profile: VoiceProfile) -> bool:
        """True (and the profile marked broken) when no running engine serves it."""
        problem = self.engines.problem(profile)
        if problem is None:
            return False
        self._broken(profile.name, problem_line(profile.source, profile.name, problem))
        return True

    async def refresh(self) -> list[VoiceProfile]:
        """Rescan the providers off the event loop, start preparing new or changed profiles; the usable ones.

        One scan at a time: callers that arrive while one runs share its result (several describes at once).
        """
        if self._scan is None or self._scan.done():
            self._scan = asyncio.ensure_future(self._rescan())
        await asyncio.shield(self._scan)
        return self.catalog.profiles

    async def _rescan(self) -> None:
        stamps, unsettled = await asyncio.to_thread(self._look, dict(self._seen))
        self._apply(stamps, unsettled)

    def _look(self, seen: dict[str, _Fingerprint]) -> tuple[dict[str, _Fingerprint], set[str]]:
        """Blocking (a thread): reload every provider (file scans, YAML), fingerprint each profile, settle checks."""
        self.catalog.refresh()
        return self._stamps(self.catalog.all_profiles, seen)

    def _stamps(
        self, profiles: list[VoiceProfile], seen: dict[str, _Fingerprint]
    ) -> tuple[dict[str, _Fingerprint], set[str]]:
        """Blocking: each profile's fingerprint, and the changed ones whose reference file is still being written."""
        stamps = {p.name: fingerprint(p) for p in profiles}
        now, mono = time.time(), time.monotonic()
        fresh: dict[str, tuple[Path, _Stamp]] = {}
        for profile in profiles:
            name, path = profile.name, profile.reference_audio
            stamp = stamps[name][1]
            if path is None or stamp is None or stamp[0] < 0 or seen.get(name) == stamps[name]:
                continue
            if now - stamp[0] / 1e9 >= SETTLE_AGE:
                continue
            earlier = self._looks.get(path)
            if earlier is not None and earlier[0] == stamp and mono - earlier[1] >= SETTLE_GAP:
                continue  # a look at least SETTLE_GAP ago saw it the same
            if earlier is None or earlier[0] != stamp:
                self._looks[path] = (stamp, mono)
            fresh[name] = (path, stamp)
        unsettled: set[str] = set()
        if fresh:
            time.sleep(SETTLE_GAP)  # the second look (in a thread: only this describe waits)
            for name, (path, stamp) in fresh.items():
                again = file_stamp(path)
                if again != stamp:
                    unsettled.add(name)
                    self._looks[path] = (again, time.monotonic())
        for path in [p for p in self._looks if now - self._looks[p][0][0] / 1e9 >= SETTLE_AGE]:
            del self._looks[path]
        return stamps, unsettled

    def _settle_later(self, profile: VoiceProfile) -> None:
        """Leave a new voice out until its reference file has settled (a later describe looks again)."""
        if profile.name not in self._settling:
            self._settling.add(profile.name)
            _LOGGER.info(
                "Voice %r: %s is still being written; used once it settles", profile.name, profile.reference_audio
            )
        self.catalog.broken[profile.name] = problem_line(
            profile.source, profile.name, "reference audio is still being written; try again in a moment"
        )

    def _apply(self, stamps: dict[str, _Fingerprint], unsettled: set[str]) -> None:
        """On the loop: forget removed profiles, start preparing new or changed ones whose files have settled."""
        current = {p.name: p for p in self.catalog.all_profiles}
        for name in [n for n in self._seen if n not in current]:
            _LOGGER.info("Voice %r removed", name)
            self._forget(name)
            self._retire(self._normalized.pop(name, None))
        for name in [n for n in self._settling if n not in current]:
            self._settling.discard(name)
            self.catalog.broken.pop(name, None)
        for name, profile in current.items():
            stamp = stamps.get(name)
            if stamp is None:  # appeared after the look (a concurrent refresh): the next describe sees it
                continue
            if self._seen.get(name) == stamp:
                continue
            if name in unsettled:
                if name not in self._seen:
                    self._settle_later(profile)
                continue  # a changed voice keeps its previous version until the new file has settled
            self._settling.discard(name)
            if name in self._seen:
                _LOGGER.info("Voice %r changed; preparing it again. %s", name, STALE_CACHE_HINT)
            else:
                _LOGGER.info("Voice %r added; preparing it", name)
            forgotten = self._forget(name)
            self._seen[name] = stamp
            self._versions[name] = profile
            if self._unservable(profile):
                continue
            self._tasks[name] = asyncio.create_task(self._prepare(profile, forgotten), name=f"prepare voice {name}")

    def _retire(self, normalized: Optional[Path]) -> None:
        """Delete a normalized reference (and its sidecar) from the cache unless another voice still uses it."""
        if normalized is None or normalized in self._normalized.values():
            return

        def delete() -> None:
            for path in (normalized, normalized.with_suffix(".json")):
                with contextlib.suppress(OSError):
                    path.unlink()

        # Waited for (wait_idle) and cancelled (close) like the engine's forgetting.
        self._forgetting.add(asyncio.ensure_future(asyncio.to_thread(delete)))

    def _forget(self, name: str) -> Optional["asyncio.Task[None]"]:
        """Drop what is known about `name`; the task telling its engine to forget it, if one prepared it."""
        self._seen.pop(name, None)
        self._versions.pop(name, None)
        self.catalog.broken.pop(name, None)
        self.references.pop(name, None)
        task = self._tasks.pop(name, None)
        if task is not None and not task.done():
            task.cancel()
        retry = self._retries.pop(name, None)
        if retry is not None:
            retry[1].cancel()
        engine = self._prepared_by.pop(name, None)
        if engine is None:
            return None
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # not serving (a command): the engine is not running either
            return None
        return self._forgetting.add(asyncio.create_task(self._tell_forget(engine, name), name=f"forget voice {name}"))

    async def _tell_forget(self, engine: Engine, name: str) -> None:
        try:
            await engine.forget([name])
        except asyncio.CancelledError:
            raise
        except Exception as err:  # stale data kept is a leak, not a reason to stop serving
            _LOGGER.warning("engine %s could not forget voice %r: %s: %s", engine.name, name, type(err).__name__, err)

    async def ready(self, profile: VoiceProfile) -> VoiceProfile:
        """Wait until `profile` is prepared (requests right after a change); the version of it to speak with.

        A waiting request follows its voice: changed meanwhile, it waits for the new version's preparation;
        removed meanwhile, or broken, VoiceNotFound.
        """
        name, waited = profile.name, False
        while True:
            task = self._tasks.get(name)
            if task is None or task.done():
                break
            waited = True
            # Not `shield`: a preparation cancelled because the voice changed must not cancel this request.
            await asyncio.wait({task})
        current = self._versions.get(name)
        if current is None and waited:
            raise VoiceNotFound(f"voice {name!r} was removed while the request waited for it")
        problem = self.catalog.broken.get(name)
        if problem is not None:
            raise VoiceNotFound(f"{problem} (voice unavailable)")
        return current or profile

    def preparing(self) -> set[str]:
        """Names of the profiles being checked and prepared right now."""
        return {name for name, task in self._tasks.items() if not task.done()}

    async def wait_idle(self) -> None:
        """Wait for every preparation in progress, and what those start (cache pruning), to finish (tests, shutdown)."""
        while True:
            pending = [t for t in [*self._tasks.values(), *self._forgetting] if not t.done()]
            if not pending:
                return
            await asyncio.gather(*pending, return_exceptions=True)

    async def close(self) -> None:
        """Cancel preparations still running (shutdown: the engine is about to close)."""
        for _delay, timer in self._retries.values():
            timer.cancel()
        pending = [t for t in [*self._tasks.values(), *self._forgetting, self._scan] if t is not None and not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def _prepare(self, profile: VoiceProfile, forgotten: Optional["asyncio.Task[None]"] = None) -> None:
        engine = self.engines.engine_for(profile)
        retrying = profile.name in self._retries  # its first failure was logged; a success is worth a line
        try:
            if forgotten is not None:  # the engine drops the old version before it prepares the new one
                await asyncio.shield(forgotten)  # a newer change cancels this task, not the forgetting
            checked = await wait_within(
                asyncio.to_thread(profile_reference, profile, self.cache_dir, self.max_reference_seconds), self.timeout
            )
            self._prepared_by[profile.name] = engine  # set before: a failed preparation may leave data behind
            if isinstance(engine, ThreadedEngine):
                # Bounded per worker call, from when the worker starts it (not while it waits behind synthesis); a
                # call that overruns replaces the worker thread, so the engine is not blocked behind it.
                with worker_call_timeout(self.timeout):
                    await engine.prepare([profile])
            else:
                await wait_within(engine.prepare([profile]), self.timeout)
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            problem = problem_line(
                profile.source,
                profile.name,
                f"preparation did not finish within {self.timeout:g} s (limits.engine_timeout_s)",
            )
        except EngineTimeout as err:
            problem = problem_line(profile.source, profile.name, f"preparation {err}")
        except CosyVoiceServiceError as err:
            text = str(err)
            if isinstance(err, CacheUnwritable):
                text += self._retry_later(profile)
            problem = text if f"voice {profile.name!r}" in text else problem_line(profile.source, profile.name, text)
        except OSError as err:  # the engine's own files (a full disk, a read-only cache): retried
            problem = problem_line(
                profile.source,
                profile.name,
                f"engine {engine.name} could not prepare it: {type(err).__name__}: {err}{self._retry_later(profile)}",
            )
        except Exception as err:  # an engine may raise anything; one voice must not take the server down
            problem = problem_line(
                profile.source,
                profile.name,
                f"engine {engine.name} could not prepare it: {type(err).__name__}: {err}",
            )
        else:
            old = self._normalized.pop(profile.name, None)
            if checked is not None:
                self._normalized[profile.name] = checked[0]
                self.references[profile.name] = checked[1]
            self._retire(old)
            if checked is not None:
                for warning in checked[1].warnings:
                    _LOGGER.warning("%s", problem_line(profile.source, profile.name, f"reference audio: {warning}"))
            self.catalog.broken.pop(profile.name, None)
            self.metrics.voice_prepared("ok")
            if self._retries.pop(profile.name, None) is not None:
                _LOGGER.info("Voice %r prepared on a later try; available again", profile.name)
            return
        self._retire(self._normalized.pop(profile.name, None))
        self._broken(profile.name, problem, quiet=retrying)
        self.metrics.voice_prepared("broken")

    def _retry_later(self, profile: VoiceProfile) -> str:
        """Prepare `profile` again later (it failed because of this machine, which may be fixed); says when."""
        previous = self._retries.pop(profile.name, None)
        delay = RETRY_FIRST_S if previous is None else min(previous[0] * 2, RETRY_MAX_S)
        if previous is not None:
            previous[1].cancel()
        timer = asyncio.get_running_loop().call_later(delay, self._retry, profile, self._seen.get(profile.name))
        self._retries[profile.name] = (delay, timer)
        return f" (tried again in {delay:g} s)"

    def _retry(self, profile: VoiceProfile, seen: Optional[_Fingerprint]) -> None:
        """The timer of `_retry_later`: prepare the same version of the voice again (a changed one already was)."""
        name = profile.name
        if self._seen.get(name) != seen or name not in self.catalog.broken:
            return
        task = self._tasks.get(name)
        if task is not None and not task.done():
            return
        self._tasks[name] = asyncio.create_task(self._prepare(profile), name=f"prepare voice {name} again")

    def _broken(self, name: str, problem: str, quiet: bool = False) -> None:
        """Leave `name` out of describe and resolution with `problem` as the reason; logged once per version
        (`quiet`: a later try of a version that failed already, logged at debug level)."""
        self.catalog.broken[name] = problem
        _LOGGER.log(logging.DEBUG if quiet else logging.WARNING, "%s (voice skipped)", problem)
