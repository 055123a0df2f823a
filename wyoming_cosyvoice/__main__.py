"""Command line: `wyoming-cosyvoice serve | plugins | ...`; each built-in subcommand lives in `commands/`, and plugins
add theirs through the `register_commands` hook (CosyVoice's `download` and `health`)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from typing import Optional, Sequence

from . import __version__
from .errors import CosyVoiceServiceError, MissingExtra
from .plugins import Plugins

COMMANDS = ("serve", "say", "describe", "voices", "plugins", "bench")
"""Subcommand modules in `wyoming_cosyvoice.commands`, in `--help` order; each has `add_parser(subparsers)`."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand: the built-in ones, then those of built-in and installed plugins."""
    parser = argparse.ArgumentParser(
        prog="wyoming-cosyvoice", description="Wyoming text-to-speech server and client for CosyVoice voice cloning."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f".commands.{name}", __package__).add_parser(subparsers)
    Plugins().add_commands(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; user-facing errors print as one line and exit with status 2 (1: a missing optional extra)."""
    try:
        parser = build_parser()
    except CosyVoiceServiceError as err:  # a plugin that cannot load, or a command name taken twice
        print(f"error: {err}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "debug", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except MissingExtra as err:  # an optional extra this command needs: the line says how to add it
        print(f"error: {err}", file=sys.stderr)
        return 1
    except CosyVoiceServiceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into a program that stopped reading (`say ... | head`): not an error worth a traceback.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's exit flush quiet
        return 141


if __name__ == "__main__":
    sys.exit(main())
