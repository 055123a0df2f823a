"""The CosyVoice engine: the official CosyVoice code from a checkout, behind the engine interface.

Modules: `engine` (the engine front: synthesis, admission of concurrent requests), `loader` (loading: plan,
TensorRT, self-check, streaming loop), `voicebook` (prepared voices), `calls`, `warmup`, `health`, `parking`, `options`
(settings and load options per GPU), `upstream` (checkout and model-dir checks, lazy import, upstream quirks,
TensorRT plans), `stream` (our streaming loop for CosyVoice 2/3), `chunking` (where a stream cuts its chunks),
`scheduler` (several streams on one model: who runs the flow + vocoder next, measured costs, admission), `sessions`
(upstream's per-call state, cleaned per request), `recipes` (profile -> upstream call per model version), `prompts`
(prompt audio loading and the prepared-voice cache), `selfcheck` (the load-time check), `commands` (the `download`
and `health` commands). The core never imports this package; torch and CosyVoice are imported only when the engine
starts.
"""

from __future__ import annotations

import argparse
from typing import Any

from wyoming_cosyvoice.config import Section
from wyoming_cosyvoice.hookspecs import Register, hookimpl

SETUP_HINT = (
    "To enable CosyVoice, set engines.cosyvoice.repo and engines.cosyvoice.model_dir (README: 'GPU engine: CosyVoice')."
)
"""Logged when the server falls back because this engine cannot start."""


def create_engine(section: Section) -> Any:
    """Factory: `engines.cosyvoice` settings -> engine (nothing heavy happens before start())."""
    from .engine import create_engine as create

    return create(section)


@hookimpl
def register_engines(register: Register) -> None:
    """Register the CosyVoice GPU engine."""
    register("cosyvoice", create_engine, setup_hint=SETUP_HINT)


@hookimpl
def register_commands(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add `download` (a CosyVoice model) and `health` (GPU facts, CosyVoice checks) to the command line."""
    from .commands import add_parsers

    add_parsers(subparsers)
