"""`wyoming-cosyvoice park` and `wake`: tell a running server to park its model (free the GPU) or wake it now.

They speak to the server over Wyoming (this server's own `engine-park` / `engine-wake` events), so they work without
the studio; the studio's API has the same as `POST /api/engine/park` and `/api/engine/wake`.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from wyoming_cosyvoice.client import TtsClient
from wyoming_cosyvoice.commands.say import DEFAULT_URI


def add_parsers(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register `park` and `wake`."""
    for action, text in (
        ("park", "park a running server's model now (frees its GPU memory until the next request)"),
        ("wake", "wake a running server's parked model now (instead of at the next request)"),
    ):
        parser = subparsers.add_parser(action, help=text)
        parser.add_argument("--uri", default=DEFAULT_URI, help=f"server (default: {DEFAULT_URI})")
        parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer (default 120)")
        parser.add_argument("--json", action="store_true", help="print JSON")
        parser.set_defaults(func=run, action=action)


async def control(uri: str, action: str, timeout: float) -> dict[str, str]:
    """Send `park` or `wake`; engine name -> state after (empty: no engine there parks)."""
    async with TtsClient(uri, connect_timeout=min(timeout, 10.0), read_timeout=timeout) as client:
        return await client.engine_control(action)


def run(args: argparse.Namespace) -> int:
    """Print each engine's state after the park or wake."""
    states = asyncio.run(control(args.uri, args.action, args.timeout))
    if args.json:
        print(json.dumps({"engines": states}))
    elif not states:
        print("no engine on that server parks (only the CosyVoice engine does)")
    else:
        for name, state in states.items():
            print(f"{name}: {state}")
    return 0
