"""Fixtures: a config folder per test, exceptions that end threads, the tiny real CosyVoice2 model."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from wyoming_cosyvoice.config import Config, load_config

from .cosyvoice_support import ROOT, real_code_missing, upstream_repo
from .helpers import write_config


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """A config with two espeak voices (tars: en-US, default; anna: de-DE), listening on an ephemeral port."""
    return load_config(write_config(tmp_path / "cfg"))


@pytest.fixture
def thread_errors(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Exceptions that end any thread during the test (threading.excepthook)."""
    errors: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    return errors


@pytest.fixture(scope="session")
def cosyvoice_repo() -> Path:
    """The real upstream checkout; the tests using it skip with one line when it or upstream's packages are missing."""
    why = real_code_missing()
    if why:
        pytest.skip(why)
    return upstream_repo()


@pytest.fixture(scope="session")
def tiny_cosyvoice2(cosyvoice_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight CosyVoice2 model directory, built once per session by tests/tiny_cosyvoice2.py with the
    real classes."""
    out = tmp_path_factory.mktemp("tiny-cosyvoice2") / "CosyVoice2-tiny"
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "tests.tiny_cosyvoice2", "--repo", str(cosyvoice_repo), "--out", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=600,
    )
    print(f"\ntiny CosyVoice2 model built in {time.perf_counter() - started:.1f} s")
    return out
