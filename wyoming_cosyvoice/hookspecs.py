"""Pluggy hook specifications: plugins register engines, voice-profile providers and sinks by name, and commands."""

import argparse
from typing import Any, Callable, Protocol

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("wyoming_cosyvoice")
hookimpl = HookimplMarker("wyoming_cosyvoice")


class Register(Protocol):
    """`register(name, factory)`; an engine may add `setup_hint=`, a sink `spec_key=` (what `--sink NAME:ARG` sets)."""

    def __call__(self, name: str, factory: Callable[..., Any], *, setup_hint: str = "", spec_key: str = "") -> None: ...


@hookspec
def register_engines(register: Register) -> None:
    """Register TTS engines: `register(name, factory)`, factory(section: config.Section) -> engine.Engine."""


@hookspec
def register_voice_providers(register: Register) -> None:
    """Register voice-profile providers: `register(name, factory)`, factory(section) -> voices.VoiceProvider."""


@hookspec
def register_sinks(register: Register) -> None:
    """Register audio sinks: `register(name, factory)`, factory(section) -> sinks.Sink."""


@hookspec
def register_commands(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add CLI subcommands: `subparsers.add_parser(...)`, `set_defaults(func=run)`, run(args) -> exit status."""
