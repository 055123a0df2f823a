"""Subcommands of the `wyoming-cosyvoice` CLI, one module each (`add_parser(subparsers)`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from ..config import DEFAULT_CONFIG_DIR, Config, load_config


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """The `--config` option shared by commands that read server.yaml."""
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"server config YAML (default: {DEFAULT_CONFIG_DIR / 'server.yaml'} when it exists)",
    )
    parser.add_argument("--debug", action="store_true", help="log debug messages")


def read_config(path: Optional[Path]) -> Config:
    """Load --config, or the project's config/server.yaml, or built-in defaults."""
    if path is None:
        default = DEFAULT_CONFIG_DIR / "server.yaml"
        path = default if default.is_file() else None
    return load_config(path)
