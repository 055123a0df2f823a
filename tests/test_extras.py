"""Optional extras: a command that needs a missing one exits 1 with one line naming the extra and the command that
adds it, in the words of the install method in use (pipx inject, pip install, a checkout's editable install)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wyoming_cosyvoice.extras import extra_requirements, install_hint, install_method

from .helpers import write_config

ROOT = Path(__file__).resolve().parents[1]


def test_install_method_and_hints() -> None:
    assert install_method("/home/ann/.local/share/pipx/venvs/wyoming-cosyvoice") == "pipx"
    assert install_method("/opt/pipx/venvs/wyoming-cosyvoice") == "pipx"
    assert install_method(sys.prefix) == "checkout"  # the tests run from a checkout
    # The requirement comes from the installed metadata (pyproject's extra), not from a copy here.
    assert extra_requirements("web") == ["aiohttp>=3.9"]
    assert install_hint("web", "pipx") == "pipx inject wyoming-cosyvoice 'aiohttp>=3.9'"
    assert install_hint("speaker", "pipx") == "pipx inject wyoming-cosyvoice 'sounddevice>=0.4.6'"
    assert install_hint("zeroconf", "pip") == "pip install 'wyoming-cosyvoice[zeroconf]'"
    assert install_hint("web", "checkout") == f"{ROOT / '.venv' / 'bin' / 'pip'} install -e '{ROOT}[web]'"


def _cli(blocked: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a subprocess where `blocked` cannot be imported (an install without that extra)."""
    code = (
        f"import sys; sys.modules[{blocked!r}] = None\n"
        "from wyoming_cosyvoice.__main__ import main\n"
        f"sys.exit(main({list(args)!r}))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=60)


@pytest.mark.parametrize(
    "blocked, args, words",
    [
        ("sounddevice", ["say", "Hello there", "--uri", "tcp://127.0.0.1:9"], "playing on the speaker"),
        ("zeroconf", ["serve", "--zeroconf"], "--zeroconf (server.zeroconf"),
        ("aiohttp", ["serve", "--web"], "the voice studio (--web, web.enabled)"),
    ],
)
def test_missing_extra_is_one_line_and_exit_1(tmp_path: Path, blocked: str, args: list[str], words: str) -> None:
    if args[0] == "serve":
        args = [*args, "--config", str(write_config(tmp_path / "cfg")), "--uri", "tcp://127.0.0.1:0"]
    proc = _cli(blocked, *args, cwd=tmp_path)
    extra = {"sounddevice": "speaker", "zeroconf": "zeroconf", "aiohttp": "web"}[blocked]
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines == proc.stderr.strip().splitlines()[-1:], proc.stderr
    assert words in lines[0] and f"needs the '{extra}' extra ({blocked} is not installed)" in lines[0]
    assert lines[0].endswith(f"install -e '{ROOT}[{extra}]'")  # a checkout's words (pipx/pip: the test above)
    assert "ready" not in proc.stderr  # refused before anything was served
