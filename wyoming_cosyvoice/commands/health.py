"""`wyoming-cosyvoice health`: GPU facts and whether the CosyVoice engine could start here, without loading it;
when another engine is configured (e.g. triton), that engine is started as `serve` would and its facts printed."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from ..errors import CosyVoiceServiceError
from . import add_config_argument, read_config


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register the `health` subcommand."""
    parser = subparsers.add_parser("health", help="GPU facts and CosyVoice engine checks (does not load the model)")
    add_config_argument(parser)
    parser.set_defaults(func=run)


def checks(settings: Any) -> tuple[list[tuple[str, str]], bool]:
    """(key, value) rows and whether every piece the engine needs is present."""
    from wyoming_cosyvoice_plugins.cosyvoice import upstream  # moves into the plugin with register_commands
    from wyoming_cosyvoice_plugins.cosyvoice.options import plan_load

    rows: list[tuple[str, str]] = []
    try:
        rows.append(("checkout", str(upstream.check_checkout(settings.repo))))
        info = upstream.inspect_model_dir(settings.model_dir)
        rows.append(("model", f"{info.class_name} in {info.path} ({info.sample_rate} Hz)"))
        try:
            import torch
        except ImportError:
            rows.append(("torch", "not installed (pip install -e '.[gpu]')"))
            return rows, False
        cuda = bool(torch.cuda.is_available())
        capability = tuple(torch.cuda.get_device_capability()) if cuda else None
        rows.append(
            (
                "torch",
                f"{torch.__version__}, CUDA {'available: ' + torch.cuda.get_device_name() if cuda else 'not available'}",
            )
        )
        trt = upstream.tensorrt_version() if cuda else None
        rows.append(("tensorrt", trt or "not installed"))
        plan = plan_load(settings, info.version, info.path, cuda, capability, trt)  # type: ignore[arg-type]
        rows.append(
            (
                "would load",
                f"{plan.device}, {'fp16' if plan.fp16 else 'fp32'}, TensorRT {'on' if plan.load_trt else 'off'}"
                f"{'; ' + '; '.join(plan.notes) if plan.notes else ''}",
            )
        )
    except CosyVoiceServiceError as err:
        rows.append(("problem", str(err)))
        return rows, False
    return rows, True


def run(args: argparse.Namespace) -> int:
    """Print GPU facts and engine checks; exit 1 when the configured engine could not start."""
    from wyoming_cosyvoice_plugins.cosyvoice.options import CosyVoiceSettings

    from ..gpu import gpu_facts

    config = read_config(args.config, args.data_dir)
    for key, value in gpu_facts().as_dict().items():
        print(f"{key}: {value}")
    print(f"engine: {config.engine.name} (fallback: {config.engine.fallback or 'none'})")
    settings = config.section("engines", "cosyvoice").parse(CosyVoiceSettings)
    rows, ok = checks(settings)
    for key, value in rows:
        print(f"cosyvoice {key}: {value}")
    print(f"cosyvoice engine: {'can start' if ok else 'cannot start here'}")
    if config.engine.name != "cosyvoice":  # another engine is configured: start it the way `serve` would
        ok = asyncio.run(_start_configured(config))
    print("A running server reports the same facts (plus prepared voices) in its `describe` info and startup log.")
    return 0 if ok else 1


async def _start_configured(config: Any) -> bool:
    """Start the configured (non-CosyVoice) engine through its plugin, print its health facts, close it."""
    from ..plugins import Plugins

    name = config.engine.name
    try:
        engine = Plugins(config.server.plugins_dir).factory("engines", name)(config.section("engines", name))
        await engine.start()
    except CosyVoiceServiceError as err:
        print(f"{name} engine: cannot start here: {err}")
        return False
    try:
        for key, value in engine.health().items():
            if key != "engine":
                print(f"{name} {key}: {value}")
    finally:
        await engine.close()
    print(f"{name} engine: can start")
    return True
