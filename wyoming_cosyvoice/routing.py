"""Which engine serves which voice profile: the main engine, the extra engines profiles name, and those that failed.

Engines are started once, at startup: the configured one (or its fallback) serves every profile without an `engine`
field; every other engine named by a profile's `engine` field is started from its own `engines.<name>` section. An
extra engine that cannot start makes only its profiles unusable; engines are never started while serving.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterable, Optional

from .config import Config
from .engine import Engine
from .errors import CosyVoiceServiceError, EngineNotConfigured, EngineUnavailable, PluginError, VoiceNotFound
from .plugins import Plugins
from .voices import VoiceProfile, problem_line

_LOGGER = logging.getLogger(__name__)


class Engines:
    """The running engines by registered name, the main one, and why the others named in config could not start."""

    def __init__(self, main: Engine, main_name: Optional[str] = None, note: str = "") -> None:
        self.main = main
        """Serves every profile without an `engine` field (the configured engine, or its fallback)."""
        self.main_name = main_name or main.name
        """Registered name of the main engine."""
        self.running: dict[str, Engine] = {self.main_name: main}
        """Started engines by registered name, the main one first."""
        self.failed: dict[str, str] = {}
        """Engines that could not start here: name -> why (one line)."""
        self.note = note
        """Why the main engine is not the configured one (fallback), shown in `info`."""
        self.fallback_from: Optional[str] = None
        """The configured engine that could not start when the main one is its fallback."""
        self.fallback: Optional[Engine] = None
        """`engine.fallback` running beside the main engine: it speaks what another engine cannot (busy past
        `server.busy_wait_s`, failed); None when the main engine is the fallback, or none is configured."""

    @classmethod
    async def start(cls, config: Config, plugins: Plugins, wanted: Iterable[str] = ()) -> Engines:
        """Start the configured engine (or the fallback when it cannot start here), then every other engine in
        `wanted`; one of those that cannot start is recorded in `failed` and makes only its voices unusable."""
        name = config.engine.name
        try:
            main = await _start(config, plugins, name)
            engines = cls(main, name)
        except (EngineUnavailable, PluginError) as err:
            fallback = config.engine.fallback
            if not fallback or fallback == name:
                raise
            hint = plugins.registry["engines"].get(name)
            # Never set up (a fresh install) is the expected way to run without a GPU: info, not a warning.
            _LOGGER.log(
                logging.INFO if isinstance(err, EngineNotConfigured) else logging.WARNING,
                "Engine %r unavailable (%s); serving with the embedded %r engine.%s Settings: %s",
                name,
                err,
                fallback,
                f" {hint.setup_hint}" if hint and hint.setup_hint else "",
                config.source,
            )
            engines = cls(await _start(config, plugins, fallback), fallback, note=f"fallback from {name}: {err}")
            engines.fallback_from = name
            engines.failed[name] = str(err)  # a profile that names it is not silently served by the fallback
        fallback = config.engine.fallback
        if fallback and fallback not in engines.running:
            wanted = [*wanted, fallback]  # started beside the main one, to speak what the others cannot
        for extra in sorted(set(wanted) - set(engines.running) - set(engines.failed)):
            try:
                engine = _create(config, plugins, extra)
            except PluginError as err:
                engines._drop(extra, str(err))
                continue
            try:
                await engine.start()
            except (EngineUnavailable, PluginError) as err:
                engines._drop(extra, str(err))
                with contextlib.suppress(Exception):
                    await engine.close()
                continue
            engines.running[extra] = engine
        if fallback and fallback != engines.main_name:
            engines.fallback = engines.running.get(fallback)
        return engines

    def fallback_for(self, engine: Engine) -> Optional[Engine]:
        """The engine that speaks a reply `engine` cannot (None: there is none besides `engine` itself)."""
        fallback = self.fallback
        return fallback if fallback is not None and fallback is not engine else None

    def problem(self, profile: VoiceProfile) -> Optional[str]:
        """Why no running engine can serve `profile` (None: one can)."""
        name = profile.engine
        if name is None or name in self.running:
            return None
        if name in self.failed:
            return f"needs engine {name}, which could not start here: {self.failed[name]}"
        return f"engine {name} is not running (restart the server to start it)"

    def engine_for(self, profile: VoiceProfile) -> Engine:
        """The engine that serves `profile`; VoiceNotFound when that engine is not running."""
        problem = self.problem(profile)
        if problem is not None:
            raise VoiceNotFound(f"{problem_line(profile.source, profile.name, problem)} (voice unavailable)")
        return self.running[profile.engine] if profile.engine else self.main

    def summary(self) -> str:
        """`espeak, tone` (running engines, main first) for log lines."""
        return ", ".join(self.running)

    def notes(self) -> list[str]:
        """Short facts about the engines besides the main one, for `info`'s program description."""
        notes = [self.note] if self.note else []
        notes += [
            f"also engine {name} ({engine.sample_rate} Hz)"
            for name, engine in self.running.items()
            if engine is not self.main
        ]
        notes += [
            f"engine {name} could not start: {why}" for name, why in self.failed.items() if name != self.fallback_from
        ]
        return notes

    async def warmup(self) -> None:
        """Warm up every engine; an extra engine that fails is closed and its profiles become unusable."""
        await self.main.warmup()
        for name, engine in list(self.running.items()):
            if engine is self.main:
                continue
            try:
                await engine.warmup()
            except CosyVoiceServiceError as err:
                self._drop(name, f"warm-up failed: {err}")
                if engine is self.fallback:
                    self.fallback = None
                await _close(engine)

    async def close(self) -> None:
        """Close every running engine (one that fails to close does not keep the others open)."""
        for engine in self.running.values():
            await _close(engine)

    def _drop(self, name: str, why: str) -> None:
        self.running.pop(name, None)
        self.failed[name] = why
        _LOGGER.error("Engine %r could not start (%s); the voices that name it are unavailable", name, why)


async def _close(engine: Engine) -> None:
    try:
        await engine.close()
    except Exception:  # shutdown goes on for the other engines
        _LOGGER.exception("Engine %s failed to close", engine.name)


def _create(config: Config, plugins: Plugins, name: str) -> Engine:
    engine: Engine = plugins.factory("engines", name)(config.section("engines", name))
    return engine


async def _start(config: Config, plugins: Plugins, name: str) -> Engine:
    engine = _create(config, plugins, name)
    await engine.start()
    return engine


def predicted_heard_as(config: Config, plugins: Plugins, profiles: Iterable[VoiceProfile]) -> dict[str, str]:
    """What a server started here with `config` would do with each profile (by name), judged without starting an
    engine (`Engine.cannot_start`): "cloned", "espeak voice for de-DE (the cosyvoice engine is not set up)", ..."""
    created: dict[str, tuple[Optional[Engine], Optional[str]]] = {}

    def engine(name: str) -> tuple[Optional[Engine], Optional[str]]:
        if name not in created:
            try:
                made = _create(config, plugins, name)
            except CosyVoiceServiceError as err:  # not registered, or bad settings
                created[name] = (None, str(err))
            else:
                why = made.cannot_start()
                created[name] = (made, None if why is None else why if why.startswith(name) else f"engine {name} {why}")
        return created[name]

    main_name, fallback_name = config.engine.name, config.engine.fallback
    engine(main_name)
    fallback, fallback_why = engine(fallback_name) if fallback_name else (None, None)
    predictions: dict[str, str] = {}
    for profile in profiles:
        wanted = profile.engine or main_name
        serving, why = engine(wanted)
        if serving is not None and why is None:
            predictions[profile.name] = serving.heard_as(profile)
        elif profile.engine is None and fallback is not None and fallback_why is None:
            predictions[profile.name] = f"{fallback.heard_as(profile)} ({why})"
        else:
            predictions[profile.name] = f"nothing: {why}"
    return predictions
