"""`wyoming-cosyvoice voices list|check|add`: list profiles with their state, check them, add one from a recording."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Optional

from ..config import Config
from ..errors import ConfigError, VoiceError, VoiceNotFound
from ..voice_store import transcript_warning, voices_folder, write_voice
from ..voices import LANGUAGE_PATTERN, NAME_PATTERN, STALE_CACHE_HINT, VoiceCatalog, VoiceProfile, problem_line
from . import add_config_argument, read_config

if TYPE_CHECKING:
    from ..plugins import Plugins
    from ..reference import ReferenceInfo


def inspect_reference(path: Path, *, has_transcript: bool = False, max_seconds: float = 120.0) -> "ReferenceInfo":
    """reference.inspect_reference, imported on use so `--help` stays free of numpy and soundfile."""
    from ..reference import inspect_reference as inspect

    return inspect(path, has_transcript=has_transcript, max_seconds=max_seconds)


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register the `voices` subcommand and its `list`, `check` and `add` actions."""
    parser = subparsers.add_parser("voices", help="list, check and add voice profiles")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="list voice profiles with their state")
    add_config_argument(listing)
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=run_list)

    check = actions.add_parser("check", help="check profiles (reference audio, transcript, languages)")
    add_config_argument(check)
    check.add_argument("names", nargs="*", metavar="NAME", help="profiles to check (default: all)")
    check.add_argument("--audio", type=Path, action="append", default=[], help="also check this recording")
    check.set_defaults(func=run_check)

    add = actions.add_parser("add", help="add a voice folder from a recording and its transcript")
    add_config_argument(add)
    add.add_argument("name", help="voice name (letters, digits, _ . -)")
    add.add_argument("audio", type=Path, help="reference recording (WAV or FLAC, >= 16 kHz, <= 30 s)")
    text = add.add_mutually_exclusive_group()
    text.add_argument("--transcript", help="exact words of the recording (zero-shot mode)")
    text.add_argument("--transcript-file", type=Path, help="file holding the transcript")
    add.add_argument("--instruct", help="instruction text (instruct mode)")
    add.add_argument("--language", default="en-US", help="BCP-47 language of the voice (default: en-US)")
    add.add_argument("--description", help="what Home Assistant shows (default: the name)")
    add.add_argument("--folder", type=Path, help="voices folder (default: voice_providers.folder.path)")
    add.add_argument("--force", action="store_true", help="replace an existing voice folder of that name")
    add.set_defaults(func=run_add)


@dataclass
class ProfileCheck:
    """The outcome of checking one profile without an engine."""

    profile: VoiceProfile
    reference: Optional[ReferenceInfo] = None
    error: Optional[str] = None
    warnings: list[str] = field(default_factory=list)

    @property
    def state(self) -> str:
        """`broken`, `warning` or `ok`."""
        return "broken" if self.error else "warning" if self.warnings else "ok"


def check_profile(
    profile: VoiceProfile, engines: Optional[Collection[str]] = None, max_seconds: float = 120.0
) -> ProfileCheck:
    """Validate a profile's engine name (against `engines`, the registered ones), reference audio and transcript."""
    result = ProfileCheck(profile)
    if profile.engine is not None and engines is not None and profile.engine not in engines:
        registered = ", ".join(engines) or "none"
        result.error = problem_line(
            profile.source, profile.name, f"needs engine {profile.engine}, which is not registered ({registered})"
        )
        return result
    if profile.reference_audio is None:
        if profile.mode != "sft":
            result.warnings.append("no reference audio: only engines that do not clone (espeak) can use it")
        return result
    try:
        info = inspect_reference(
            profile.reference_audio, has_transcript=bool(profile.transcript), max_seconds=max_seconds
        )
    except VoiceError as err:
        result.error = problem_line(profile.source, profile.name, str(err))
        return result
    result.reference = info
    result.warnings.extend(info.warnings)
    mismatch = transcript_warning(profile.transcript, info.kept_seconds)
    if mismatch:
        result.warnings.append(mismatch)
    return result


def load_catalog(config: Config) -> VoiceCatalog:
    """The catalog of every configured provider (plugins loaded as the server would)."""
    return load_voices(config)[0]


def load_voices(config: Config) -> tuple[VoiceCatalog, list[str]]:
    """The catalog of every configured provider and the registered engine names (plugins loaded as the server would)."""
    catalog, plugins = _load(config)
    return catalog, list(plugins.registry["engines"])


def _load(config: Config) -> tuple[VoiceCatalog, "Plugins"]:
    from ..plugins import Plugins

    # The commands print every skipped profile themselves; the providers' log lines would say it twice.
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("wyoming_cosyvoice_plugins").setLevel(logging.ERROR)
    from ..server import build_catalog

    plugins = Plugins(config.server.plugins_dir)
    return build_catalog(config, plugins), plugins


def heard_as(config: Config, plugins: "Plugins", profiles: list[VoiceProfile]) -> dict[str, str]:
    """What a server started here would do with each profile ("cloned", "espeak voice for de-DE (...)")."""
    from ..routing import predicted_heard_as

    return predicted_heard_as(config, plugins, profiles)


def _heard_as_one(config: Config, name: str) -> str:
    """What a server started here would do with the voice `name` (as `voices list` says it)."""
    try:
        catalog, plugins = _load(config)
    except ConfigError as err:
        return f"unknown ({err})"
    profile = next((p for p in catalog.all_profiles if p.name == name), None)
    if profile is None:
        return "nothing: a voice of this name elsewhere wins (see voices list)"
    return heard_as(config, plugins, [profile])[name]


def _short(path: Optional[Path]) -> str:
    if path is None:
        return "-"
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def run_list(args: argparse.Namespace) -> int:
    """Print each profile: default mark, name, state, mode, languages, reference, description."""
    config = read_config(args.config, args.data_dir)
    catalog, plugins = _load(config)
    engines = list(plugins.registry["engines"])
    cap = config.limits.max_reference_seconds
    checks = [check_profile(p, engines, cap) for p in catalog.all_profiles]
    heard = heard_as(config, plugins, [c.profile for c in checks])
    default = next((c.profile.name for c in checks if c.profile.default and not c.error), None)
    default = default or next((c.profile.name for c in checks if not c.error), None)
    if args.json:
        rows: list[dict[str, Any]] = [
            {
                "name": c.profile.name,
                "default": c.profile.name == default,
                "state": c.state,
                "mode": c.profile.mode,
                "heard_as": heard[c.profile.name],
                "languages": list(c.profile.languages),
                "reference_audio": str(c.profile.reference_audio) if c.profile.reference_audio else None,
                "seconds": round(c.reference.kept_seconds, 2) if c.reference else None,
                "description": c.profile.description,
                "source": c.profile.source,
                "problem": c.error,
                "warnings": c.warnings,
            }
            for c in checks
        ]
        print(json.dumps({"voices": rows, "skipped": catalog.problems, "notes": catalog.notes}, indent=2))
        return 0
    table = [("", "NAME", "STATE", "HEARD AS", "LANGUAGES", "REFERENCE", "DESCRIPTION")]
    for c in checks:
        ref = _short(c.profile.reference_audio)
        if c.reference:
            ref += f" ({c.reference.kept_seconds:.1f} s)"
        mark = "*" if c.profile.name == default else ""
        table.append(
            (
                mark,
                c.profile.name,
                c.state,
                heard[c.profile.name],
                ",".join(c.profile.languages),
                ref,
                c.profile.description,
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        # zip stops at the last padded column; the last cell (the description) is not padded
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1])
    for line in catalog.problems:
        print(f"skipped: {line}")
    for line in catalog.notes:
        print(f"note: {line}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    """Check the named profiles (or all) and any --audio files; exit 1 when something is broken."""
    config = read_config(args.config, args.data_dir)
    catalog, engines = load_voices(config)
    cap = config.limits.max_reference_seconds
    profiles = catalog.all_profiles
    if args.names:
        known = {p.name: p for p in profiles}
        missing = [n for n in args.names if n not in known]
        if missing:
            raise VoiceNotFound(f"unknown voice {missing[0]!r} (available: {', '.join(known) or 'none'})")
        profiles = [known[n] for n in args.names]
    failed = False
    for profile in profiles:
        result = check_profile(profile, engines, cap)
        failed |= result.error is not None
        print(f"{profile.name}: {result.state}")
        print(f"  defined in: {profile.source}")
        print(f"  languages: {', '.join(profile.languages)}; mode: {profile.mode}")
        if profile.engine:
            print(
                f"  engine: {profile.engine} (started with the server; its voices are unavailable if it cannot start)"
            )
        if result.reference:
            print(f"  reference: {profile.reference_audio}: {result.reference.summary()}")
        elif profile.reference_audio is None:
            print("  reference: none")
        words = f"{len(profile.transcript)} characters" if profile.transcript else "none"
        print(f"  transcript: {words}" + ("" if profile.transcript else " (cross-lingual or instruct mode)"))
        if profile.instruct:
            print(f"  instruct: {profile.instruct}")
        for warning in result.warnings:
            print(f"  warning: {warning}")
        if result.error:
            print(f"  error: {result.error}")
    if not args.names:
        for line in catalog.problems:
            failed = True
            print(f"skipped: {line}")
        for line in catalog.notes:
            print(f"note: {line}")
    for audio in args.audio:
        try:
            info = inspect_reference(audio, max_seconds=cap)
        except VoiceError as err:
            failed = True
            print(f"error: {err}")
            continue
        print(f"{audio}: {'warning' if info.warnings else 'ok'}: {info.summary()}")
        for warning in info.warnings:
            print(f"  warning: {warning}")
    return 1 if failed else 0


def _voices_folder(config: Config, given: Optional[Path]) -> Path:
    return given if given is not None else voices_folder(config)


def run_add(args: argparse.Namespace) -> int:
    """Validate the recording, then write `<folder>/<language>/<name>/` atomically (a running server sees it whole)."""
    name, language = args.name, args.language.replace("_", "-")
    if not NAME_PATTERN.fullmatch(name):
        raise VoiceError(f"voice {name!r}: not a valid voice name (letters, digits, '_', '.', '-'; max 64)")
    if not LANGUAGE_PATTERN.fullmatch(language):
        raise VoiceError(f"voice {name!r}: --language {args.language!r} is not a BCP-47 tag (like en-US)")
    transcript = args.transcript
    if args.transcript_file is not None:
        try:
            transcript = args.transcript_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise VoiceError(f"{args.transcript_file}: voice {name!r}: cannot read the transcript: {err}") from None
    transcript = (transcript or "").strip() or None
    config = read_config(args.config, args.data_dir)
    try:
        info = inspect_reference(
            args.audio, has_transcript=bool(transcript), max_seconds=config.limits.max_reference_seconds
        )
    except VoiceError as err:
        raise VoiceError(problem_line(str(args.audio), name, str(err))) from None
    folder = _voices_folder(config, args.folder)
    clash = next((p for p in folder.glob(f"*/{name}") if p.is_dir()), None) if folder.is_dir() else None
    if not args.force:
        if clash is not None:
            raise VoiceError(f"{clash}: voice {name!r}: already exists (use --force to replace it)")
        try:
            existing = {p.name: p for p in load_catalog(config).all_profiles}
        except ConfigError:
            existing = {}
        if name in existing:
            raise VoiceError(problem_line(existing[name].source, name, "a voice of this name exists already"))
    suffix = ".flac" if info.format.startswith("FLAC") else ".wav"
    target = write_voice(
        folder,
        name,
        language,
        args.audio,
        suffix,
        transcript=transcript,
        instruct=args.instruct,
        description=args.description,
        force=args.force,
    )
    mode = "instruct" if args.instruct else "zero_shot" if transcript else "cross_lingual"
    print(f"added voice {name!r} ({language}, {mode}) in {target}: {info.summary()}")
    for warning in info.warnings:
        print(f"  warning: {warning}", file=sys.stderr)
    print(f"  heard as: {_heard_as_one(config, name)}")
    if clash is not None:
        print(f"  note: replaced the voice {name!r}. {STALE_CACHE_HINT}", file=sys.stderr)
    print(
        "A running server picks it up at once (a request naming it works now); Home Assistant lists it after its "
        "Wyoming integration is reloaded."
    )
    return 0
