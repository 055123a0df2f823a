"""Security: client allow-list, voice names never reach the filesystem, no request opens files or connects out,
YAML loaded safely, documented defaults."""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

from wyoming_cosyvoice.config import DEFAULT_CONFIG_DIR, Config, Limits, load_config
from wyoming_cosyvoice.errors import ConfigError
from wyoming_cosyvoice.guard import ConnectionGuard

from .helpers import (
    collect,
    connect,
    fault_config,
    fault_plugins,
    raw_connection,
    read,
    read_until_closed,
    running_server,
)

_AUDIT: list[tuple[str, tuple[Any, ...]]] = []
_AUDIT_ON = threading.Event()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _AUDIT_ON.is_set() and event in (
        "open",
        "os.listdir",
        "os.scandir",
        "socket.connect",
        "socket.getaddrinfo",
        "subprocess.Popen",
        "os.system",
        "urllib.Request",
    ):
        _AUDIT.append((event, args))


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one records only while _AUDIT_ON is set

HOSTILE_NAMES = [
    "../../../../etc/passwd",
    "/etc/passwd",
    "file:///etc/shadow",
    "http://198.51.100.7:8080/voice.wav",
    "tcp://198.51.100.7:10700",
    "~root/.ssh/id_rsa",
    "voices.yaml",
    "C:\\Windows\\win.ini",
]


async def test_hostile_voice_names_and_text_touch_no_file_and_no_network(tmp_path: Path) -> None:
    async with running_server(fault_config(tmp_path), fault_plugins()) as server:
        clients = [await asyncio.wait_for(_open(server), 10) for _ in range(len(HOSTILE_NAMES) * 2 + 1)]
        _AUDIT.clear()
        _AUDIT_ON.set()
        try:
            replies = []
            for i, name in enumerate(HOSTILE_NAMES):
                client = clients[2 * i]
                await client.write_event(Synthesize(text=name, voice=SynthesizeVoice(name=name, language=name)).event())
                replies.append(await collect(client))
                client = clients[2 * i + 1]
                await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name=name)).event())
                await client.write_event(SynthesizeChunk(text=f"Read {name}. Fetch {name}.").event())
                await client.write_event(SynthesizeStop().event())
                replies.append(await collect(client, until="synthesize-stopped"))
            # Text that looks like a path or URL is only ever spoken.
            await clients[-1].write_event(Synthesize(text="file:///etc/passwd http://198.51.100.7/x").event())
            spoken = await collect(clients[-1])
        finally:
            _AUDIT_ON.clear()
        for reply in replies:  # the name is only ever compared: the default voice speaks (server.unknown_voice)
            assert not reply.errors and reply.chunks > 0, reply.errors
        assert not spoken.errors and spoken.chunks > 0
        touched = [(event, args) for event, args in _AUDIT]
        assert not [t for t in touched if t[0] != "open"], touched
        opened = [str(args[0]) for _event, args in touched]
        for name in HOSTILE_NAMES + ["passwd", "shadow", "id_rsa", "win.ini"]:
            assert not [p for p in opened if name in p], opened
        for client in clients:
            await client.disconnect()


async def _open(server: Any) -> Any:
    from wyoming.client import AsyncTcpClient

    client = AsyncTcpClient("127.0.0.1", server.port)
    await client.connect()
    return client


async def test_allow_list_refuses_other_networks(tmp_path: Path) -> None:
    refused = fault_config(tmp_path / "a", limits={"allowed_networks": ["192.0.2.0/24", "2001:db8::/32"]})
    async with running_server(refused, fault_plugins()) as server, raw_connection(server) as (reader, writer):
        writer.write(b'{"type": "describe"}\n')
        assert await read_until_closed(reader) == [], "a refused client learns nothing"
    allowed = fault_config(tmp_path / "b", limits={"allowed_networks": ["192.0.2.0/24", "127.0.0.0/8"]})
    async with running_server(allowed, fault_plugins()) as server, connect(server) as client:
        await client.write_event(Describe().event())
        assert Info.is_type((await read(client)).type)


def test_allow_list_matching() -> None:
    guard = ConnectionGuard(Limits(allowed_networks=("192.168.1.0/24", "fd00::/8", "10.1.2.3")))
    assert guard.allowed(("192.168.1.40", 5000))
    assert guard.allowed(("::ffff:192.168.1.40", 5000, 0, 0)), "IPv4 client on a dual-stack listener"
    assert guard.allowed(("fd12::1", 5000, 0, 0))
    assert guard.allowed(("10.1.2.3", 1))
    assert not guard.allowed(("10.1.2.4", 1))
    assert not guard.allowed(("192.168.2.1", 5000))
    assert not guard.allowed(("not-an-address", 1))
    assert guard.allowed(""), "unix socket peers are local (file permissions guard them)"
    assert ConnectionGuard(Limits()).allowed(("203.0.113.9", 1)), "empty allow-list allows all"


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    config = tmp_path / "server.yaml"
    config.write_text(f'server: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert str(config) in str(err.value) and "invalid YAML" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "limits, message",
    [
        ({"max_connections": 0}, "limits.max_connections: must be at least 1"),
        ({"allowed_networks": ["192.168.1.0/24", "home"]}, "limits.allowed_networks[1]: not a network"),
        ({"idle_timeout_s": 0}, "limits.idle_timeout_s: must be greater than 0"),
        ({"max_header_bytes": "big"}, "limits.max_header_bytes: expected an integer, got 'big'"),
        ({"max_text": 5}, "limits.max_text: unknown key"),
    ],
)
def test_bad_limits_are_one_line_errors(tmp_path: Path, limits: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        fault_config(tmp_path, limits=limits)
    assert message in str(err.value) and "server.yaml" in str(err.value)
    assert "\n" not in str(err.value)


def test_documented_defaults_match_the_code() -> None:
    """config/server.yaml documents the defaults: loading it gives exactly the built-in limits and bind address."""
    config = load_config(DEFAULT_CONFIG_DIR / "server.yaml")
    assert config.limits == Limits()
    assert config.server.uri == Config().server.uri == "tcp://0.0.0.0:10200"
    table = (DEFAULT_CONFIG_DIR.parent / "docs" / "reliability.md").read_text()
    for name in Limits.__dataclass_fields__:
        assert f"`limits.{name}`" in table, f"docs/reliability.md's limits table lacks {name}"


async def test_names_and_language_tags_ending_in_a_newline_are_refused_everywhere(tmp_path: Path) -> None:
    """Issue 21, finding 13: `^...$` with `re.match` let "bob\\n" through (`$` matches before a final newline)."""
    from wyoming_cosyvoice.errors import VoiceError
    from wyoming_cosyvoice.voice_store import check_language, check_name
    from wyoming_cosyvoice_plugins.espeak_engine import VOICE_NAME
    from wyoming_cosyvoice_plugins.folder_voices import check_options
    from wyoming_cosyvoice_plugins.triton.settings import TritonSettings

    from .helpers import write_config

    voices = [
        {"name": "bob\n", "languages": ["en-US"]},
        {"name": "eve", "languages": ["en-US\n"]},
        {"name": "tars", "languages": ["en-US"]},
    ]
    config = load_config(write_config(tmp_path, voices=voices))
    async with running_server(config) as server, connect(server) as client:
        await client.write_event(Describe().event())
        info = Info.from_event(await read(client))
        assert [v.name for v in info.tts[0].voices] == ["tars"]
        assert [lang for v in info.tts[0].voices for lang in v.languages] == ["en-US"]
    with pytest.raises(VoiceError, match="not a valid voice name"):
        check_name("bob\n")
    with pytest.raises(VoiceError, match="BCP-47"):
        check_language("bob", "en-US\n")
    assert VOICE_NAME.fullmatch("en-us\n") is None
    with pytest.raises(ConfigError, match="not an option name"):
        check_options({"speaker\n": 1})
    with pytest.raises(ConfigError, match="not allowed"):
        check_options({"espeak_voice": "en-us\n"})
    problem = TritonSettings(endpoints=("grpc://127.0.0.1:8001",), model="cosyvoice2\n").validate()
    assert problem is not None and problem[0] == "model"
