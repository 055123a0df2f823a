"""Plugin manager and hooks: built-ins, plugins directory, duplicates, misspelled hooks, and one test per hook."""

from __future__ import annotations

import argparse
import inspect
import shutil
import sys
import types
from pathlib import Path

import pytest
import yaml
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize

from wyoming_cosyvoice import hookspecs
from wyoming_cosyvoice.__main__ import main
from wyoming_cosyvoice.config import load_config
from wyoming_cosyvoice.errors import PluginError
from wyoming_cosyvoice.hookspecs import hookimpl
from wyoming_cosyvoice.plugins import Plugins
from wyoming_cosyvoice.voices import VoiceProfile

from .helpers import collect, connect, read, running_server, write_config

EXAMPLE = Path(__file__).resolve().parents[1] / "plugins" / "example_tone.py"


def _plugin_module(name: str, **hooks: object) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook_name, func in hooks.items():
        setattr(module, hook_name, func)
    return module


def test_builtins_registered() -> None:
    plugins = Plugins()
    assert "espeak" in plugins.registry["engines"]
    assert "yaml" in plugins.registry["voice_providers"]
    rows = {row["name"]: row for row in plugins.describe()}
    espeak = rows["wyoming_cosyvoice_plugins.espeak_engine"]
    assert espeak["origin"] == "built-in" and espeak["hooks"] == ["register_engines"]
    assert espeak["registers"] == {"engines": ["espeak"]}


def test_every_hook_has_a_test() -> None:
    hooks = [name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_")]
    assert sorted(hooks) == ["register_commands", "register_engines", "register_sinks", "register_voice_providers"]
    tests = {name for name in globals() if name.startswith("test_hook_")}
    for hook in hooks:
        assert f"test_hook_{hook}" in tests, f"no test for hook {hook}"


async def test_hook_register_engines(tmp_path: Path) -> None:
    """The example plugin, loaded from a plugins directory, serves audio through the real server."""
    plugins_dir = tmp_path / "plugins"
    plugins_dir.mkdir()
    shutil.copy(EXAMPLE, plugins_dir / "example_tone.py")
    path = write_config(tmp_path / "cfg", server={"plugins_dir": str(plugins_dir)})
    doc = yaml.safe_load(path.read_text())
    doc["engine"] = {"name": "tone", "fallback": None}
    doc["engines"] = {"tone": {"sample_rate": 16000, "word_ms": 200}}
    path.write_text(yaml.safe_dump(doc))
    config = load_config(path)
    plugins = Plugins(config.server.plugins_dir)
    reg = plugins.registry["engines"]["tone"]
    assert reg.plugin == "wyoming_cosyvoice_user_plugins.example_tone"
    assert plugins.origins[reg.plugin] == str(plugins_dir / "example_tone.py")
    async with running_server(config, plugins) as server, connect(server) as client:
        await client.write_event(Synthesize(text="one two three four five").event())
        reply = await collect(client)
        assert reply.rate == 16000
        assert len(reply.audio) == 5 * 16000 * 200 // 1000 * 2  # five words of 200 ms
    sys.modules.pop("wyoming_cosyvoice_user_plugins.example_tone", None)


async def test_hook_register_voice_providers(tmp_path: Path) -> None:
    class Fixed:
        def load(self) -> list[VoiceProfile]:
            return [VoiceProfile(name="robot", description="Robot", languages=("en-GB",), source="test")]

    @hookimpl
    def register_voice_providers(register):  # type: ignore[no-untyped-def]
        register("fixed", lambda section: Fixed())

    module = _plugin_module("fixed_voices", register_voice_providers=register_voice_providers)
    path = write_config(tmp_path, voice_providers={"fixed": {}, "yaml": {"path": "voices.yaml"}})
    config = load_config(path)
    plugins = Plugins(extra=(module,))
    assert plugins.registry["voice_providers"]["fixed"].plugin == "fixed_voices"
    async with running_server(config, plugins) as server, connect(server) as client:
        await client.write_event(Describe().event())
        info = Info.from_event(await read(client))
        assert [v.name for v in info.tts[0].voices] == ["robot", "tars", "anna"]
        assert info.tts[0].voices[0].languages == ["en-GB"]


def test_hook_register_sinks() -> None:
    made = []

    @hookimpl
    def register_sinks(register):  # type: ignore[no-untyped-def]
        register("memory", lambda section: made.append(section.name) or "sink")

    plugins = Plugins(extra=(_plugin_module("memory_sink", register_sinks=register_sinks),))
    assert plugins.registry["sinks"]["memory"].plugin == "memory_sink"
    config = load_config(None)
    assert plugins.factory("sinks", "memory")(config.section("sinks", "memory")) == "sink"
    assert made == ["memory"]


def test_hook_register_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """A plugin's command joins the built-in ones (and CosyVoice's, which its package registers the same way)."""

    def run(args: argparse.Namespace) -> int:
        print(f"hello {args.who}")
        return 3

    @hookimpl
    def register_commands(subparsers):  # type: ignore[no-untyped-def]
        parser = subparsers.add_parser("hello", help="say hello")
        parser.add_argument("who")
        parser.set_defaults(func=run)

    plugins = Plugins(extra=(_plugin_module("greeter", register_commands=register_commands),))
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers(dest="command", required=True)
    added = plugins.add_commands(subparsers)
    assert added == {
        "wyoming_cosyvoice_plugins.cosyvoice": ["download", "health", "park", "wake"],
        "greeter": ["hello"],
    }
    args = parser.parse_args(["hello", "world"])
    assert args.func(args) == 3 and capsys.readouterr().out == "hello world\n"
    rows = {row["name"]: row for row in plugins.describe()}
    assert rows["greeter"]["hooks"] == ["register_commands"] and rows["greeter"]["registers"] == {"commands": ["hello"]}
    cosyvoice = rows["wyoming_cosyvoice_plugins.cosyvoice"]
    assert cosyvoice["registers"] == {"engines": ["cosyvoice"], "commands": ["download", "health", "park", "wake"]}


def test_a_command_name_taken_twice_is_an_error_naming_the_plugin() -> None:
    @hookimpl
    def register_commands(subparsers):  # type: ignore[no-untyped-def]
        subparsers.add_parser("health")

    plugins = Plugins(extra=(_plugin_module("impostor", register_commands=register_commands),))
    with pytest.raises(PluginError, match="plugin impostor"):
        plugins.add_commands(argparse.ArgumentParser().add_subparsers())


def test_commands_of_a_plugins_directory_are_not_on_the_command_line(tmp_path: Path) -> None:
    """The plugins directory is named in server.yaml, read after the command line is parsed: its plugins add none."""
    (tmp_path / "late.py").write_text(
        "from wyoming_cosyvoice.hookspecs import hookimpl\n\n"
        "@hookimpl\ndef register_commands(subparsers):\n    subparsers.add_parser('late')\n"
    )
    plugins = Plugins(tmp_path)
    assert "late" not in [
        n for names in plugins.add_commands(argparse.ArgumentParser().add_subparsers()).values() for n in names
    ]
    sys.modules.pop("wyoming_cosyvoice_user_plugins.late", None)


def test_duplicate_name_is_an_error_naming_both(tmp_path: Path) -> None:
    @hookimpl
    def register_engines(register):  # type: ignore[no-untyped-def]
        register("espeak", lambda section: None)

    with pytest.raises(PluginError) as info:
        Plugins(extra=(_plugin_module("impostor", register_engines=register_engines),))
    message = str(info.value)
    assert "duplicate engines name 'espeak'" in message
    assert "wyoming_cosyvoice_plugins.espeak_engine" in message and "impostor" in message


def test_misspelled_hook_fails_loudly(tmp_path: Path) -> None:
    (tmp_path / "typo.py").write_text(
        "from wyoming_cosyvoice.hookspecs import hookimpl\n\n@hookimpl\ndef register_engine(register):\n    pass\n"
    )
    with pytest.raises(PluginError, match="register_engine"):
        Plugins(tmp_path)
    sys.modules.pop("wyoming_cosyvoice_user_plugins.typo", None)


def test_broken_plugin_file_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(PluginError, match=r"broken\.py: plugin failed to import: RuntimeError: boom"):
        Plugins(tmp_path)
    with pytest.raises(PluginError, match="plugins directory not found"):
        Plugins(tmp_path / "missing")


def test_unknown_engine_name_lists_registered() -> None:
    with pytest.raises(PluginError, match=r"no engine named 'nope' \(registered: .*espeak"):
        Plugins().factory("engines", "nope")


def test_plugins_command_lists_plugins(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plugins_dir = tmp_path / "plugins"
    plugins_dir.mkdir()
    shutil.copy(EXAMPLE, plugins_dir / "example_tone.py")
    config = tmp_path / "server.yaml"
    config.write_text(yaml.safe_dump({"server": {"plugins_dir": str(plugins_dir)}}))
    assert main(["plugins", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "wyoming_cosyvoice_plugins.espeak_engine  [built-in]" in out
    assert f"wyoming_cosyvoice_user_plugins.example_tone  [{plugins_dir / 'example_tone.py'}]" in out
    assert "  engines: tone" in out
    assert "wyoming_cosyvoice_plugins.cosyvoice  [built-in]\n  hooks: register_commands, register_engines\n" in out
    assert "  engines: cosyvoice\n  commands: download, health, park, wake\n" in out
    sys.modules.pop("wyoming_cosyvoice_user_plugins.example_tone", None)
