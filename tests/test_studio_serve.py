"""`serve --web`: the studio page in the same process as the Wyoming server; off, optional and validated config."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from wyoming_cosyvoice.config import load_config
from wyoming_cosyvoice.errors import ConfigError

from .helpers import cli, write_config

ROOT = Path(__file__).resolve().parents[1]


def _studio_config(directory: Path, **web: object) -> Path:
    return write_config(
        directory,
        voice_providers={"yaml": {"path": "voices.yaml"}, "folder": {"path": "voices"}},
        web=web,
    )


def test_the_studio_is_off_by_default_and_its_settings_are_checked(tmp_path: Path) -> None:
    defaults = load_config(None).web
    assert (defaults.enabled, defaults.host, defaults.port, defaults.token) == (False, "127.0.0.1", 10201, None)
    shipped = yaml.safe_load((ROOT / "config" / "server.yaml").read_text())["web"]
    assert shipped == {
        "enabled": False,
        "host": "127.0.0.1",
        "port": 10201,
        "token": None,
        "max_upload_bytes": 16777216,
        "max_uploads": 4,
        "max_connections": 32,
        "header_timeout_s": 10.0,
        "body_timeout_s": 60.0,
        "idle_timeout_s": 30.0,
    }
    assert load_config(ROOT / "config" / "server.yaml").web == defaults
    for web, problem in (
        ({"port": 70000}, "web.port: must be between 0 and 65535"),
        ({"token": "short"}, "web.token: must have at least 8 characters"),
        ({"max_upload_bytes": 10}, "web.max_upload_bytes: must be at least 65536"),
        ({"bogus": 1}, "web.bogus: unknown key"),
        ({"max_connections": 0}, "web.max_connections: must be at least 1"),
        ({"max_uploads": 0}, "web.max_uploads: must be at least 1"),
        ({"header_timeout_s": 0}, "web.header_timeout_s: must be a finite number greater than 0"),
        ({"idle_timeout_s": float("nan")}, "web.idle_timeout_s: expected a finite number, got nan"),
        ({"body_timeout_s": float("inf")}, "web.body_timeout_s: expected a finite number, got inf"),
    ):
        with pytest.raises(ConfigError, match=re.escape(problem)):
            load_config(_studio_config(tmp_path / str(len(problem)), **web))


def test_the_core_never_imports_aiohttp_unless_the_studio_is_enabled() -> None:
    code = (
        "import sys\n"
        "from wyoming_cosyvoice.__main__ import build_parser\n"
        "import wyoming_cosyvoice.server, wyoming_cosyvoice.commands.serve, wyoming_cosyvoice.web\n"
        "build_parser()\n"
        "print('aiohttp' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "False"


async def test_serve_web_without_aiohttp_is_one_clear_line_before_any_engine_loads(tmp_path: Path) -> None:
    config = _studio_config(tmp_path)
    code = (
        "import sys; sys.modules['aiohttp'] = None\n"  # what an install without the web extra looks like
        "from wyoming_cosyvoice.__main__ import main\n"
        f"sys.exit(main(['serve', '--config', {str(config)!r}, '--web']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 1  # a missing extra (wyoming_cosyvoice/extras.py), in a checkout's words
    assert proc.stderr.strip().splitlines() == [
        "error: the voice studio (--web, web.enabled) needs the 'web' extra (aiohttp is not installed): "
        f"{ROOT / '.venv' / 'bin' / 'pip'} install -e '{ROOT}[web]'"
    ]
    assert "espeak-ng ready" not in proc.stderr


def test_serve_web_serves_the_page_beside_the_wyoming_port_and_stops_with_it(tmp_path: Path) -> None:
    pytest.importorskip("aiohttp")
    config = _studio_config(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "wyoming_cosyvoice", "serve", "--config", str(config), "--web", "--web-port", "0"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    try:
        lines: list[str] = []
        web_port = wyoming_port = None
        deadline = time.monotonic() + 60
        while (web_port is None or wyoming_port is None) and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if match := re.search(r"Voice studio on http://127\.0\.0\.1:(\d+)/", line):
                web_port = int(match.group(1))
            if match := re.search(r"Ready on tcp://127\.0\.0\.1:(\d+)", line):
                wyoming_port = int(match.group(1))
        assert web_port and wyoming_port, "server did not start:\n" + "".join(lines)
        assert web_port != wyoming_port
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/api/status", timeout=20) as response:
            status = json.load(response)
        assert status["engines"][0]["name"] == "espeak" and status["token_required"] is False
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/", timeout=20) as response:
            assert b"Voice studio" in response.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "Server stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


async def test_voices_add_writes_where_the_studio_writes(tmp_path: Path) -> None:
    from .audiogen import write

    config = _studio_config(tmp_path / "cfg")
    audio = write(tmp_path / "grace.wav")
    rc, out, err = await cli("voices", "add", "grace", str(audio), "--config", str(config), "--transcript", "Hi.")
    assert rc == 0, err
    from wyoming_cosyvoice.voice_store import find_voice_dirs, voices_folder

    assert find_voice_dirs(voices_folder(load_config(config)), "grace") == [
        tmp_path / "cfg" / "voices" / "en_US" / "grace"
    ]
