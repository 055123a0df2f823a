"""Config errors: each documented case gives one line naming file, key path and problem."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from wyoming_cosyvoice.__main__ import main
from wyoming_cosyvoice.commands.serve import apply_overrides
from wyoming_cosyvoice.config import DEFAULT_CONFIG_DIR, load_config
from wyoming_cosyvoice.errors import ConfigError


def _error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "server.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    return message


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("server:\n  uri: tcp://0.0.0.0:1\n  colour: red\n", ":server.colour: unknown key"),
        ("sever:\n  uri: x\n", ":sever: unknown key"),
        ("server:\n  max_concurrent: four\n", ":server.max_concurrent: expected an integer, got 'four'"),
        ("server:\n  max_concurrent: 0\n", ":server.max_concurrent: must be at least 1"),
        ("server:\n  first_clause_words: -1\n", ":server.first_clause_words: must be 0 (off) or more"),
        ("server:\n  zeroconf: 'yes'\n", ":server.zeroconf: expected true or false, got 'yes'"),
        ("server:\n  log_level: LOUD\n", ":server.log_level: expected one of 'DEBUG', 'INFO'"),
        ("server:\n  uri: http://x:1\n", ":server.uri: expected tcp://HOST:PORT"),
        ("server: [1, 2]\n", ":server: expected a mapping, got list"),
        ("engine:\n  name: 5\n", ":engine.name: expected a string, got 5"),
        ("- just\n- a list\n", ":(top level): expected a mapping, got list"),
        ("server:\n\turi: x\n", ":line 2: invalid YAML: found character '\\t' that cannot start any token"),
        ("engines: 3\n", ":engines: expected a mapping, got 3"),
    ],
)
def test_config_errors_are_one_line(tmp_path: Path, yaml_text: str, expected: str) -> None:
    assert expected in _error(tmp_path, yaml_text)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found$"):
        load_config(tmp_path / "nope.yaml")


def test_plugin_section_errors_name_the_plugin_key(tmp_path: Path) -> None:
    from wyoming_cosyvoice_plugins.espeak_engine import EspeakSettings

    path = tmp_path / "server.yaml"
    path.write_text("engines:\n  espeak:\n    rate: fast\n    pitch: 50\n")
    config = load_config(path)
    with pytest.raises(ConfigError, match=r"server\.yaml:engines\.espeak\.rate: expected an integer, got 'fast'$"):
        config.section("engines", "espeak").parse(EspeakSettings)
    path.write_text("engines:\n  espeak:\n    rate: 20\n")
    with pytest.raises(ConfigError, match=r"engines\.espeak\.rate: must be between 80 and 500"):
        load_config(path).section("engines", "espeak").parse(EspeakSettings)


def test_voices_file_errors(tmp_path: Path) -> None:
    from wyoming_cosyvoice_plugins.yaml_voices import YamlVoiceProvider

    with pytest.raises(ConfigError, match=r"voices\.yaml: voices file not found"):
        YamlVoiceProvider(tmp_path / "voices.yaml")
    path = tmp_path / "voices.yaml"
    path.write_text("voices:\n  - name: a\n    languages: [en-US]\n  - name: b\n    speed: fast\n")
    provider = YamlVoiceProvider(path)
    assert [p.name for p in provider.load()] == ["a"]
    # One line naming the file, the profile and the problem (key path included).
    assert provider.problems == [f"{path}: voice 'b': voices[1].speed: expected a number, got 'fast'"]


def test_shipped_config_loads_and_paths_resolve() -> None:
    config = load_config(DEFAULT_CONFIG_DIR / "server.yaml")
    assert config.server.uri == "tcp://0.0.0.0:10200"
    assert config.engine.name == "cosyvoice" and config.engine.fallback == "espeak"
    assert config.base_dir == DEFAULT_CONFIG_DIR


def test_cli_flags_override_yaml(tmp_path: Path) -> None:
    config = load_config(DEFAULT_CONFIG_DIR / "server.yaml")
    args = argparse.Namespace(
        uri="tcp://127.0.0.1:1234",
        plugins_dir=None,
        max_concurrent=2,
        zeroconf=True,
        engine="espeak",
        no_fallback=True,
        voices=tmp_path / "v.yaml",
    )
    config = apply_overrides(config, args)
    assert config.server.uri == "tcp://127.0.0.1:1234"
    assert config.server.max_concurrent == 2 and config.server.zeroconf
    assert config.engine.name == "espeak" and config.engine.fallback is None
    assert config.voice_providers["yaml"]["path"] == str((tmp_path / "v.yaml").resolve())


def test_cli_prints_config_error_as_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "server.yaml"
    path.write_text("server:\n  max_concurrent: many\n")
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path}:server.max_concurrent: expected an integer, got 'many'"]
