"""Voice-profile provider reading a YAML file (`config/voices.yaml`), reloaded when the file changes.

Paths in the file are trusted (the administrator wrote them): relative ones resolve against the file's folder. A
bare file name for `reference_audio` (no folder part) that is not beside the file is looked up in `search` folders,
the project's `asset/` and the configured CosyVoice checkout's `asset/` (`engines.cosyvoice.repo`). Without a
`transcript`, a `.txt` file of the same name beside the audio is used. Without a `mode`: `instruct` when an
instruction is given, `zero_shot` with a transcript, else `cross_lingual`. A profile with `optional: true` whose
bare reference file name is found nowhere is left out with one info line saying how to add it (no warning, no
problem): the shipped `tars` voice, whose recording comes with CosyVoice, not with this project; the file is looked
for again on every reload, so copying it into place adds the voice.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from wyoming_cosyvoice.config import Section, build, load_yaml
from wyoming_cosyvoice.errors import ConfigError
from wyoming_cosyvoice.hookspecs import Register, hookimpl
from wyoming_cosyvoice.reference import ASSET_DIR
from wyoming_cosyvoice.voices import VoiceProfile, problem_line

MAX_TRANSCRIPT_BYTES = 16384
"""Transcript files larger than this are refused (a 30 s reference has a few hundred characters)."""

MAX_VOICES_FILE_BYTES = 1048576
"""A voices file larger than this is refused (a hundred voices take a few kB)."""

_LOGGER = logging.getLogger(__name__)


class _NotSetUp(Exception):
    """An optional profile whose recording is not there (yet): left out quietly."""

    def __init__(self, note: str, looked: Sequence[Path]) -> None:
        super().__init__(note)
        self.looked = list(looked)


@dataclass(frozen=True)
class YamlVoicesSettings:
    """`voice_providers.yaml` settings."""

    path: Path = Path("voices.yaml")
    """Voices file; relative to the server config's folder."""

    search: tuple[Path, ...] = ()
    """Extra folders where a bare `reference_audio` file name is looked up (before `asset/` folders)."""


@dataclass(frozen=True)
class VoicesFile:
    """Top level of a voices file."""

    voices: tuple[dict, ...] = ()
    """Voice profiles, in the order clients see them."""

    default: Optional[str] = None
    """Name of the profile used when a request names no voice (default: the first)."""


class YamlVoiceProvider:
    """Profiles from one YAML file; a broken profile is logged and skipped, the others are served."""

    def __init__(self, path: Path, search: Sequence[Path] = ()) -> None:
        self.path = path
        self.search = [path.parent, *search]
        """Folders a bare reference file name is looked up in, in order."""
        self._stamp: Optional[tuple[int, int]] = None
        self._profiles: list[VoiceProfile] = []
        self.problems: list[str] = []
        """One line per profile (or file) that could not be loaded at the last read."""
        self.notes: list[str] = []
        """One line per optional profile left out because its recording is not there (how to add it)."""
        self._awaited: list[Path] = []
        """Where the recordings of those profiles would be found (a reload rereads the file when one appears)."""
        self._read(initial=True)

    def _read(self, initial: bool = False) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            if initial:
                raise ConfigError(f"{self.path}: voices file not found") from None
            _LOGGER.error(
                "%s: voices file was removed; keeping the %d voices loaded before", self.path, len(self._profiles)
            )
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp and not any(p.is_file() for p in self._awaited):
            return
        self._stamp = stamp
        try:
            source = str(self.path)
            data = load_yaml(self.path, aliases=False, max_bytes=MAX_VOICES_FILE_BYTES)
            top = build(VoicesFile, data, source=source, base_dir=self.path.parent)
        except ConfigError as err:
            if initial:
                raise
            _LOGGER.error("%s; keeping the %d voices loaded before", err, len(self._profiles))
            return
        profiles: list[VoiceProfile] = []
        problems: list[str] = []
        notes: list[str] = []
        awaited: list[Path] = []
        skipped: set[str] = set()
        absent: set[str] = set()
        for index, entry in enumerate(top.voices):
            name = str(entry.get("name", f"voices[{index}]")) if isinstance(entry, dict) else f"voices[{index}]"
            try:
                entry = self._complete(entry, index, source)
                profile = build(VoiceProfile, entry, source=source, key=f"voices[{index}]", base_dir=self.path.parent)
            except _NotSetUp as missing:
                default = "; until then the first usable voice is the default" if name == top.default else ""
                notes.append(problem_line(source, name, f"{missing}{default}"))
                awaited.extend(missing.looked)
                absent.add(name)
                if notes[-1] not in self.notes:
                    _LOGGER.info("%s", notes[-1])
                continue
            except ConfigError as err:
                text = str(err)
                text = text[len(source) + 1 :].lstrip() if text.startswith(source + ":") else text
                problems.append(problem_line(source, name, text))
                skipped.add(name)
                _LOGGER.warning("%s (voice skipped)", problems[-1])
                continue
            profiles.append(dataclasses.replace(profile, source=source))
        if top.default is not None:
            names = [p.name for p in profiles]
            if top.default in skipped:
                _LOGGER.warning(
                    "%s:default: voice %r is skipped; the first usable voice is the default", source, top.default
                )
            elif top.default in absent:
                pass  # an optional voice not set up: the first usable voice is the default, as its note says
            elif top.default not in names:
                problems.append(f"{source}:default: no voice named {top.default!r}")
                _LOGGER.error("%s:default: no voice named %r; using %s", source, top.default, names[:1])
            else:
                profiles = [dataclasses.replace(p, default=p.name == top.default) for p in profiles]
        self._profiles, self.problems, self.notes, self._awaited = profiles, problems, notes, awaited

    def _complete(self, entry: Any, index: int, source: str) -> Any:
        """Find a bare reference file name, read a sidecar transcript, pick the mode when none is given."""
        if not isinstance(entry, dict):
            return entry
        entry = dict(entry)
        key = f"{source}:voices[{index}]"
        optional = entry.pop("optional", False)
        if not isinstance(optional, bool):
            raise ConfigError(f"{key}.optional: expected true or false, got {optional!r}")
        ref = entry.get("reference_audio")
        audio: Optional[Path] = None
        if isinstance(ref, str) and ref:
            given = Path(ref).expanduser()
            if given.is_absolute() or len(given.parts) > 1:
                audio = given if given.is_absolute() else self.path.parent / given
                if not audio.is_file() and optional:
                    raise _NotSetUp(
                        f"not set up: its recording {audio} was not found; copy it there to add it", [audio]
                    )
                if not audio.is_file():
                    raise ConfigError(f"{key}.reference_audio: file not found: {audio}")
            else:
                audio = next((d / given for d in self.search if (d / given).is_file()), None)
                if audio is None and optional:
                    raise _NotSetUp(
                        f"not set up: its recording {ref!r} was not found (looked in: "
                        f"{', '.join(str(d) for d in self.search)}); to add it, copy the file into {self.path.parent} "
                        "(or set engines.cosyvoice.repo to a CosyVoice checkout whose asset/ folder has it)",
                        [d / given for d in self.search],
                    )
                if audio is None:
                    looked = ", ".join(str(d) for d in self.search)
                    raise ConfigError(f"{key}.reference_audio: {ref!r} not found (looked in: {looked})")
            entry["reference_audio"] = str(audio)
        if audio is not None and not entry.get("transcript"):
            sidecar = audio.with_suffix(".txt")
            if sidecar.is_file():
                entry["transcript"] = read_text_file(sidecar, f"{key}.transcript")
        if "mode" not in entry:
            if entry.get("instruct"):
                entry["mode"] = "instruct"
            elif entry.get("transcript"):
                entry["mode"] = "zero_shot"
            else:
                entry["mode"] = "cross_lingual"
        return entry

    def load(self) -> list[VoiceProfile]:
        """Current profiles; rereads the file when its modification time or size changed."""
        self._read()
        return list(self._profiles)


def read_text_file(path: Path, where: str) -> str:
    """A small UTF-8 text file, stripped; problems are ConfigErrors naming `where` (file:key)."""
    try:
        if path.stat().st_size > MAX_TRANSCRIPT_BYTES:
            raise ConfigError(f"{where}: {path} is larger than {MAX_TRANSCRIPT_BYTES} bytes")
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where}: cannot read {path}: {err}") from None


def cosyvoice_asset_dir(section: Section) -> Optional[Path]:
    """`<engines.cosyvoice.repo>/asset` from the server config file the section came from, if configured."""
    source = Path(section.source)
    if not source.is_file():
        return None
    try:
        data = load_yaml(source)
    except ConfigError:
        return None  # the server reports its own config errors
    engines = data.get("engines") if isinstance(data, dict) else None
    cosyvoice = engines.get("cosyvoice") if isinstance(engines, dict) else None
    repo = cosyvoice.get("repo") if isinstance(cosyvoice, dict) else None
    if not isinstance(repo, str) or not repo:
        return None
    path = Path(repo).expanduser()
    return (path if path.is_absolute() else section.base_dir / path) / "asset"


def asset_search_path(section: Section, extra: Sequence[Path] = ()) -> list[Path]:
    """Where bare reference file names are looked up after the voices file's folder: extra, asset/, checkout."""
    folders = [*extra, ASSET_DIR]
    checkout = cosyvoice_asset_dir(section)
    if checkout is not None:
        folders.append(checkout)
    return folders


def create_provider(section: Section) -> YamlVoiceProvider:
    """Factory: `voice_providers.yaml` settings -> provider."""
    settings = section.parse(YamlVoicesSettings)
    return YamlVoiceProvider(settings.path, asset_search_path(section, settings.search))


@hookimpl
def register_voice_providers(register: Register) -> None:
    """Register the YAML voice provider."""
    register("yaml", create_provider)
