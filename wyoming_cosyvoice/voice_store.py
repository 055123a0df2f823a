"""The voices folder (`<folder>/<language>/<voice>/`): its layout and settings, and its one writer: add a voice
atomically, edit its texts, remove it.

Shared by `voices add` and the voice studio page, so both write the same layout into the same folder (the folder
voice provider's `voice_providers.folder.path`; that provider reads what is written here). Every write is staged in a
hidden entry (the provider skips hidden entries) and renamed into place, so a running server never sees half a
voice. Names are checked to be one safe path component before any path is built from them. Blocking: call it on a
thread from async code.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import yaml

from .errors import ConfigError, VoiceError
from .voices import LANGUAGE_PATTERN, NAME_PATTERN

if TYPE_CHECKING:
    from .config import Config

_LOGGER = logging.getLogger(__name__)

MAX_TRANSCRIPT_CHARS = 2000
"""Longest transcript accepted (30 s of fast speech is well under 1000 characters)."""

MAX_DESCRIPTION_CHARS = 200
"""Longest description accepted (what Home Assistant shows in its voice list)."""

MAX_LANGUAGES = 8
"""Most language tags one voice may list."""

TRANSCRIPT_CHARS_PER_SECOND = 35
"""More characters per second of sound than this: the transcript probably does not match the recording."""


@dataclass(frozen=True)
class FolderVoicesSettings:
    """`voice_providers.folder` settings."""

    path: Path = Path("voices")
    """Voices folder: `<path>/<language>/<voice>/reference.wav`; relative to the server config's folder."""


def language_tag(folder: str) -> str:
    """`en_US` -> `en-US` (BCP-47), as wyoming-piper names its language folders."""
    return folder.replace("_", "-")


def folder_language(tag: str) -> str:
    """`en-US` -> `en_US`, the language folder a voice is written to."""
    return tag.replace("-", "_")


def voices_folder(config: "Config") -> Path:
    """The folder voice provider's configured directory (`voice_providers.folder.path`): where voices are written."""
    if "folder" not in config.voice_providers:
        raise ConfigError(
            f"{config.source}:voice_providers.folder: not configured; add `folder: {{path: voices}}` there "
            "or pass --folder"
        )
    return config.section("voice_providers", "folder").parse(FolderVoicesSettings).path


def check_name(name: str) -> str:
    """`name` when it is a valid voice name (a single safe path component), else VoiceError."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        shown = repr(name)[:80]
        raise VoiceError(f"voice {shown}: not a valid voice name (letters, digits, '_', '.', '-'; max 64)")
    return name


def check_language(name: str, language: str) -> str:
    """The BCP-47 tag (`en_US` -> `en-US`) when valid, else VoiceError."""
    tag = language.replace("_", "-") if isinstance(language, str) else ""
    if not LANGUAGE_PATTERN.fullmatch(tag):
        raise VoiceError(f"voice {name!r}: language {str(language)[:40]!r} is not a BCP-47 tag (like en-US)")
    return tag


def check_texts(
    name: str, transcript: Optional[str] = None, description: Optional[str] = None
) -> tuple[Optional[str], Optional[str]]:
    """Transcript and description stripped and checked for length (None when empty)."""
    transcript = (transcript or "").strip() or None
    description = " ".join((description or "").split()) or None
    if transcript is not None and len(transcript) > MAX_TRANSCRIPT_CHARS:
        raise VoiceError(f"voice {name!r}: transcript has {len(transcript)} characters (max {MAX_TRANSCRIPT_CHARS})")
    if description is not None and len(description) > MAX_DESCRIPTION_CHARS:
        raise VoiceError(f"voice {name!r}: description has {len(description)} characters (max {MAX_DESCRIPTION_CHARS})")
    return transcript, description


def transcript_warning(transcript: Optional[str], kept_seconds: float) -> Optional[str]:
    """A warning when the transcript is much longer than the recording could hold (`voices check` says it too)."""
    if not transcript or kept_seconds <= 0:
        return None
    if len(transcript) / kept_seconds > TRANSCRIPT_CHARS_PER_SECOND:
        return (
            f"transcript has {len(transcript)} characters for {kept_seconds:.1f} s of audio: "
            "does it match the recording?"
        )
    return None


def find_voice_dirs(folder: Path, name: str) -> list[Path]:
    """Every `<folder>/<language>/<name>` folder (normally one); hidden language folders are skipped."""
    check_name(name)
    if not folder.is_dir():
        return []
    root = folder.resolve()
    # A symlinked language or voice folder is never written or removed through, wherever it leads.
    return sorted(
        p
        for p in folder.glob(f"*/{name}")
        if not p.parent.name.startswith(".") and _plain_dir(p.parent, root) and _plain_dir(p, root / p.parent.name)
    )


def _plain_dir(path: Path, parent: Path) -> bool:
    """True when `path` is a folder itself (not a symlink to one) whose real location is directly in `parent`."""
    try:
        return not path.is_symlink() and path.is_dir() and path.resolve().parent == parent
    except OSError:
        return False


def _language_dir(folder: Path, name: str, tag: str) -> Path:
    """The real `<folder>/<language>` folder of a voice being written (created when missing); VoiceError when it is
    a symlink, a file or anything else that is not a plain folder directly inside the voices folder."""
    folder.mkdir(parents=True, exist_ok=True)
    root = folder.resolve()
    language_dir = root / folder_language(tag)
    if not os.path.lexists(language_dir):
        try:
            language_dir.mkdir()
        except FileExistsError:
            pass  # made by someone else meanwhile: checked below like any other
    if not _plain_dir(language_dir, root):
        raise VoiceError(
            f"voice {name!r}: {language_dir.name}/ in the voices folder is a link or not a folder; refused "
            "(voices are written only inside the voices folder)"
        )
    return language_dir


def find_voice_dir(folder: Path, name: str) -> Path:
    """The voice folder of `name`; VoiceError when there is none."""
    found = find_voice_dirs(folder, name)
    if not found:
        raise VoiceError(f"voice {name!r}: not in the voices folder")
    return found[0]


def _write_atomic(target: Path, data: bytes) -> None:
    """Write via a hidden temporary file and rename, so a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _profile_yaml(fields: dict[str, Any]) -> bytes:
    return yaml.safe_dump(fields, allow_unicode=True, sort_keys=False).encode("utf-8")


def write_voice(
    folder: Path,
    name: str,
    language: str,
    audio: Union[Path, bytes],
    suffix: str,
    *,
    transcript: Optional[str] = None,
    instruct: Optional[str] = None,
    description: Optional[str] = None,
    force: bool = False,
) -> Path:
    """Write `<folder>/<language>/<name>/` (reference, texts, profile.yaml) atomically; returns the voice folder.

    `audio` is the recording (a file to copy, or its bytes), already validated; `suffix` is `.wav` or `.flac`.
    Without `force` an existing voice folder of that name is an error; with it, it is replaced (in any language).
    """
    check_name(name)
    tag = check_language(name, language)
    if suffix not in (".wav", ".flac"):
        raise VoiceError(f"voice {name!r}: reference must be .wav or .flac, not {suffix!r}")
    language_dir = _language_dir(Path(folder), name, tag)
    existing = find_voice_dirs(language_dir.parent, name)
    if existing and not force:
        raise VoiceError(f"voice {name!r}: already exists in the voices folder ({existing[0].parent.name})")
    target = language_dir / name
    if os.path.lexists(target) and target not in existing:
        # Never replace (and so delete) what is not one of this store's voice folders: a link, a file, ...
        raise VoiceError(f"voice {name!r}: {language_dir.name}/{name} exists and is not a voice folder; refused")
    staging = Path(tempfile.mkdtemp(prefix=f".add-{name}-", dir=target.parent))  # hidden: scanners skip it
    try:
        reference = staging / f"reference{suffix}"
        if isinstance(audio, (bytes, bytearray)):
            reference.write_bytes(audio)
        else:
            shutil.copyfile(audio, reference)
        if transcript:
            (staging / "transcript.txt").write_text(transcript.strip() + "\n", encoding="utf-8")
        if instruct:
            (staging / "instruct.txt").write_text(instruct.strip() + "\n", encoding="utf-8")
        if description:
            (staging / "profile.yaml").write_bytes(_profile_yaml({"description": description}))
        staging.chmod(0o755)
        old = None
        if target in existing:
            old = target.parent / f".old-{name}-{staging.name}"
            target.rename(old)
        staging.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for other in existing:  # replaced in another language folder: one voice of a name
        if other != target:
            remove_dir(other)
    _LOGGER.info("Voice %r written to %s", name, target)
    return Path(folder) / language_dir.name / name


def update_voice(
    folder: Path,
    name: str,
    *,
    transcript: Optional[str] = None,
    description: Optional[str] = None,
    languages: Optional[Sequence[str]] = None,
) -> Path:
    """Change a folder voice's transcript ("" removes it), description and languages; each file replaced atomically.

    Arguments left None are not changed. Other `profile.yaml` keys are kept.
    """
    from .config import load_yaml

    voice_dir = find_voice_dir(folder, name)
    if transcript is not None:
        text, _ = check_texts(name, transcript=transcript)
        target = voice_dir / "transcript.txt"
        if text:
            _write_atomic(target, (text + "\n").encode("utf-8"))
        else:
            target.unlink(missing_ok=True)
    if description is not None or languages is not None:
        profile_file = voice_dir / "profile.yaml"
        fields: dict[str, Any] = {}
        if profile_file.is_file() and not profile_file.is_symlink():
            try:
                raw = load_yaml(profile_file)
            except ConfigError as err:
                raise VoiceError(f"voice {name!r}: profile.yaml cannot be edited: {err}") from None
            if isinstance(raw, dict):
                fields = dict(raw)
        if description is not None:
            _, text = check_texts(name, description=description)
            if text:
                fields["description"] = text
            else:
                fields.pop("description", None)
        if languages is not None:
            tags = [check_language(name, lang) for lang in languages if str(lang).strip()]
            if not tags:
                raise VoiceError(f"voice {name!r}: at least one language is needed")
            if len(tags) > MAX_LANGUAGES:
                raise VoiceError(f"voice {name!r}: at most {MAX_LANGUAGES} languages")
            fields["languages"] = list(dict.fromkeys(tags))
        if fields:
            _write_atomic(profile_file, _profile_yaml(fields))
        else:
            profile_file.unlink(missing_ok=True)
    _LOGGER.info("Voice %r updated in %s", name, voice_dir)
    return voice_dir


def remove_dir(voice_dir: Path) -> None:
    """Take a voice folder out of sight at once (rename to a hidden name), then delete it."""
    hidden = Path(tempfile.mkdtemp(prefix=f".removed-{voice_dir.name}-", dir=voice_dir.parent))
    gone = hidden / voice_dir.name
    voice_dir.rename(gone)
    shutil.rmtree(hidden, ignore_errors=True)


def remove_voice(folder: Path, name: str) -> Path:
    """Delete a folder voice (every language folder holding that name); returns the first folder removed."""
    found = find_voice_dirs(folder, name)
    if not found:
        raise VoiceError(f"voice {name!r}: not in the voices folder")
    for voice_dir in found:
        remove_dir(voice_dir)
    _LOGGER.info("Voice %r removed from %s", name, found[0].parent)
    return found[0]
