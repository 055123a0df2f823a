"""Subcommands of the `wyoming-cosyvoice` CLI, one module each (`add_parser(subparsers)`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional

from ..config import Config, load_config, non_finite
from ..paths import DATA_ENV, choose_config, use_data_dir

_LOGGER = logging.getLogger(__name__)


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds above 0 (`nan` and `inf` would pass every comparison)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if non_finite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds above 0, got {text!r}")
    return value


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """The `--config` and `--data-dir` options shared by commands that read server.yaml."""
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="server config YAML (default: server.yaml in the data folder, or config/ in a source checkout)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=(
            "data folder: server.yaml, voices.yaml, voices/ and cache/, made from the defaults when new "
            f"(default: ${DATA_ENV}; else config/ in a source checkout; else ~/.local/share/wyoming-cosyvoice)"
        ),
    )
    parser.add_argument("--debug", action="store_true", help="log debug messages")


def read_config(path: Optional[Path], data_dir: Optional[Path] = None) -> Config:
    """Load --config, else the data folder's or the checkout's server.yaml (README "Where files live")."""
    choice = choose_config(path, data_dir)
    if choice.data_dir is not None:
        use_data_dir(choice.data_dir)
    _LOGGER.debug("Configuration: %s (%s)", choice.path, choice.reason)
    return load_config(choice.path)
