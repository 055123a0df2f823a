"""Voice-profile provider reading a folder per voice: `<voices_dir>/<language>/<voice>/reference.wav`.

The layout of wyoming-piper's cloning backend: `reference.wav` (or `reference.flac`), optional `transcript.txt`
(zero-shot mode) and `instruct.txt` (instruct mode), and optionally `profile.yaml` with extra fields
(`description`, `languages`, `mode`, `speed`, `gain`, `engine`, `default`, `speaker`, `options`). The voice name is
the folder name; the language folder (`en_US` or `en-US`) is its language. Nothing outside the voices folder is
ever read: entries whose real path (symlinks followed) leaves it are refused. The folder is rescanned on every
`describe` (a few `stat` calls per voice) and profiles are rebuilt only when something changed.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Mapping, Optional

from wyoming_cosyvoice.config import Section, build, load_yaml
from wyoming_cosyvoice.errors import ConfigError
from wyoming_cosyvoice.hookspecs import Register, hookimpl
from wyoming_cosyvoice.voice_store import FolderVoicesSettings, language_tag
from wyoming_cosyvoice.voices import LANGUAGE_PATTERN, NAME_PATTERN, VoiceProfile, problem_line

from .yaml_voices import read_text_file

_LOGGER = logging.getLogger(__name__)

REFERENCE_NAMES = ("reference.wav", "reference.flac")
"""Reference file names looked for in a voice folder, in order."""

TEXT_FILES = ("transcript.txt", "instruct.txt", "profile.yaml")
PROFILE_KEYS = ("description", "languages", "mode", "speed", "gain", "engine", "default", "speaker", "options")
"""Keys allowed in a voice folder's `profile.yaml` (paths and texts come from the folder's files)."""

OPTION_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
"""`options` keys in a `profile.yaml`: identifiers."""

OPTION_TEXT = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]{0,63}")
"""`options` text values in a `profile.yaml`: names like `en-us+f3` (no path separator, no `..`, no spaces)."""

MAX_PROFILE_BYTES = 65536
"""A `profile.yaml` larger than this is refused."""

MAX_OPTIONS = 32
"""Most `options` entries in one `profile.yaml`."""


def check_options(options: Any) -> None:
    """Every `options` value from a voices folder is a number, a boolean or a short name: never a path or a structure.

    Raises ConfigError naming the option. Whoever can write a voice folder may not be the server's administrator, and
    an engine may hand an option to a library that opens it as a file (espeak did).
    """
    if options is None:
        return
    if not isinstance(options, dict):
        raise ConfigError("profile.yaml:options: expected a mapping of names to values")
    if len(options) > MAX_OPTIONS:
        raise ConfigError(f"profile.yaml:options: {len(options)} entries; at most {MAX_OPTIONS} are allowed")
    for key, value in options.items():
        if not isinstance(key, str) or not OPTION_KEY.fullmatch(key):
            raise ConfigError(f"profile.yaml:options: {str(key)[:40]!r} is not an option name (letters, digits, _)")
        where = f"profile.yaml:options.{key}"
        if isinstance(value, (bool, int, float)):
            continue
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a name, a number or true/false, got a {type(value).__name__}")
        if not OPTION_TEXT.fullmatch(value) or ".." in value:
            raise ConfigError(
                f"{where}: {value[:40]!r} is not allowed (letters, digits, '_', '.', '+', '-'; no paths); "
                "profile.yaml cannot name files"
            )


class FolderVoiceProvider:
    """Profiles from a voices folder; a broken voice folder is reported and skipped, the others are served."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.problems: list[str] = []
        """One line per voice folder that could not be loaded at the last scan."""
        self._stamp: Optional[tuple[Any, ...]] = None
        self._profiles: list[VoiceProfile] = []
        self._reported: set[str] = set()
        self.load()

    def _entries(self) -> list[tuple[Path, Path]]:
        """(language folder, voice folder) pairs, sorted; hidden entries ignored."""
        pairs = []
        for lang_dir in sorted(self.root.iterdir()):
            if lang_dir.name.startswith(".") or not lang_dir.is_dir():
                continue
            for voice_dir in sorted(lang_dir.iterdir()):
                if not voice_dir.name.startswith(".") and voice_dir.is_dir():
                    pairs.append((lang_dir, voice_dir))
        return pairs

    def _scan_stamp(self, pairs: list[tuple[Path, Path]]) -> tuple[Any, ...]:
        """Modification times and sizes of everything a profile is built from (cheap change detection)."""
        parts: list[Any] = []
        for path in [self.root, *sorted({lang for lang, _ in pairs})]:
            parts.append((str(path), path.stat().st_mtime_ns))
        for _lang, voice_dir in pairs:
            parts.append((str(voice_dir), voice_dir.stat().st_mtime_ns))
            for name in (*REFERENCE_NAMES, *TEXT_FILES):
                try:
                    stat = (voice_dir / name).stat()
                    parts.append((name, stat.st_mtime_ns, stat.st_size))
                except OSError:
                    continue
        return tuple(parts)

    def load(self) -> list[VoiceProfile]:
        """Current profiles; rescans only what changed since the last call."""
        if not self.root.is_dir():
            if "(root)" not in self._reported:
                self._reported.add("(root)")
                _LOGGER.info("%s: voices folder does not exist (yet); no folder voices", self.root)
            self._profiles, self.problems, self._stamp = [], [], None
            return []
        self._reported.discard("(root)")
        try:
            pairs = self._entries()
            stamp = self._scan_stamp(pairs)
        except OSError as err:  # a folder vanished mid-scan: try again next time
            _LOGGER.debug("voices folder changed while scanning: %s", err)
            return list(self._profiles)
        if stamp == self._stamp:
            return list(self._profiles)
        self._stamp = stamp
        root = self.root.resolve()
        profiles: list[VoiceProfile] = []
        problems: list[str] = []
        for lang_dir, voice_dir in pairs:
            try:
                profiles.append(self._profile(root, lang_dir, voice_dir))
            except ConfigError as err:
                problems.append(problem_line(str(voice_dir), voice_dir.name, str(err)))
        for line in problems:
            if line not in self._reported:
                _LOGGER.warning("%s (voice skipped)", line)
        self._reported = set(problems)
        self._profiles, self.problems = profiles, problems
        return list(profiles)

    def _profile(self, root: Path, lang_dir: Path, voice_dir: Path) -> VoiceProfile:
        """Build one voice folder's profile; ConfigError (problem only) when it is unusable."""
        name = voice_dir.name
        if not NAME_PATTERN.fullmatch(name):
            raise ConfigError("folder name is not a valid voice name (letters, digits, '_', '.', '-')")
        language = language_tag(lang_dir.name)
        if not LANGUAGE_PATTERN.fullmatch(lang_dir.name):
            raise ConfigError(f"language folder {lang_dir.name!r} is not a language tag (like en_US or de)")
        reference = next((voice_dir / n for n in REFERENCE_NAMES if (voice_dir / n).exists()), None)
        if reference is None:
            raise ConfigError(f"no {' or '.join(REFERENCE_NAMES)} in the folder")
        data: dict[str, Any] = {"name": name, "description": name, "languages": [language]}
        extra = self._inside(root, voice_dir / "profile.yaml")
        if extra is not None:
            raw = load_yaml(extra, aliases=False, max_bytes=MAX_PROFILE_BYTES)
            if raw is not None and not isinstance(raw, dict):
                raise ConfigError("profile.yaml: expected a mapping")
            for key in raw or {}:
                if key not in PROFILE_KEYS:
                    raise ConfigError(f"profile.yaml:{key}: not allowed here (allowed: {', '.join(PROFILE_KEYS)})")
            check_options((raw or {}).get("options"))
            data.update(raw or {})
        data["reference_audio"] = str(self._inside(root, reference, required=True))
        for key, filename in (("transcript", "transcript.txt"), ("instruct", "instruct.txt")):
            text_file = self._inside(root, voice_dir / filename)
            if text_file is not None:
                data[key] = read_text_file(text_file, filename) or None
        if "mode" not in data:
            data["mode"] = (
                "instruct" if data.get("instruct") else "zero_shot" if data.get("transcript") else "cross_lingual"
            )
        try:
            profile = build(VoiceProfile, data, source="profile.yaml", base_dir=voice_dir)
        except ConfigError as err:
            raise ConfigError(str(err)) from None
        return dataclasses.replace(profile, source=str(voice_dir))

    def _inside(self, root: Path, path: Path, required: bool = False) -> Optional[Path]:
        """`path` with symlinks resolved, when it exists and stays inside the voices folder; else None/error."""
        if not path.exists() and not path.is_symlink():
            if required:
                raise ConfigError(f"{path.name}: file not found")
            return None
        real = path.resolve()
        if real != root and root not in real.parents:
            raise ConfigError(f"{path.name}: points outside the voices folder ({real}); refused")
        if not real.is_file():
            raise ConfigError(f"{path.name}: not a regular file")
        return real


def profile_fields(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The `profile.yaml` fields among `settings` (for `voices add`)."""
    return {k: v for k, v in settings.items() if k in PROFILE_KEYS and v is not None}


def create_provider(section: Section) -> FolderVoiceProvider:
    """Factory: `voice_providers.folder` settings -> provider."""
    settings = section.parse(FolderVoicesSettings)
    return FolderVoiceProvider(settings.path)


@hookimpl
def register_voice_providers(register: Register) -> None:
    """Register the voice-folder provider."""
    register("folder", create_provider)
