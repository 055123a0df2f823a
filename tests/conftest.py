"""Fixtures: a config folder per test, exceptions that end threads, the real upstream CosyVoice (tests/realcode.py)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from wyoming_cosyvoice.config import Config, load_config

from .helpers import write_config
from .realcode import cosyvoice_repo, skip_summary, tiny_cosyvoice1, tiny_cosyvoice2, tiny_cosyvoice3

__all__ = ["cosyvoice_repo", "tiny_cosyvoice1", "tiny_cosyvoice2", "tiny_cosyvoice3"]


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


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line when the real-code CosyVoice tests could not run here."""
    line = skip_summary()
    if line:
        terminalreporter.write_line(line, yellow=True)
