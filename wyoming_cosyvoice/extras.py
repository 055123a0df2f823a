"""Optional extras: whether one is installed, and what to type to add it in the words of the install method in use."""

from __future__ import annotations

import importlib.util
import re
import sys
from importlib import metadata
from pathlib import Path

from .errors import MissingExtra
from .paths import checkout_dir

DISTRIBUTION = "wyoming-cosyvoice"

MODULES = {"speaker": "sounddevice", "zeroconf": "zeroconf", "web": "aiohttp", "plot": "matplotlib"}
"""Extra -> the module whose absence means the extra is missing."""


def install_method(prefix: str = sys.prefix) -> str:
    """ "pipx" (a pipx-managed venv), "checkout" (runs from a source checkout) or "pip"."""
    if re.search(r"[/\\]pipx[/\\]venvs[/\\]", prefix + "/"):
        return "pipx"
    if checkout_dir() is not None:
        return "checkout"
    return "pip"


def extra_requirements(extra: str) -> list[str]:
    """The requirements the installed metadata lists for `extra` (e.g. ["aiohttp>=3.9"])."""
    try:
        requires = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return []
    marker = re.compile(r"""extra\s*==\s*["']%s["']""" % re.escape(extra))
    return [req.split(";")[0].strip() for req in requires if marker.search(req)]


def install_hint(extra: str, method: str = "") -> str:
    """The command that adds `extra` to this installation."""
    method = method or install_method()
    if method == "pipx":
        packages = " ".join(f"'{req}'" for req in extra_requirements(extra)) or MODULES.get(extra, extra)
        return f"pipx inject {DISTRIBUTION} {packages}"
    if method == "checkout":
        checkout = checkout_dir() or Path(".")
        return f"{checkout / '.venv' / 'bin' / 'pip'} install -e '{checkout}[{extra}]'"
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def installed(extra: str) -> bool:
    """Whether the module that `extra` brings can be imported here."""
    return importlib.util.find_spec(MODULES[extra]) is not None


def require(extra: str, what: str) -> None:
    """Raise a one-line MissingExtra when `extra` is not installed; `what` names the feature that needs it."""
    if not installed(extra):
        raise MissingExtra(
            f"{what} needs the '{extra}' extra ({MODULES[extra]} is not installed): {install_hint(extra)}"
        )
