"""`wyoming-cosyvoice serve`: run the Wyoming TTS server."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
from pathlib import Path

from ..config import Config
from ..extras import require
from ..plugins import Plugins
from . import add_config_argument, read_config

_LOGGER = logging.getLogger(__name__)


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register the `serve` subcommand."""
    parser = subparsers.add_parser("serve", help="run the Wyoming TTS server")
    add_config_argument(parser)
    parser.add_argument("--uri", help="listen on tcp://HOST:PORT, unix://PATH or stdio:// (overrides server.uri)")
    parser.add_argument("--engine", help="engine name (overrides engine.name)")
    parser.add_argument("--no-fallback", action="store_true", help="refuse to start when the engine cannot load")
    parser.add_argument("--voices", type=Path, help="voices YAML file (overrides voice_providers.yaml.path)")
    parser.add_argument("--plugins-dir", type=Path, help="extra plugins folder (overrides server.plugins_dir)")
    parser.add_argument(
        "--max-concurrent", type=int, help="admitted requests at once (overrides server.max_concurrent)"
    )
    parser.add_argument(
        "--zeroconf",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="announce via mDNS for Home Assistant discovery",
    )
    parser.add_argument(
        "--web", action="store_true", help="also serve the voice studio page (web.enabled; needs the web extra)"
    )
    parser.add_argument("--web-host", help="address of the studio page (overrides web.host; default 127.0.0.1)")
    parser.add_argument("--web-port", type=int, help="port of the studio page (overrides web.port; default 10201)")
    parser.add_argument(
        "--metrics-port", type=int, help="serve /metrics alone on this port (overrides metrics.port; docs/metrics.md)"
    )
    parser.set_defaults(func=run)


def apply_overrides(config: Config, args: argparse.Namespace) -> Config:
    """CLI flags override YAML."""
    server = config.server
    if args.uri:
        server = dataclasses.replace(server, uri=args.uri)
    if args.plugins_dir:
        server = dataclasses.replace(server, plugins_dir=args.plugins_dir.resolve())
    if args.max_concurrent is not None:
        server = dataclasses.replace(server, max_concurrent=args.max_concurrent)
    if args.zeroconf is not None:
        server = dataclasses.replace(server, zeroconf=args.zeroconf)
    engine = config.engine
    if args.engine:
        engine = dataclasses.replace(engine, name=args.engine)
    if args.no_fallback:
        engine = dataclasses.replace(engine, fallback=None)
    providers = dict(config.voice_providers)
    if args.voices:
        providers["yaml"] = {**(providers.get("yaml") or {}), "path": str(args.voices.resolve())}
    web = config.web
    if getattr(args, "web", False):
        web = dataclasses.replace(web, enabled=True)
    if getattr(args, "web_host", None):
        web = dataclasses.replace(web, host=args.web_host)
    if getattr(args, "web_port", None) is not None:
        web = dataclasses.replace(web, port=args.web_port)
    metrics = config.metrics
    if getattr(args, "metrics_port", None) is not None:
        metrics = dataclasses.replace(metrics, port=args.metrics_port)
    for prefix, settings in (("", server), ("web-", web), ("metrics-", metrics)):
        problem = settings.validate()
        if problem:
            from ..errors import ConfigError

            raise ConfigError(f"command line: --{prefix}{problem[0].replace('_', '-')}: {problem[1]}")
    return dataclasses.replace(
        config, server=server, engine=engine, voice_providers=providers, web=web, metrics=metrics
    )


def run(args: argparse.Namespace) -> int:
    """Load config and plugins, then serve until SIGINT/SIGTERM."""
    from .. import server

    config = apply_overrides(read_config(args.config, args.data_dir), args)
    # Before anything loads: a missing optional extra is one line (exit 1), not a traceback after the model load.
    if config.server.zeroconf:
        require("zeroconf", "--zeroconf (server.zeroconf: announcing the server to Home Assistant)")
    if config.web.enabled:
        require("web", "the voice studio (--web, web.enabled)")
    if not args.debug:
        logging.getLogger().setLevel(config.server.log_level)
    _LOGGER.info("Configuration: %s", config.source)
    plugins = Plugins(config.server.plugins_dir)
    asyncio.run(server.run(config, plugins))
    return 0
