"""The real upstream CosyVoice in tests: where its checkout is, and tiny random-weight models built once per session.

Fixtures (registered in conftest.py, usable by any test): `cosyvoice_repo` (the checkout), `tiny_cosyvoice1`,
`tiny_cosyvoice2`, `tiny_cosyvoice3` (model directories made by tests/tiny_cosyvoice.py with the real classes).
Without a checkout, or without CosyVoice's inference dependencies (script/setup-cosyvoice), every test that uses them
is skipped and the run ends with one line that says why.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REPO = Path(os.environ.get("WYOMING_COSYVOICE_SHARED") or ROOT.parent / "shared") / "cosyvoice-upstream"
"""Where the checkout is looked for when COSYVOICE_REPO is not set."""

MODULES = ("torch", "torchaudio", "whisper", "transformers", "hyperpyyaml", "onnxruntime", "onnx", "diffusers")
"""What the real code needs importable (a sample: script/setup-cosyvoice installs the whole set)."""

_skipped: list[str] = []


def upstream_repo() -> Optional[Path]:
    """The CosyVoice checkout: $COSYVOICE_REPO, else ../shared/cosyvoice-upstream; None when there is none."""
    repo = Path(os.environ.get("COSYVOICE_REPO") or DEFAULT_REPO)
    return repo.resolve() if (repo / "cosyvoice" / "cli" / "cosyvoice.py").is_file() else None


def unavailable() -> Optional[str]:
    """Why the real-code tests cannot run here, or None."""
    if upstream_repo() is None:
        where = os.environ.get("COSYVOICE_REPO") or str(DEFAULT_REPO)
        return f"no CosyVoice checkout at {where} (set COSYVOICE_REPO)"
    missing = [name for name in MODULES if importlib.util.find_spec(name) is None]
    if missing:
        return f"CosyVoice's inference dependencies are missing ({', '.join(missing)}): run script/setup-cosyvoice"
    return None


def skip_summary() -> Optional[str]:
    """The one line for the end of the run when real-code tests were skipped."""
    return f"CosyVoice real-code tests skipped: {_skipped[0]}" if _skipped else None


@pytest.fixture(scope="session")
def cosyvoice_repo() -> Path:
    """The upstream checkout (the tests using it skip when it or the dependencies are missing)."""
    reason = unavailable()
    if reason:
        _skipped.append(reason)
        pytest.skip(reason)
    repo = upstream_repo()
    assert repo is not None
    return repo


def build_tiny_model(repo: Path, out: Path, version: int) -> Path:
    """Build a tiny model directory in this process, leaving no upstream module, path or logging change behind."""
    from .cosyvoice_support import forget_cosyvoice
    from .tiny_cosyvoice import build

    root = logging.getLogger()
    level, handlers, path = root.level, list(root.handlers), list(sys.path)
    started = time.perf_counter()
    try:
        build(repo, out, version=version)
    finally:
        # Importing upstream's modules calls logging.basicConfig(level=DEBUG); the engine imports them afresh.
        root.setLevel(level)
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        sys.path[:] = path
        forget_cosyvoice()
    logging.getLogger(__name__).info("tiny CosyVoice %d built in %.1f s", version, time.perf_counter() - started)
    return out


def _model(request: Any, version: int) -> Path:
    repo = request.getfixturevalue("cosyvoice_repo")
    out = request.getfixturevalue("tmp_path_factory").mktemp(f"tiny-cosyvoice{version}")
    return build_tiny_model(repo, out, version)


@pytest.fixture(scope="session")
def tiny_cosyvoice1(request: pytest.FixtureRequest) -> Path:
    """A tiny random-weight CosyVoice 1 (300M layout, built-in speakers in spk2info.pt)."""
    return _model(request, 1)


@pytest.fixture(scope="session")
def tiny_cosyvoice2(request: pytest.FixtureRequest) -> Path:
    """A tiny random-weight CosyVoice 2."""
    return _model(request, 2)


@pytest.fixture(scope="session")
def tiny_cosyvoice3(request: pytest.FixtureRequest) -> Path:
    """A tiny random-weight CosyVoice 3."""
    return _model(request, 3)


def engine_section(repo: Path, model_dir: Path, cache_dir: Path, **settings: Any) -> dict[str, Any]:
    """`engines.cosyvoice` settings for a tiny model on this machine (CPU unless CUDA is there)."""
    import torch

    return {
        "repo": str(repo),
        "model_dir": str(model_dir),
        "cache_dir": str(cache_dir),
        "require_gpu": bool(torch.cuda.is_available()),
        "warmup_text": "Warm up.",
        **settings,
    }
