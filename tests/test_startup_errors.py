"""Start-up errors a user meets (busy port, bad URI, hostile server.yaml): one line and a non-zero exit, found
before the engine loads; never a traceback."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from wyoming_cosyvoice.__main__ import main

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
        ("server: " + "[" * 5000 + "]" * 5000 + "\n", "invalid YAML: nested too deeply"),
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
