"""`wyoming-cosyvoice download`: fetch a CosyVoice model into a model directory (ModelScope or Hugging Face)."""

from __future__ import annotations

import argparse
import importlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import DownloadError, EngineUnavailable


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


def add_parser(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register the `download` subcommand."""
    parser = subparsers.add_parser("download", help="download a CosyVoice model (ModelScope or Hugging Face)")
    parser.add_argument("model", help=f"model name: {', '.join(MODELS)}")
    parser.add_argument("--dir", type=Path, help="target model directory (default: pretrained_models/<model>)")
    parser.add_argument(
        "--source",
        choices=("auto", "modelscope", "huggingface"),
        default="auto",
        help="hub to download from (auto: ModelScope when installed, else Hugging Face)",
    )
    parser.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
    """Download, check the result, and print the config line to use."""
    from wyoming_cosyvoice_plugins.cosyvoice.upstream import inspect_model_dir

    target = args.dir or Path("pretrained_models") / args.model
    path = download(args.model, target, args.source)
    try:
        info = inspect_model_dir(path)
    except EngineUnavailable as err:
        raise DownloadError(f"downloaded, but the model directory is not usable: {err}") from None
    print(f"{info.class_name} model ready in {path.resolve()}")
    print(f"Set in server.yaml:  engines: {{cosyvoice: {{model_dir: {path.resolve()}}}}}")
    return 0
