"""Fixtures: a config folder per test, and a real server built from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from wyoming_cosyvoice.config import Config, load_config

from .helpers import write_config


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """A config with two espeak voices (tars: en-US, default; anna: de-DE), listening on an ephemeral port."""
    return load_config(write_config(tmp_path / "cfg"))
