"""Voice-profile provider reading a YAML file (`config/voices.yaml`), reloaded when the file changes."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from wyoming_cosyvoice.config import Section, build, load_yaml
from wyoming_cosyvoice.errors import ConfigError
from wyoming_cosyvoice.hookspecs import hookimpl
from wyoming_cosyvoice.voices import VoiceProfile

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class YamlVoicesSettings:
    """`voice_providers.yaml` settings."""

    path: Path = Path("voices.yaml")
    """Voices file; relative to the server config's folder."""


@dataclass(frozen=True)
class VoicesFile:
    """Top level of a voices file."""

    voices: tuple[dict, ...] = ()
    """Voice profiles, in the order clients see them."""

    default: Optional[str] = None
    """Name of the profile used when a request names no voice (default: the first)."""


class YamlVoiceProvider:
    """Profiles from one YAML file; a broken profile is logged and skipped, the others are served."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: Optional[tuple[int, int]] = None
        self._profiles: list[VoiceProfile] = []
        self.problems: list[str] = []
        """One line per profile (or file) that could not be loaded at the last read."""
        self._read(initial=True)

    def _read(self, initial: bool = False) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            if initial:
                raise ConfigError(f"{self.path}: voices file not found") from None
            _LOGGER.error("%s: voices file was removed; keeping the %d voices loaded before", self.path, len(self._profiles))
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            source = str(self.path)
            top = build(VoicesFile, load_yaml(self.path), source=source, base_dir=self.path.parent)
        except ConfigError as err:
            if initial:
                raise
            _LOGGER.error("%s; keeping the %d voices loaded before", err, len(self._profiles))
            return
        profiles: list[VoiceProfile] = []
        problems: list[str] = []
        for index, entry in enumerate(top.voices):
            try:
                profile = build(VoiceProfile, entry, source=source, key=f"voices[{index}]", base_dir=self.path.parent)
            except ConfigError as err:
                problems.append(str(err))
                _LOGGER.error("%s (voice skipped)", err)
                continue
            profiles.append(dataclasses.replace(profile, source=source))
        if top.default is not None:
            names = [p.name for p in profiles]
            if top.default not in names:
                problems.append(f"{source}:default: no voice named {top.default!r}")
                _LOGGER.error("%s:default: no voice named %r; using %s", source, top.default, names[:1])
            else:
                profiles = [dataclasses.replace(p, default=p.name == top.default) for p in profiles]
        self._profiles, self.problems = profiles, problems

    def load(self) -> list[VoiceProfile]:
        """Current profiles; rereads the file when its modification time or size changed."""
        self._read()
        return list(self._profiles)


def create_provider(section: Section) -> YamlVoiceProvider:
    """Factory: `voice_providers.yaml` settings -> provider."""
    settings = section.parse(YamlVoicesSettings)
    return YamlVoiceProvider(settings.path)


@hookimpl
def register_voice_providers(register: Callable[..., Any]) -> None:
    """Register the YAML voice provider."""
    register("yaml", create_provider)
