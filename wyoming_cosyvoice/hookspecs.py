"""Pluggy hook specifications: plugins register engines, voice-profile providers and sinks by name."""

from typing import Any, Callable

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("wyoming_cosyvoice")
hookimpl = HookimplMarker("wyoming_cosyvoice")

Register = Callable[[str, Callable[..., Any]], None]


@hookspec
def register_engines(register: Register) -> None:
    """Register TTS engines: `register(name, factory)`, factory(section: config.Section) -> engine.Engine."""


@hookspec
def register_voice_providers(register: Register) -> None:
    """Register voice-profile providers: `register(name, factory)`, factory(section) -> voices.VoiceProvider."""


@hookspec
def register_sinks(register: Register) -> None:
    """Register audio sinks: `register(name, factory)`, factory(section) -> sinks.Sink."""
