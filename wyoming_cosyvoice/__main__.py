"""Command line: `wyoming-cosyvoice serve | plugins | ...`; each subcommand lives in `commands/`."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from typing import Optional, Sequence

from . import __version__
from .errors import CosyVoiceServiceError

COMMANDS = ("serve", "say", "describe", "voices", "plugins", "bench", "download", "health")
"""Subcommand modules in `wyoming_cosyvoice.commands`, in `--help` order; each has `add_parser(subparsers)`."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="wyoming-cosyvoice", description="Wyoming text-to-speech server and client for CosyVoice voice cloning."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f".commands.{name}", __package__).add_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; user-facing errors print as one line and exit with status 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "debug", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
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
