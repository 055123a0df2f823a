"""Where files live: the defaults shipped with the package, the data folder a user changes, and the cache.

Which `server.yaml` a command reads (README "Where files live"):
1. `--config FILE`, when given;
2. the data folder named by `--data-dir` or `$WYOMING_COSYVOICE_DATA`;
3. a source checkout's `config/` (the package runs from a folder beside `pyproject.toml` and `config/`), as before;
4. otherwise (an installed copy) the default data folder, `$XDG_DATA_HOME/wyoming-cosyvoice`
   (`~/.local/share/wyoming-cosyvoice`).
A data folder gets `server.yaml` and `voices.yaml` copied from the shipped defaults the first time it is used; a file
already there is never replaced. Caches live in `$WYOMING_COSYVOICE_CACHE`, which the command line sets to
`<data folder>/cache` when a data folder is in use and the variable is not set; else `~/.cache/wyoming-cosyvoice`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

_LOGGER = logging.getLogger(__name__)

DATA_ENV = "WYOMING_COSYVOICE_DATA"
"""Environment variable naming the data folder (like `--data-dir`)."""

CACHE_ENV = "WYOMING_COSYVOICE_CACHE"
"""Environment variable naming the cache folder (normalized references, prepared voices, TensorRT plans)."""

DATA_FILES = ("server.yaml", "voices.yaml")
"""The files a new data folder gets from the defaults."""

PACKAGE_DIR = Path(__file__).resolve().parent
_SOURCE_ROOT = PACKAGE_DIR.parent


def checkout_dir() -> Optional[Path]:
    """The source checkout the package runs from (editable install, PYTHONPATH), or None for an installed copy."""
    if (_SOURCE_ROOT / "pyproject.toml").is_file() and (_SOURCE_ROOT / "config" / "server.yaml").is_file():
        return _SOURCE_ROOT
    return None


def defaults_dir() -> Path:
    """The default `server.yaml` and `voices.yaml`: package data when installed, `config/` in a checkout."""
    shipped = PACKAGE_DIR / "defaults"
    return shipped if (shipped / "server.yaml").is_file() else _SOURCE_ROOT / "config"


def asset_dir() -> Path:
    """The project's own recordings (with transcripts): package data when installed, `asset/` in a checkout."""
    shipped = PACKAGE_DIR / "asset"
    return shipped if shipped.is_dir() else _SOURCE_ROOT / "asset"


def default_data_dir() -> Path:
    """`$WYOMING_COSYVOICE_DATA`, else `$XDG_DATA_HOME/wyoming-cosyvoice` (default ~/.local/share/...)."""
    named = os.environ.get(DATA_ENV)
    if named:
        return Path(named).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg).expanduser() / "wyoming-cosyvoice"


def cache_dir() -> Path:
    """The project's one cache root: `$WYOMING_COSYVOICE_CACHE`, else `$XDG_CACHE_HOME/wyoming-cosyvoice`."""
    named = os.environ.get(CACHE_ENV)
    if named:
        return Path(named).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "wyoming-cosyvoice"


@dataclass(frozen=True)
class ConfigChoice:
    """Which server.yaml a command reads, and the data folder in use (if any)."""

    path: Optional[Path]
    """The server.yaml to load (None: built-in defaults)."""

    data_dir: Optional[Path] = None
    """The data folder holding it, when one is in use."""

    reason: str = ""
    """Why this file was chosen (for the startup log)."""


def choose_config(config: Optional[Path], data_dir: Optional[Path]) -> ConfigChoice:
    """Apply the precedence above; prepares a data folder that is used for the first time."""
    if config is not None:
        return ConfigChoice(Path(config), reason="--config")
    if data_dir is not None:
        return ConfigChoice(prepare_data_dir(data_dir), Path(data_dir), "--data-dir")
    if os.environ.get(DATA_ENV):
        folder = default_data_dir()
        return ConfigChoice(prepare_data_dir(folder), folder, f"${DATA_ENV}")
    checkout = checkout_dir()
    if checkout is not None:
        return ConfigChoice(checkout / "config" / "server.yaml", reason="source checkout")
    folder = default_data_dir()
    return ConfigChoice(prepare_data_dir(folder), folder, "default data folder")


def use_data_dir(folder: Path) -> None:
    """Point the cache at `<folder>/cache` unless $WYOMING_COSYVOICE_CACHE says otherwise (process-wide)."""
    os.environ.setdefault(CACHE_ENV, str(Path(folder).resolve() / "cache"))


def prepare_data_dir(folder: Path) -> Path:
    """Create `folder` with `server.yaml`, `voices.yaml` and `voices/` when missing (never replacing a file)."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "voices").mkdir(exist_ok=True)
        for name in DATA_FILES:
            if _copy_new(defaults_dir() / name, folder / name):
                _LOGGER.info("Created %s from the defaults (yours to edit: it is never replaced)", folder / name)
    except OSError as err:
        from .errors import ConfigError

        raise ConfigError(f"{folder}: cannot prepare the data folder: {err}") from None
    return folder / "server.yaml"


def _copy_new(source: Path, target: Path) -> bool:
    """Copy `source` to `target` unless `target` exists; atomic (a reader never sees half a file). True if copied."""
    if target.exists() or target.is_symlink():
        return False
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            shutil.copyfileobj(src, out)
        os.chmod(temp, 0o644)
        try:
            os.link(temp, target)  # fails when another process created the file meanwhile: theirs stays
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create (still never replaces a file)
            try:
                with target.open("xb") as out, source.open("rb") as src:
                    shutil.copyfileobj(src, out)
            except FileExistsError:
                return False
        return True
    finally:
        os.unlink(temp)
