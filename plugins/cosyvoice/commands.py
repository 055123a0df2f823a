"""CosyVoice's own commands: `download` fetches a model into a model directory (ModelScope or Hugging Face);
`health` prints GPU facts and whether the CosyVoice engine could start here, without loading it, and when another
engine is configured (e.g. triton) starts that engine as `serve` would and prints its facts.

Registered through the `register_commands` hook (`__init__.py`). Imports stay light at module level: `--help` builds
every command's parser; torch and the checkout are touched only when a command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from wyoming_cosyvoice.commands import add_config_argument, read_config
from wyoming_cosyvoice.config import Config
from wyoming_cosyvoice.errors import CosyVoiceServiceError, DownloadError, EngineUnavailable
from wyoming_cosyvoice.paths import checkout_dir


def add_parsers(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register the `download`, `health`, `park` and `wake` subcommands."""
    from . import control

    add_download_parser(subparsers)
    add_health_parser(subparsers)
    control.add_parsers(subparsers)


# ---------------------------------------------------------------------------- download


@dataclass(frozen=True)
class ModelSource:
    """Where one model lives on each hub."""

    modelscope: str
    """ModelScope model id."""

    huggingface: str
    """Hugging Face repository id."""


MODELS = {
    "Fun-CosyVoice3-0.5B": ModelSource("FunAudioLLM/Fun-CosyVoice3-0.5B-2512", "FunAudioLLM/Fun-CosyVoice3-0.5B-2512"),
    "CosyVoice2-0.5B": ModelSource("iic/CosyVoice2-0.5B", "FunAudioLLM/CosyVoice2-0.5B"),
    "CosyVoice-300M": ModelSource("iic/CosyVoice-300M", "FunAudioLLM/CosyVoice-300M"),
    "CosyVoice-300M-SFT": ModelSource("iic/CosyVoice-300M-SFT", "FunAudioLLM/CosyVoice-300M-SFT"),
    "CosyVoice-300M-Instruct": ModelSource("iic/CosyVoice-300M-Instruct", "FunAudioLLM/CosyVoice-300M-Instruct"),
}
"""Model names (the folder names upstream uses under pretrained_models/) and their hub ids."""


def add_download_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register the `download` subcommand."""
    parser = subparsers.add_parser("download", help="download a CosyVoice model (ModelScope or Hugging Face)")
    parser.add_argument("model", help=f"model name: {', '.join(MODELS)}")
    parser.add_argument(
        "--dir", type=Path, help="target model directory (default: models/<model> beside the server.yaml in use)"
    )
    add_config_argument(parser)
    parser.add_argument(
        "--source",
        choices=("auto", "modelscope", "huggingface"),
        default="auto",
        help="hub to download from (auto: ModelScope when installed, else Hugging Face)",
    )
    parser.set_defaults(func=run_download)


def manual_steps(name: str, target: Path, client_installed: bool = False) -> str:
    """What to type when this program cannot download by itself."""
    source = MODELS[name]
    first = "" if client_installed else "install a hub client and rerun (pip install huggingface_hub, or pip install "
    first += "" if client_installed else "modelscope), or "
    return (
        f"{first}fetch it with git: git lfs install && git clone https://huggingface.co/{source.huggingface} {target} "
        f"(or from ModelScope: git clone https://www.modelscope.cn/{source.modelscope}.git {target}); "
        f"then set engines.cosyvoice.model_dir: {target} in server.yaml"
    )


_NETWORK_ERRORS = (
    "ConnectError",
    "ConnectTimeout",
    "ConnectionError",
    "LocalEntryNotFoundError",
    "MaxRetryError",
    "NameResolutionError",
    "NewConnectionError",
    "OfflineModeIsEnabled",
    "ReadTimeout",
)
"""Exception class names (huggingface_hub, httpx, requests, urllib3) that mean the hub could not be reached."""


def unreachable_cause(err: BaseException) -> Optional[str]:
    """When `err` (or what caused it) says the hub could not be reached: the innermost cause, else None."""
    found: Optional[BaseException] = None
    seen: set[int] = set()
    current: Optional[BaseException] = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectionError, TimeoutError, socket.gaierror)) or any(
            klass.__name__ in _NETWORK_ERRORS for klass in type(current).__mro__
        ):
            found = current
        current = current.__cause__ or current.__context__
    if found is None:
        return None
    text = str(found).strip().splitlines()[0] if str(found).strip() else ""
    return f"{type(found).__name__}: {text}" if text else type(found).__name__


def hub_host(client_name: str) -> str:
    """The host a hub client talks to (huggingface_hub honours HF_ENDPOINT)."""
    if client_name == "modelscope":
        return "www.modelscope.cn"
    return os.environ.get("HF_ENDPOINT") or "huggingface.co"


def _client(source: str) -> tuple[str, Optional[object]]:
    order = {
        "auto": ("modelscope", "huggingface_hub"),
        "modelscope": ("modelscope",),
        "huggingface": ("huggingface_hub",),
    }[source]
    for module_name in order:
        try:
            return module_name, importlib.import_module(module_name)
        except ImportError:
            continue
    return order[-1], None


def download(name: str, target: Path, source: str = "auto") -> Path:
    """Download model `name` into `target` with the hub client's progress bar; returns the model directory."""
    if name not in MODELS:
        raise DownloadError(f"unknown model {name!r} (known: {', '.join(MODELS)})")
    client_name, client = _client(source)
    if client is None:
        wanted = "neither modelscope nor huggingface_hub is" if source == "auto" else f"{client_name} is not"
        raise DownloadError(f"cannot download {name}: {wanted} installed; " + manual_steps(name, target))
    hub_id = MODELS[name].modelscope if client_name == "modelscope" else MODELS[name].huggingface
    print(f"Downloading {name} ({hub_id}) from {client_name} into {target} ...", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        client.snapshot_download(hub_id, local_dir=str(target))  # type: ignore[attr-defined]
    except Exception as err:  # network, authentication, disk: all end in the same advice
        cause = unreachable_cause(err)
        if cause is not None:
            raise DownloadError(
                f"cannot download {name}: {hub_host(client_name)} is unreachable from this machine ({cause}); check "
                "the network (a proxy: HTTPS_PROXY; a Hugging Face mirror: HF_ENDPOINT) and rerun, or on a machine "
                "that reaches the hub " + manual_steps(name, target, client_installed=True)
            ) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DownloadError(
            f"downloading {name} from {client_name} failed ({first}); "
            + manual_steps(name, target, client_installed=True)
        ) from None
    return target


MODEL_DIR_UNSET = "    model_dir: null"
"""engines.cosyvoice.model_dir as the shipped server.yaml has it (the only form `download` rewrites)."""


def run_download(args: argparse.Namespace) -> int:
    """Download into the data folder's models/ (or --dir), check the result, and set or print model_dir."""
    from .upstream import inspect_model_dir

    config = read_config(args.config, args.data_dir)
    target = (args.dir or config.base_dir / "models" / args.model).expanduser().resolve()
    path = download(args.model, target, args.source)
    try:
        info = inspect_model_dir(path)
    except EngineUnavailable as err:
        raise DownloadError(f"downloaded, but the model directory is not usable: {err}") from None
    print(f"{info.class_name} model ready in {path}")
    source = Path(config.source)
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True) if source.is_file() else []
    unset = [i for i, line in enumerate(lines) if line.rstrip("\r\n") == MODEL_DIR_UNSET]
    checkout = checkout_dir()
    tracked = checkout is not None and source == checkout / "config" / "server.yaml"  # the repository's own file
    if len(unset) == 1 and not tracked:  # the shipped default, untouched: set it (a user's value is never replaced)
        lines[unset[0]] = f"    model_dir: {path}\n"
        source.write_text("".join(lines), encoding="utf-8")
        print(f"Set engines.cosyvoice.model_dir: {path} in {source}")
    else:
        print(f"Set in {source}:  engines: {{cosyvoice: {{model_dir: {path}}}}}")
    return 0


# ---------------------------------------------------------------------------- health


def add_health_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register the `health` subcommand."""
    parser = subparsers.add_parser("health", help="GPU facts and CosyVoice engine checks (does not load the model)")
    add_config_argument(parser)
    parser.set_defaults(func=run_health)


def checks(settings: Any) -> tuple[list[tuple[str, str]], bool]:
    """(key, value) rows and whether every piece the engine needs is present."""
    from . import upstream
    from .options import plan_load

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
        device = f"available: {torch.cuda.get_device_name()}" if cuda else "not available"
        rows.append(("torch", f"{torch.__version__}, CUDA {device}"))
        trt = upstream.tensorrt_version() if cuda else None
        rows.append(("tensorrt", trt or "not installed"))
        plan = plan_load(settings, info.version, info.path, cuda, capability, trt)
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


def run_health(args: argparse.Namespace) -> int:
    """Print GPU facts and engine checks; exit 1 when the configured engine could not start."""
    from wyoming_cosyvoice.gpu import driver_fit_here, gpu_facts

    from .options import CosyVoiceSettings

    config = read_config(args.config, args.data_dir)
    facts = gpu_facts()
    for key, value in facts.as_dict().items():
        print(f"{key}: {value}")
    print(f"cuda_fit: {driver_fit_here(facts).line}")
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


async def _start_configured(config: Config) -> bool:
    """Start the configured (non-CosyVoice) engine through its plugin, print its health facts, close it."""
    from wyoming_cosyvoice.plugins import Plugins

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
