"""Fixtures: a config folder per test, and exceptions that end threads."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from wyoming_cosyvoice.config import Config, load_config

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
