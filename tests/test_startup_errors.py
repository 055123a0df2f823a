"""Start-up errors a user meets (busy port, bad URI, hostile server.yaml, non-finite numbers): one line and a
non-zero exit, found before the engine loads; never a traceback."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from wyoming_cosyvoice.__main__ import main
from wyoming_cosyvoice.config import Section, load_config
from wyoming_cosyvoice.errors import ConfigError

from . import audiogen
from .helpers import write_config


def _serve(capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    """Run `serve ARGS` in this process; its exit status must be 2 and its stderr's non-log lines are returned."""
    assert main(["serve", *args]) == 2
    return [line for line in capsys.readouterr().err.splitlines() if " INFO " not in line]


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("tcp://127.0.0.1:99999", "the port must be a number from 0 to 65535"),
        ("tcp://127.0.0.1:abc", "the port must be a number from 0 to 65535"),
        ("tcp://127.0.0.1", "a tcp:// URI needs a host and a port (tcp://0.0.0.0:10200)"),
        ("unix://", "a unix:// URI needs a path (unix:///run/wyoming.sock)"),
    ],
)
def test_bad_uri_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], uri: str, problem: str) -> None:
    config = write_config(tmp_path)
    assert _serve(capsys, "--config", str(config), "--uri", uri) == [f"error: command line: --uri: {uri!r}: {problem}"]


def test_busy_port_is_one_line_before_the_engine_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    config = write_config(tmp_path)
    with socket.socket() as other:  # another server (wyoming-piper, a second instance) holds the port
        other.bind(("127.0.0.1", 0))
        other.listen()
        uri = f"tcp://127.0.0.1:{other.getsockname()[1]}"
        with caplog.at_level(logging.INFO):
            lines = _serve(capsys, "--config", str(config), "--uri", uri)
    assert lines == [
        f"error: server.uri: cannot listen on {uri}: the address is already in use "
        + ("(another server on this port: a second wyoming-cosyvoice, wyoming-piper?)")
    ]
    assert not [r for r in caplog.records if "ready" in r.getMessage()]  # found before any engine started


def test_missing_socket_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    uri = f"unix://{tmp_path}/nonexistent/dir/sock"
    lines = _serve(capsys, "--config", str(config), "--uri", uri)
    assert lines == [f"error: server.uri: cannot listen on {uri}: the folder does not exist"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("server: " + "[" * 800 + "]" * 800 + "\n", "invalid YAML: nested too deeply"),  # 5,000 takes 2 s more
        ("server:\n" + "".join(" " * i + "a:\n" for i in range(1, 5000)), "invalid YAML: nested too deeply"),
        (
            "server:\n  max_concurrent: " + "9" * 5000 + "\n",
            "invalid YAML: Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits",
        ),
    ],
    ids=["flow-nesting", "block-nesting", "5000-digits"],
)
def test_hostile_server_yaml_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, problem: str
) -> None:
    path = tmp_path / "server.yaml"
    path.write_text(text)
    assert _serve(capsys, "--config", str(path)) == [f"error: {path}: {problem}"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("limits:\n  engine_timeout_s: .nan\n", "limits.engine_timeout_s: expected a finite number, got nan"),
        ("limits:\n  max_reference_seconds: .inf\n", "limits.max_reference_seconds: expected a finite number, got inf"),
        ("limits:\n  shutdown_grace_s: -.inf\n", "limits.shutdown_grace_s: expected a finite number, got -inf"),
        ("limits:\n  idle_timeout_s: 1.0e+999\n", "limits.idle_timeout_s: expected a finite number, got inf"),
        ("limits:\n  write_timeout_s: 0x" + "f" * 300 + "\n", "limits.write_timeout_s: expected a number below 1e308"),
    ],
)
def test_non_finite_numbers_are_refused(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "server.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:{problem}")


def test_plugin_settings_refuse_non_finite_numbers(tmp_path: Path) -> None:
    """Each plugin parses its own section (`Section.parse`) through the same check."""
    from wyoming_cosyvoice_plugins.triton.settings import TritonSettings
    from wyoming_cosyvoice_plugins.wyoming_snd_sink import WyomingSndSettings

    section = Section("triton", {"first_audio_timeout_s": float("nan")}, "server.yaml", "engines.triton", tmp_path)
    with pytest.raises(ConfigError, match=r"^server\.yaml:engines\.triton\.first_audio_timeout_s: expected a finite"):
        section.parse(TritonSettings)
    path = tmp_path / "server.yaml"
    path.write_text("sinks:\n  wyoming:\n    uri: tcp://127.0.0.1:10601\n    played_grace: .inf\n")
    with pytest.raises(ConfigError, match=r"server\.yaml:sinks\.wyoming\.played_grace: expected a finite number"):
        load_config(path).section("sinks", "wyoming").parse(WyomingSndSettings)


def test_voice_with_non_finite_speed_or_option_is_skipped(tmp_path: Path) -> None:
    from wyoming_cosyvoice_plugins.folder_voices import FolderVoiceProvider
    from wyoming_cosyvoice_plugins.yaml_voices import YamlVoiceProvider

    path = tmp_path / "voices.yaml"
    path.write_text("voices:\n  - name: a\n  - name: b\n    speed: .nan\n  - name: c\n    gain: .inf\n")
    provider = YamlVoiceProvider(path)
    assert [p.name for p in provider.load()] == ["a"]
    assert provider.problems == [
        f"{path}: voice 'b': voices[1].speed: expected a finite number, got nan",
        f"{path}: voice 'c': voices[2].gain: expected a finite number, got inf",
    ]
    folder = tmp_path / "voices" / "en_US" / "d"
    audiogen.write(folder / "reference.wav")
    (folder / "profile.yaml").write_text("options: {prepare_seconds: .nan}\n")
    voices = FolderVoiceProvider(tmp_path / "voices")
    assert voices.load() == [] and "options.prepare_seconds: expected a finite number, got nan" in voices.problems[0]


@pytest.mark.parametrize("command", ["say", "describe", "bench"])
def test_cli_seconds_refuse_non_finite(capsys: pytest.CaptureFixture[str], command: str) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--timeout", "nan"])
    assert info.value.code == 2
    assert "argument --timeout: expected a finite number of seconds above 0, got 'nan'" in capsys.readouterr().err
