"""`wyoming-cosyvoice plugins`: list loaded plugins, their hooks, what they register and where they came from."""

from __future__ import annotations

import argparse
import json

from ..plugins import Plugins
from . import add_config_argument, read_config


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register the `plugins` subcommand."""
    parser = subparsers.add_parser("plugins", help="list loaded plugins and what they register")
    add_config_argument(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print each plugin with origin, hooks and registered names."""
    config = read_config(args.config, args.data_dir)
    rows = Plugins(config.server.plugins_dir).describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']}  [{row['origin']}]")
        print(f"  hooks: {', '.join(row['hooks']) or '-'}")
        for group, names in row["registers"].items():
            print(f"  {group}: {', '.join(names)}")
    return 0
