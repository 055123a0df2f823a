"""Voice profiles, the provider protocol, and how a request's voice name or language resolves to a profile."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Protocol, Sequence

from .errors import VoiceNotFound

_LOGGER = logging.getLogger(__name__)

Mode = Literal["zero_shot", "cross_lingual", "instruct", "sft"]


@dataclass(frozen=True)
class VoiceProfile:
    """One voice as clients see it (`name`, `description`, `languages`) and as engines use it."""

    name: str
    """Stable id that clients send in `synthesize.voice.name`."""

    description: str = ""
    """Human-readable label (what Home Assistant shows)."""

    languages: tuple[str, ...] = ("en-US",)
    """BCP-47 language tags the voice speaks."""

    reference_audio: Optional[Path] = None
    """Reference recording for voice cloning."""

    transcript: Optional[str] = None
    """Exact transcript of the reference recording (zero-shot mode)."""

    mode: Mode = "cross_lingual"
    """How the engine uses the reference: zero_shot, cross_lingual, instruct or sft (built-in speaker)."""

    instruct: Optional[str] = None
    """Instruction text for instruct mode (e.g. "Speak cheerfully")."""

    speaker: Optional[str] = None
    """Built-in speaker id for sft mode."""

    speed: float = 1.0
    """Speaking-rate multiplier."""

    gain: float = 1.0
    """Output volume multiplier (clipped)."""

    engine: Optional[str] = None
    """Engine that must serve this voice (None: the server's engine)."""

    default: bool = False
    """True for the profile used when a request names no voice."""

    options: Mapping[str, Any] = field(default_factory=dict)
    """Engine-specific settings (e.g. `espeak_voice`)."""

    source: str = field(default="", metadata={"config": False})
    """Where the profile was defined (file path), for messages."""


class VoiceProvider(Protocol):
    """Supplies voice profiles; `load` is called at startup and whenever the catalog refreshes."""

    def load(self) -> list[VoiceProfile]:
        """Return the current profiles (cheap enough to call on every `describe`)."""
        ...


def _lang_matches(wanted: str, languages: Sequence[str]) -> int:
    """2 for an exact tag match, 1 for a primary-subtag match, 0 for none."""
    wanted_l = wanted.lower().replace("_", "-")
    best = 0
    for lang in languages:
        lang_l = lang.lower().replace("_", "-")
        if lang_l == wanted_l:
            return 2
        if lang_l.split("-")[0] == wanted_l.split("-")[0]:
            best = 1
    return best


class VoiceCatalog:
    """All profiles from all providers, in provider order; resolves request voices predictably."""

    def __init__(self, providers: Sequence[VoiceProvider]) -> None:
        self.providers = list(providers)
        self._profiles: list[VoiceProfile] = []
        self.refresh()

    def refresh(self) -> list[VoiceProfile]:
        """Reload every provider; the first profile of a duplicated name wins (the rest are logged)."""
        seen: dict[str, VoiceProfile] = {}
        for provider in self.providers:
            for profile in provider.load():
                if profile.name in seen:
                    _LOGGER.warning(
                        "Voice %r from %s ignored: already defined in %s",
                        profile.name,
                        profile.source,
                        seen[profile.name].source,
                    )
                    continue
                seen[profile.name] = profile
        self._profiles = list(seen.values())
        return self._profiles

    @property
    def profiles(self) -> list[VoiceProfile]:
        """Current profiles in order."""
        return list(self._profiles)

    @property
    def default(self) -> Optional[VoiceProfile]:
        """The profile marked `default`, else the first one."""
        for profile in self._profiles:
            if profile.default:
                return profile
        return self._profiles[0] if self._profiles else None

    def resolve(self, name: Optional[str] = None, language: Optional[str] = None) -> VoiceProfile:
        """Pick the profile for a request (rules in the README's "Choosing a voice")."""
        if not self._profiles:
            raise VoiceNotFound("no voice profiles are configured")
        if name:
            for profile in self._profiles:
                if profile.name == name:
                    return profile
            folded = name.casefold()
            for profile in self._profiles:
                if profile.name.casefold() == folded or profile.description.casefold() == folded:
                    return profile
            known = ", ".join(p.name for p in self._profiles)
            raise VoiceNotFound(f"unknown voice {name!r} (available: {known})")
        default = self.default
        assert default is not None
        if language:
            if _lang_matches(language, default.languages) == 2:
                return default
            ranked = sorted(self._profiles, key=lambda p: -_lang_matches(language, p.languages))
            if _lang_matches(language, ranked[0].languages) == 2:
                return ranked[0]
            if _lang_matches(language, default.languages):
                return default
            if _lang_matches(language, ranked[0].languages):
                return ranked[0]
        return default
