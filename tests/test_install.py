"""An installed copy, as a user gets it: the sdist and the wheel built from it, installed into a fresh virtual
environment, serving Home Assistant's event sequence from an empty folder with no warning.

Builds with `python -m build` (setuptools from PyPI or pip's cache) and installs the wheel's dependencies the same
way; about a minute with a warm pip cache. Marked `install` (`pytest -m "not install"` leaves it out).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import venv
from pathlib import Path
from typing import Iterator

import pytest
from wyoming.client import AsyncTcpClient
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop

from wyoming_cosyvoice import __version__

from .helpers import TIMEOUT, assert_speech, collect, read

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parents[1]
BIN = "Scripts" if os.name == "nt" else "bin"


def _run(*args: str, timeout: float = 600, **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and the wheel built from it (`python -m build` builds the wheel from the unpacked sdist)."""
    out = tmp_path_factory.mktemp("dist")
    result = _run(sys.executable, "-m", "build", "--outdir", str(out), str(ROOT))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "BuildBackendWarning" not in result.stdout + result.stderr, "deprecated packaging metadata"
    return out


@pytest.fixture(scope="module")
def installed(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel (and its dependencies) installed; returns its bin folder."""
    (wheel,) = dist.glob("*.whl")
    home = tmp_path_factory.mktemp("venv")
    venv.create(home / "venv", with_pip=True)
    python = home / "venv" / BIN / "python"
    result = _run(str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return python.parent


def _user_env(home: Path) -> dict[str, str]:
    """A user's environment: a fresh home, no project variables, no XDG overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WYOMING_COSYVOICE", "XDG_"))}
    env.pop("PYTHONPATH", None)
    env["HOME"] = str(home)
    return env


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def user(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """An empty working folder and a fresh home."""
    cwd = tmp_path / "empty"
    cwd.mkdir()
    yield cwd, _user_env(tmp_path / "home")


def test_sdist_holds_what_the_tests_and_scripts_need_and_its_tests_collect(dist: Path, tmp_path: Path) -> None:
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        if hasattr(tarfile, "data_filter"):  # 3.10.12+, 3.11.4+: refuse members that would leave tmp_path
            archive.extractall(tmp_path, filter="data")
        else:
            archive.extractall(tmp_path)  # noqa: S202 - our own freshly built sdist
    (root,) = tmp_path.iterdir()
    for member in (
        "LICENSE",
        "NOTICE",
        "config/server.yaml",
        "config/voices.yaml",
        "asset/wyoming-cosyvoice-en-us.wav",
        "asset/wyoming-cosyvoice-en-us.txt",
        "tests/helpers.py",
        "tests/standin_cosyvoice/cosyvoice/cli/cosyvoice.py",
        "script/setup",
        "script/test",
        "script/serve",
        "Dockerfile",
        "docker-compose.yml",
    ):
        assert (root / member).is_file(), f"{member} missing from the sdist"
    assert not (root / "config" / "voices").exists(), "a checkout's own voices stay out of the sdist"
    result = _run(sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " error" not in result.stdout.lower(), result.stdout[-3000:]


def test_wheel_carries_defaults_assets_licenses_and_one_version(dist: Path, installed: Path) -> None:
    import zipfile

    (wheel,) = dist.glob("*.whl")
    assert wheel.name.startswith(f"wyoming_cosyvoice-{__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    for member in (
        "wyoming_cosyvoice/defaults/server.yaml",
        "wyoming_cosyvoice/defaults/voices.yaml",
        "wyoming_cosyvoice/asset/wyoming-cosyvoice-de-de.wav",
        "wyoming_cosyvoice/asset/wyoming-cosyvoice-de-de.txt",
        f"wyoming_cosyvoice-{__version__}.dist-info/licenses/LICENSE",
        f"wyoming_cosyvoice-{__version__}.dist-info/licenses/NOTICE",
    ):
        assert member in names
    metadata = zipfile.ZipFile(wheel).read(f"wyoming_cosyvoice-{__version__}.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert "Classifier: Programming Language :: Python :: 3.13" in metadata
    version = _run(str(installed / "wyoming-cosyvoice"), "--version")
    assert version.stdout.strip() == f"wyoming-cosyvoice {__version__}"


async def test_installed_copy_serves_home_assistant_from_an_empty_folder_without_warnings(
    installed: Path, user: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    cwd, env = user
    port = _free_port()
    log = tmp_path / "serve.log"
    data = Path(env["HOME"]) / ".local" / "share" / "wyoming-cosyvoice"
    started = time.monotonic()
    with log.open("w") as sink:
        server = subprocess.Popen(
            [str(installed / "wyoming-cosyvoice"), "serve", "--uri", f"tcp://127.0.0.1:{port}"],
            cwd=cwd,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while "Ready on" not in log.read_text() and server.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert "Ready on" in log.read_text(), log.read_text()
        print(f"installed copy: first start to ready in {time.monotonic() - started:.2f} s")

        client = AsyncTcpClient("127.0.0.1", port)
        await asyncio.wait_for(client.connect(), TIMEOUT)
        try:
            # What Home Assistant does: describe once when the integration loads...
            await client.write_event(Describe().event())
            info = await read(client)
            assert info is not None and Info.is_type(info.type)
            (program,) = Info.from_event(info).tts
            assert [v.name for v in program.voices] == ["robot-en", "robot-de"]
            assert program.supports_synthesize_streaming
        finally:
            await client.disconnect()
        # ...then a connection per reply: a streamed LLM answer (with the compatibility synthesize inside it)...
        client = AsyncTcpClient("127.0.0.1", port)
        await asyncio.wait_for(client.connect(), TIMEOUT)
        try:
            await client.write_event(SynthesizeStart().event())
            for piece in ["The light in the ", "kitchen is on. ", "Anything else?"]:
                await client.write_event(SynthesizeChunk(text=piece).event())
            await client.write_event(Synthesize(text="The light in the kitchen is on. Anything else?").event())
            await client.write_event(SynthesizeStop().event())
            streamed = await collect(client, until="synthesize-stopped")
        finally:
            await client.disconnect()
        assert streamed.stopped and not streamed.errors and len(streamed.starts) == 1 and streamed.stops == 1
        assert_speech(streamed.samples(), streamed.rate, words=9)
        # ...and a one-shot synthesize.
        client = AsyncTcpClient("127.0.0.1", port)
        await asyncio.wait_for(client.connect(), TIMEOUT)
        try:
            await client.write_event(Synthesize(text="Good morning, the weather is sunny.").event())
            once = await collect(client)
        finally:
            await client.disconnect()
        assert not once.errors and once.stops == 1
        assert_speech(once.samples(), once.rate, words=6)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    text = log.read_text()
    assert code == 0, text
    noisy = [line for line in text.splitlines() if " WARNING " in line or " ERROR " in line or "Traceback" in line]
    assert noisy == [], text
    assert f"Configuration: {data / 'server.yaml'}" in text
    assert "voice 'tars': not set up" in text, "one info line says how to add TARS"
    assert list(cwd.iterdir()) == [], "nothing written to the working folder"
    # The data folder was made from the shipped defaults, and the caches live in it.
    assert sorted(p.name for p in data.iterdir()) == ["cache", "server.yaml", "voices", "voices.yaml"]
    assert (data / "server.yaml").read_bytes() == (ROOT / "config" / "server.yaml").read_bytes()
    assert list((data / "cache" / "references").glob("*.wav")), "normalized references cached in the data folder"

    check = _run(str(installed / "wyoming-cosyvoice"), "voices", "check", cwd=cwd, env=env, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "robot-en: ok" in check.stdout and "WARNING" not in check.stderr
