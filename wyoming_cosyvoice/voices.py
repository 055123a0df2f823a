"""Voice profiles, the provider protocol, and how a request's voice name or language resolves to a profile."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Protocol, Sequence

from .errors import VoiceNotFound

_LOGGER = logging.getLogger(__name__)

Mode = Literal["zero_shot", "cross_lingual", "instruct", "sft"]

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""Voice names: letters, digits, `_`, `.`, `-`; up to 64 characters (they are ids, never paths)."""

LANGUAGE_PATTERN = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*")
"""BCP-47 language tags as used here: `en`, `en-US`, `zh-Hans-CN` (`en_US` is accepted too)."""


def problem_line(source: str, name: str, problem: str) -> str:
    """The one-line form of every voice problem: file, profile, problem."""
    return f"{source or '(no file)'}: voice {name!r}: {problem}"


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

    def validate(self) -> Optional[tuple[str, str]]:
        """Check what types alone cannot: name and language syntax, ranges, what each mode needs."""
        if not NAME_PATTERN.fullmatch(self.name):
            return ("name", f"{self.name!r} is not a valid voice name (letters, digits, '_', '.', '-'; max 64)")
        if not self.languages:
            return ("languages", "at least one language is needed")
        for index, lang in enumerate(self.languages):
            if not LANGUAGE_PATTERN.fullmatch(lang):
                return (f"languages[{index}]", f"{lang!r} is not a BCP-47 language tag (like en-US or de)")
        if not 0.25 <= self.speed <= 4.0:
            return ("speed", "must be between 0.25 and 4.0")
        if not 0.0 < self.gain <= 10.0:
            return ("gain", "must be above 0 and at most 10")
        if self.mode == "zero_shot" and not (self.transcript or "").strip():
            return ("transcript", "zero_shot mode needs the transcript of the reference audio")
        if self.mode == "zero_shot" and self.reference_audio is None:
            return ("reference_audio", "zero_shot mode needs reference audio")
        if self.mode == "instruct" and not (self.instruct or "").strip():
            return ("instruct", "instruct mode needs an instruction text")
        if self.mode == "sft" and not self.speaker:
            return ("speaker", "sft mode needs a built-in speaker id")
        return None

    def reference_stamp(self) -> tuple[int, ...]:
        """The reference file's `file_stamp`, `()` without one: part of what makes an engine's prepared voice
        stale."""
        return () if self.reference_audio is None else file_stamp(Path(self.reference_audio))


def file_stamp(path: Path) -> tuple[int, int]:
    """A file as last seen: (modification time in ns, size), (-1, -1) when it cannot be read."""
    try:
        stat = path.stat()
    except OSError:
        return (-1, -1)
    return (stat.st_mtime_ns, stat.st_size)


class VoiceProvider(Protocol):
    """Supplies voice profiles; `load` is called at startup and whenever the catalog refreshes."""

    def load(self) -> list[VoiceProfile]:
        """Return the current profiles (cheap enough to call on every `describe`)."""
        ...

    # Optional: `problems: list[str]`, one line per profile the provider skipped at its last read, and
    # `notes: list[str]`, one line per optional profile left out because it is not set up (not a problem).


STALE_CACHE_HINT = (
    "Home Assistant may replay audio it cached from the old version for texts it spoke before: clear its TTS cache "
    "or save under a new name (docs/reliability.md)"
)
"""Said wherever a voice changes: HA caches replies by message, language, options and engine, not by recording."""


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
        self.broken: dict[str, str] = {}
        """Profiles found unusable after loading (bad reference audio, engine refused): name -> problem line."""
        self._duplicates_logged: set[tuple[str, str]] = set()
        self._duplicates: list[str] = []
        self.refresh()

    def refresh(self) -> list[VoiceProfile]:
        """Reload every provider; the first profile of a duplicated name wins (the rest are logged)."""
        seen: dict[str, VoiceProfile] = {}
        self._duplicates = []
        for provider in self.providers:
            for profile in provider.load():
                if profile.name in seen:
                    self._duplicates.append(
                        problem_line(
                            profile.source, profile.name, f"ignored: already defined in {seen[profile.name].source}"
                        )
                    )
                    if (profile.name, profile.source) in self._duplicates_logged:
                        continue  # refresh runs on every describe: say it once
                    self._duplicates_logged.add((profile.name, profile.source))
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
    def all_profiles(self) -> list[VoiceProfile]:
        """Every loaded profile in order, broken ones included."""
        return list(self._profiles)

    @property
    def profiles(self) -> list[VoiceProfile]:
        """Usable profiles in order (the broken ones left out)."""
        return [p for p in self._profiles if p.name not in self.broken]

    @property
    def problems(self) -> list[str]:
        """One line per profile that a provider skipped or that was found broken."""
        lines = [line for provider in self.providers for line in getattr(provider, "problems", ())]
        return lines + self._duplicates + [self.broken[p.name] for p in self._profiles if p.name in self.broken]

    @property
    def notes(self) -> list[str]:
        """One line per optional profile a provider left out because it is not set up, saying how to add it."""
        return [line for provider in self.providers for line in getattr(provider, "notes", ())]

    @property
    def default(self) -> Optional[VoiceProfile]:
        """The usable profile marked `default`, else the first usable one."""
        usable = self.profiles
        for profile in usable:
            if profile.default:
                return profile
        return usable[0] if usable else None

    def resolve(self, name: Optional[str] = None, language: Optional[str] = None) -> VoiceProfile:
        """Pick the profile for a request (rules in docs/voices.md, "Choosing a voice"); names are never paths."""
        profiles = self.profiles
        if name:
            if name in self.broken:
                raise VoiceNotFound(f"{self.broken[name]} (voice unavailable)")
            for profile in profiles:
                if profile.name == name:
                    return profile
            folded = name.casefold()
            for profile in profiles:
                if profile.name.casefold() == folded or profile.description.casefold() == folded:
                    return profile
            known = ", ".join(p.name for p in profiles) or "none"
            raise VoiceNotFound(f"unknown voice {name[:80]!r} (available: {known})")
        default = self.default
        if default is None:
            if self._profiles:
                raise VoiceNotFound(f"no usable voice profiles: all {len(self._profiles)} are broken (see the log)")
            raise VoiceNotFound("no voice profiles are configured")
        if language:
            if _lang_matches(language, default.languages) == 2:
                return default
            ranked = sorted(profiles, key=lambda p: -_lang_matches(language, p.languages))
            if _lang_matches(language, ranked[0].languages) == 2:
                return ranked[0]
            if _lang_matches(language, default.languages):
                return default
            if _lang_matches(language, ranked[0].languages):
                return ranked[0]
        return default
