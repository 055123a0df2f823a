"""Plugin manager: built-ins, then entry points, then a plugins directory; duplicate names are errors."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pluggy

from . import hookspecs
from .errors import PluginError

USER_PACKAGE = "wyoming_cosyvoice_user_plugins"
"""Package name of the modules loaded from a plugins folder (`server.plugins_dir`)."""

BUILTIN_PLUGINS = (
    "wyoming_cosyvoice_plugins.cosyvoice",
    "wyoming_cosyvoice_plugins.triton",
    "wyoming_cosyvoice_plugins.espeak_engine",
    "wyoming_cosyvoice_plugins.yaml_voices",
    "wyoming_cosyvoice_plugins.folder_voices",
    "wyoming_cosyvoice_plugins.speaker_sink",
    "wyoming_cosyvoice_plugins.wav_sink",
    "wyoming_cosyvoice_plugins.wyoming_snd_sink",
)
"""Modules of the built-in plugins, registered first."""

HOOK_GROUPS = {
    "engines": "register_engines",
    "voice_providers": "register_voice_providers",
    "sinks": "register_sinks",
}
"""Registry group name -> registration hook."""


@dataclass(frozen=True)
class Registration:
    """One registered name: its factory, the plugin that registered it, and what the plugin said about it."""

    name: str
    """The registered name (what config and the command line select)."""

    factory: Callable[..., Any]
    """Builds the engine, voice provider or sink from its config section."""

    plugin: str
    """The plugin that registered it."""

    setup_hint: str = ""
    """Engines: how to set the engine up, logged when it cannot start and the server falls back."""

    spec_key: str = ""
    """Sinks: the setting ARG sets in `--sink NAME:ARG` (none: `target`)."""


class Plugins:
    """Loaded plugins and what each registered."""

    def __init__(self, plugins_dir: Optional[Path] = None, extra: tuple[Any, ...] = ()) -> None:
        self.pm = pluggy.PluginManager("wyoming_cosyvoice")
        self.pm.add_hookspecs(hookspecs)
        self.origins: dict[str, str] = {}
        self._from_dir: set[str] = set()  # plugins loaded from a plugins directory
        for module_name in BUILTIN_PLUGINS:
            self._register(importlib.import_module(module_name), "built-in")
        loaded = self.pm.load_setuptools_entrypoints("wyoming_cosyvoice")
        if loaded:
            for plugin, dist in self.pm.list_plugin_distinfo():
                self.origins[self.pm.get_name(plugin) or repr(plugin)] = (
                    f"entry point ({dist.project_name} {dist.version})"
                )
        if plugins_dir is not None:
            self._load_dir(Path(plugins_dir))
        for plugin in extra:
            self._register(plugin, "registered by caller")
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as err:
            raise PluginError(f"plugin hook not in the spec: {err}") from None
        self.registry = {group: self._collect(group, hook) for group, hook in HOOK_GROUPS.items()}

    def _register(self, plugin: Any, origin: str) -> None:
        name = getattr(plugin, "__name__", None) or repr(plugin)
        try:
            self.pm.register(plugin, name=name)
        except ValueError as err:
            raise PluginError(f"plugin {name} ({origin}) is already registered: {err}") from None
        except pluggy.PluginValidationError as err:
            raise PluginError(f"plugin {name} ({origin}): {err}") from None
        self.origins[name] = origin

    def _load_dir(self, directory: Path) -> None:
        if not directory.is_dir():
            raise PluginError(f"{directory}: plugins directory not found")
        # The folder's modules live in a package of their own, so their classes can be pickled by name (an engine
        # whose settings go to its child processes: isolation.py).
        package = sys.modules.setdefault(USER_PACKAGE, types.ModuleType(USER_PACKAGE))
        package.__path__ = []
        for path in sorted(directory.glob("*.py")):
            module_name = f"{USER_PACKAGE}.{path.stem}"
            spec = importlib.util.spec_from_file_location(module_name, path)
            if spec is None or spec.loader is None:
                raise PluginError(f"{path}: cannot load plugin")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as err:  # a plugin file may raise anything at import
                sys.modules.pop(module_name, None)
                raise PluginError(f"{path}: plugin failed to import: {type(err).__name__}: {err}") from None
            self._register(module, str(path))
            self._from_dir.add(module_name)

    def _collect(self, group: str, hook_name: str) -> dict[str, Registration]:
        found: dict[str, Registration] = {}
        hook = getattr(self.pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            plugin_name = impl.plugin_name

            def register(
                name: str,
                factory: Callable[..., Any],
                *,
                setup_hint: str = "",
                spec_key: str = "",
                _plugin: str = plugin_name,
            ) -> None:
                if not isinstance(name, str) or not name:
                    raise PluginError(f"plugin {_plugin} registered {group} with an invalid name {name!r}")
                if name in found:
                    raise PluginError(
                        f"duplicate {group} name {name!r}: registered by {found[name].plugin} and by {_plugin}"
                    )
                found[name] = Registration(name, factory, _plugin, setup_hint, spec_key)

            impl.function(register=register)
        return dict(sorted(found.items()))

    def registration(self, group: str, name: str) -> Registration:
        """What was registered as `name` in `group`; an unknown name is a PluginError."""
        try:
            return self.registry[group][name]
        except KeyError:
            known = ", ".join(self.registry.get(group, {})) or "none"
            raise PluginError(f"no {group[:-1].replace('_', ' ')} named {name!r} (registered: {known})") from None

    def factory(self, group: str, name: str) -> Callable[..., Any]:
        """The factory registered as `name` in `group`; an unknown name is a PluginError."""
        return self.registration(group, name).factory

    def add_commands(self, subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> dict[str, list[str]]:
        """Let each plugin add its CLI subcommands (`register_commands`); returns plugin -> the commands it added.

        Plugins from a plugins directory are not asked: that folder is named by server.yaml, read after the command
        line is parsed. A command name already taken (built-in or another plugin's) is a PluginError.
        """
        added: dict[str, list[str]] = {}
        for impl in self.pm.hook.register_commands.get_hookimpls():
            plugin = impl.plugin_name
            if plugin in self._from_dir:
                continue
            before = dict(subparsers.choices)
            try:
                impl.function(subparsers=subparsers)
            except argparse.ArgumentError as err:  # Python >= 3.11 refuses a second parser of one name
                raise PluginError(f"plugin {plugin}: cannot add its commands: {err}") from None
            replaced = [name for name, parser in before.items() if subparsers.choices.get(name) is not parser]
            if replaced:
                raise PluginError(f"plugin {plugin} adds command {replaced[0]!r}, which already exists")
            names = [name for name in subparsers.choices if name not in before]
            if names:
                added[plugin] = names
        return added

    def describe(self) -> list[dict[str, Any]]:
        """Each plugin with its origin, hooks, registered names and commands (for `wyoming-cosyvoice plugins`)."""
        commands = self.add_commands(argparse.ArgumentParser().add_subparsers())
        rows = []
        for plugin in self.pm.get_plugins():
            name = self.pm.get_name(plugin) or repr(plugin)
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            names = {
                group: [r.name for r in regs.values() if r.plugin == name] for group, regs in self.registry.items()
            }
            names["commands"] = commands.get(name, [])
            rows.append(
                {
                    "name": name,
                    "origin": self.origins.get(name, "unknown"),
                    "hooks": hooks,
                    "registers": {g: n for g, n in names.items() if n},
                }
            )
        return sorted(rows, key=lambda r: r["name"])
