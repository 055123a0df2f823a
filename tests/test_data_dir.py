"""The data folder: which server.yaml is read, first-use creation that never overwrites, voices add, the cache."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator

import pytest

from wyoming_cosyvoice import paths
from wyoming_cosyvoice.__main__ import main
from wyoming_cosyvoice.commands import read_config
from wyoming_cosyvoice.paths import CACHE_ENV, DATA_ENV, choose_config, prepare_data_dir

from . import audiogen

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No data or cache folder named by the environment; XDG folders inside the test's folder."""
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.delenv(CACHE_ENV, raising=False)  # restored after the test even when the code under test sets it
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    # The voices commands quiet the plugins' logger for their own output; leave it as found for later tests.
    plugins_logger = logging.getLogger("wyoming_cosyvoice_plugins")
    level = plugins_logger.level
    yield
    plugins_logger.setLevel(level)


def test_precedence_config_then_data_dir_then_env_then_checkout_then_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    explicit = tmp_path / "mine.yaml"
    assert choose_config(explicit, tmp_path / "data").path == explicit
    assert not (tmp_path / "data").exists(), "--config wins; the data folder is not even made"
    choice = choose_config(None, tmp_path / "data")
    assert (choice.path, choice.data_dir, choice.reason) == (
        tmp_path / "data" / "server.yaml",
        tmp_path / "data",
        "--data-dir",
    )
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env-data"))
    assert choose_config(None, tmp_path / "data").data_dir == tmp_path / "data", "--data-dir beats the variable"
    assert choose_config(None, None).path == tmp_path / "env-data" / "server.yaml"
    monkeypatch.delenv(DATA_ENV)
    # This test runs from a checkout: its config/ serves, as before, and no data folder is made.
    choice = choose_config(None, None)
    assert choice.path == ROOT / "config" / "server.yaml" and choice.data_dir is None
    assert not (tmp_path / "xdg-data").exists()
    # An installed copy (no checkout around the package): the XDG data folder.
    monkeypatch.setattr(paths, "checkout_dir", lambda: None)
    choice = choose_config(None, None)
    assert choice.path == tmp_path / "xdg-data" / "wyoming-cosyvoice" / "server.yaml"
    assert choice.path.is_file() and choice.reason == "default data folder"


def test_first_use_copies_the_defaults_and_never_overwrites(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert prepare_data_dir(data) == data / "server.yaml"
    for name in ("server.yaml", "voices.yaml"):
        assert (data / name).read_bytes() == (ROOT / "config" / name).read_bytes()
    assert (data / "voices").is_dir()
    assert sorted(p.name for p in data.iterdir()) == ["server.yaml", "voices", "voices.yaml"], "no temp files left"
    (data / "server.yaml").write_text("server: {max_concurrent: 2}\n")
    (data / "voices.yaml").unlink()
    prepare_data_dir(data)
    assert (data / "server.yaml").read_text() == "server: {max_concurrent: 2}\n", "the user's file stays"
    assert (data / "voices.yaml").read_bytes() == (ROOT / "config" / "voices.yaml").read_bytes(), (
        "a missing one is made"
    )


def test_a_data_folder_that_cannot_be_made_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["voices", "list", "--data-dir", str(blocker / "data")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {blocker / 'data'}: cannot prepare the data folder: ")


def test_data_folder_serves_the_shipped_voices_and_voices_add_writes_there(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "data"
    config = read_config(None, data)
    assert config.source == str(data / "server.yaml") and config.base_dir == data.resolve()
    assert os.environ[CACHE_ENV] == str(data.resolve() / "cache"), "caches live in the data folder"
    assert main(["voices", "check", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "robot-en: ok" in out and "robot-de: ok" in out and "note: " in out and "voice 'tars': not set up" in out
    audiogen.write(tmp_path / "alice.wav", seconds=4.0)
    assert main(["voices", "add", "alice", str(tmp_path / "alice.wav"), "--data-dir", str(data)]) == 0
    assert (data / "voices" / "en_US" / "alice" / "reference.wav").is_file()
    assert main(["voices", "list", "--data-dir", str(data)]) == 0
    assert "alice" in capsys.readouterr().out


def test_cache_variable_wins_over_the_data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "my-cache"))
    read_config(None, tmp_path / "data")
    assert os.environ[CACHE_ENV] == str(tmp_path / "my-cache")
    assert paths.cache_dir() == tmp_path / "my-cache"


def test_one_cache_root_for_references_and_the_cosyvoice_prompt_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both caches follow $WYOMING_COSYVOICE_CACHE (the CosyVoice prompt cache used to ignore it)."""
    from wyoming_cosyvoice.reference import default_cache_dir
    from wyoming_cosyvoice_plugins.cosyvoice import prompts

    assert prompts.default_cache_dir() == tmp_path / "xdg-cache" / "wyoming-cosyvoice"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert prompts.default_cache_dir() == tmp_path / "c"
    assert default_cache_dir() == tmp_path / "c" / "references"


def test_default_voice_paths_are_beside_server_yaml_not_in_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server.yaml without `voice_providers` uses the voices.yaml and voices/ beside it, wherever it is run from."""
    from wyoming_cosyvoice.config import load_config
    from wyoming_cosyvoice.plugins import Plugins
    from wyoming_cosyvoice.server import build_catalog

    config_dir, elsewhere = tmp_path / "cfg", tmp_path / "elsewhere"
    for folder, name in ((config_dir, "beside"), (elsewhere, "cwd")):
        (folder / "voices" / "en_US" / f"{name}-folder").mkdir(parents=True)
        audiogen.write(folder / "voices" / "en_US" / f"{name}-folder" / "reference.wav")
        (folder / "voices.yaml").write_text(f"voices:\n  - name: {name}\n    languages: [en-US]\n")
    (config_dir / "server.yaml").write_text("engine:\n  name: espeak\n")
    monkeypatch.chdir(elsewhere)
    catalog = build_catalog(load_config(Path("..") / "cfg" / "server.yaml"), Plugins())
    assert [p.name for p in catalog.all_profiles] == ["beside", "beside-folder"]
