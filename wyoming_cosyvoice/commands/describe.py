"""`wyoming-cosyvoice describe`: what a Wyoming server offers (programs, voices, languages, engine health)."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from typing import Any, Optional

from wyoming.info import Info

from ..client import TtsClient
from . import seconds
from .say import DEFAULT_URI

_NOTE = re.compile(r"^ \[(?P<note>[^\]]*)\]")


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register the `describe` subcommand."""
    parser = subparsers.add_parser("describe", help="show a Wyoming server's programs, voices and health")
    parser.add_argument("--uri", default=DEFAULT_URI, help=f"server (default: {DEFAULT_URI})")
    parser.add_argument("--timeout", type=seconds, default=10.0, help="seconds to wait for the answer (default 10)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--debug", action="store_true", help="log debug messages")
    parser.set_defaults(func=run)


def parse_health(description: Optional[str]) -> Optional[dict[str, Any]]:
    """Engine facts from one of our program descriptions ("... (engine: NAME; k=v, k=v) [note]"), else None."""
    text = description or ""
    start = text.find("(engine: ")
    if start < 0:
        return None
    body, rest = _balanced(text[start + 1 :])  # values may hold parentheses: "parked (host)", "1 (auto: ...)"
    engine, _, facts = body[len("engine: ") :].partition("; ")
    health: dict[str, Any] = {"engine": engine.strip()}
    for fact in _split_top(facts):
        key, sep, value = fact.partition("=")
        if sep and key.strip():
            health[key.strip()] = value.strip()
    note = _NOTE.match(rest)
    if note:
        health["note"] = note["note"]
    return health


def _balanced(text: str) -> tuple[str, str]:
    """`text` after an opening parenthesis -> (what is inside up to its closing one, what follows it)."""
    depth = 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            if depth == 0:
                return text[:i], text[i + 1 :]
            depth -= 1
    return text, ""


def _split_top(facts: str) -> list[str]:
    """`k=v, k=v` split at the commas outside parentheses."""
    parts, depth, last = [], 0, 0
    for i, char in enumerate(facts):
        depth += char == "("
        depth -= char == ")"
        if depth == 0 and facts.startswith(", ", i):
            parts.append(facts[last:i])
            last = i + 2
    parts.append(facts[last:])
    return parts


async def fetch_info(uri: str, timeout: float) -> Info:
    """Connect, describe, disconnect."""
    async with TtsClient(uri, connect_timeout=timeout, read_timeout=timeout) as client:
        return await client.describe()


def to_json(info: Info) -> dict[str, Any]:
    """The info event's data, plus parsed engine health per TTS program where present."""
    data = dict(info.event().data or {})
    for program in data.get("tts", []):
        health = parse_health(program.get("description"))
        if health is not None:
            program["health"] = health
    return data


def render(info: Info) -> str:
    """Human-readable summary."""
    lines: list[str] = []
    kinds = ("asr", "tts", "handle", "intent", "wake", "mic", "snd")
    for kind in kinds:
        for program in getattr(info, kind):
            state = "" if program.installed else " (not installed)"
            lines.append(f"{kind} program: {program.name} {program.version or ''}{state}".rstrip())
            if program.description:
                lines.append(f"  description: {program.description}")
            if kind == "tts":
                lines.append(f"  streaming: {'yes' if program.supports_synthesize_streaming else 'no'}")
                health = parse_health(program.description)
                if health is not None:
                    facts = ", ".join(f"{k}={v}" for k, v in health.items())
                    lines.append(f"  health: {facts}")
                voices = program.voices or []
                lines.append(f"  voices ({len(voices)}):")
                for voice in voices:
                    langs = ", ".join(voice.languages or []) or "-"
                    desc = f" - {voice.description}" if voice.description and voice.description != voice.name else ""
                    lines.append(f"    {voice.name} [{langs}]{desc}")
                languages = sorted({lang for v in voices for lang in (v.languages or [])})
                lines.append(f"  languages: {', '.join(languages) or '-'}")
    if info.satellite is not None:
        lines.append(f"satellite: {info.satellite.name}")
    return "\n".join(lines) if lines else "no programs"


def run(args: argparse.Namespace) -> int:
    """Print what the server at --uri offers."""
    info = asyncio.run(fetch_info(args.uri, args.timeout))
    print(json.dumps(to_json(info), indent=2) if args.json else render(info))
    return 0
