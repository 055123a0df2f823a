"""YAML configuration loaded into frozen dataclasses, with one-line errors naming file, key and problem."""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, TypeVar, Union

import yaml

from .errors import ConfigError
from .paths import defaults_dir
from .text import DEFAULT_FIRST_CLAUSE_WORDS

T = TypeVar("T")
_MAPPINGS = (dict, Mapping, collections.abc.Mapping)

DEFAULT_CONFIG_DIR = defaults_dir()
"""The default server.yaml and voices.yaml: `config/` in a source checkout, package data in an installed copy."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "list"
    if origin in _MAPPINGS or tp in _MAPPINGS:
        return "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if tp is Path:
        return "path"
    return getattr(tp, "__name__", str(tp))


def non_finite(value: Any) -> bool:
    """True for a float that is NaN or infinite (YAML `.nan`, `.inf`, `1.0e999`): no limit or setting means one,
    and every comparison with NaN is false, so it would pass every range check."""
    return isinstance(value, float) and not math.isfinite(value)


def describe_value(value: Any) -> str:
    """A value as an error message quotes it (config and wire): short, `null` for None, a container by its type."""
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return type(value).__name__
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class Section:
    """A raw config mapping plus where it came from; plugins parse their own dataclass from it."""

    name: str
    """Name of the plugin or section (e.g. `espeak`)."""

    data: Mapping[str, Any]
    """The raw mapping from YAML (empty when the section is absent)."""

    source: str
    """File the section was read from (for error messages)."""

    key: str
    """Dotted key path of the section inside the file (e.g. `engines.espeak`)."""

    base_dir: Path
    """Folder that relative paths resolve against (the YAML file's folder)."""

    def parse(self, cls: type[T]) -> T:
        """Validate this section into the frozen dataclass `cls`."""
        return build(cls, self.data, source=self.source, key=self.key, base_dir=self.base_dir)

    def error(self, subkey: str, problem: str) -> ConfigError:
        """A ConfigError naming this section's file and `subkey`."""
        key = f"{self.key}.{subkey}" if subkey else self.key
        return ConfigError(f"{self.source}:{key}: {problem}")


def _convert(tp: Any, value: Any, *, source: str, key: str, base_dir: Path) -> Any:
    """Check and convert one YAML value to the annotated type `tp` (one branch per kind of annotation: kept as one
    function, a little over 80 lines, so the rules for every type read in one place)."""

    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{source}:{key}: {problem}")

    if tp is Any:  # a free-form value (an `options` entry); sections parsed later check their own numbers
        if non_finite(value):
            raise fail(f"expected a finite number, got {describe_value(value)}")
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, source=source, key=key, base_dir=base_dir)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise fail(f"expected {_type_name(tp)}, got {describe_value(value)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise fail(f"expected one of {', '.join(repr(a) for a in allowed)}, got {describe_value(value)}")
        return value
    if origin is tuple:
        (item_type, *_rest) = typing.get_args(tp)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise fail(f"expected a list, got {describe_value(value)}")
        return tuple(
            _convert(item_type, item, source=source, key=f"{key}[{i}]", base_dir=base_dir)
            for i, item in enumerate(value)
        )
    if origin in _MAPPINGS or tp in _MAPPINGS:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise fail(f"expected a mapping, got {describe_value(value)}")
        args = typing.get_args(tp)
        val_type = args[1] if args else Any
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise fail(f"keys must be strings, got {describe_value(k)}")
            # A bare `dict` holds raw entries that are parsed one by one later (voices.yaml's voices): not here.
            out[k] = _convert(val_type, v, source=source, key=f"{key}.{k}", base_dir=base_dir) if args else v
        return out
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build(tp, value, source=source, key=key, base_dir=base_dir)
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise fail(f"expected a path, got {describe_value(value)}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else (base_dir / path)
    if tp is bool:
        if not isinstance(value, bool):
            raise fail(f"expected true or false, got {describe_value(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"expected an integer, got {describe_value(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(f"expected a number, got {describe_value(value)}")
        if non_finite(value):
            raise fail(f"expected a finite number, got {describe_value(value)}")
        try:
            return float(value)
        except OverflowError:  # an integer beyond float's range (YAML 0xfff...)
            raise fail(f"expected a number below 1e308, got {describe_value(value)}") from None
    if tp is str:
        if not isinstance(value, str):
            raise fail(f"expected a string, got {describe_value(value)}")
        return value
    raise fail(f"unsupported type {_type_name(tp)} in the config schema")


def build(cls: type[T], data: Any, *, source: str, key: str = "", base_dir: Path = Path(".")) -> T:
    """Build frozen dataclass `cls` from a YAML mapping; unknown keys and wrong types are ConfigErrors."""
    where = key or "(top level)"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:{where}: expected a mapping, got {describe_value(data)}")
    hints = typing.get_type_hints(cls)
    fields = {
        f.name: f
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]  # T is any dataclass: not expressible
        if f.init and not f.name.startswith("_") and f.metadata.get("config", True)
    }
    for name in data:
        if name not in fields:
            known = ", ".join(sorted(fields)) or "none"
            sub = f"{key}.{name}" if key else str(name)
            raise ConfigError(f"{source}:{sub}: unknown key (known keys: {known})")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{key}.{name}" if key else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], source=source, key=sub, base_dir=base_dir)
        elif isinstance(f.default, Path) and not f.default.is_absolute():
            kwargs[name] = base_dir / f.default  # a default path, like a written one, is relative to the file
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}:{sub}: required key is missing")
    result = cls(**kwargs)
    check = getattr(result, "validate", None)
    if check is not None:
        problem = check()
        if problem:
            bad_key, text = problem
            raise ConfigError(f"{source}:{key + '.' if key else ''}{bad_key}: {text}")
    return result


class _NoAliasLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses anchors and aliases: a few hundred bytes of aliases can expand to millions of
    values (an "alias bomb"), and files that people other than the administrator edit need neither."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, "anchors and aliases (&name, *name) are not allowed here", event.start_mark
            )
        return super().compose_node(parent, index)


def load_yaml(path: Path, *, aliases: bool = True, max_bytes: Optional[int] = None) -> Any:
    """Read a YAML file safely; a missing, oversized or unparsable file is a one-line ConfigError.

    `aliases=False` refuses anchors and aliases (user-editable files: voices.yaml, profile.yaml); `max_bytes`
    refuses a larger file before reading it. Blocking: call it off the event loop while serving.
    """
    try:
        if max_bytes is not None and Path(path).stat().st_size > max_bytes:
            raise ConfigError(f"{path}: larger than {max_bytes} bytes; refused")
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from None
    try:
        return yaml.load(text, Loader=yaml.SafeLoader if aliases else _NoAliasLoader)  # noqa: S506 (safe loaders)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "?"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from None
    except RecursionError:  # the parser recurses once per level of nesting
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    except ValueError as err:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        raise ConfigError(f"{path}: invalid YAML: {str(err).split(';')[0]}") from None


# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSettings:
    """The `server:` section."""

    uri: str = "tcp://0.0.0.0:10200"
    """Where to listen: tcp://HOST:PORT, unix://PATH or stdio://."""

    zeroconf: bool = False
    """Announce the server as `_wyoming._tcp.local.` so Home Assistant discovers it."""

    zeroconf_name: Optional[str] = None
    """Service name for zeroconf (default: the machine's MAC address)."""

    streaming: bool = True
    """Advertise streaming synthesis to clients (streaming events are accepted either way)."""

    first_clause_words: int = DEFAULT_FIRST_CLAUSE_WORDS
    """A stream's first piece is spoken from its first clause boundary (`,` `;` `:` ` - ` `，、；：`) once it has at
    least this many words (a CJK character counts as one); 0: from its first sentence's end."""

    max_concurrent: int = 4
    """Synthesis requests admitted at once (running, waiting for room, or queued for the engine); more get
    `ServerBusy` (a hard bound, whatever `when_busy` says)."""

    when_busy: Literal["wait", "error"] = "wait"
    """A request the engine cannot start now (docs/reliability.md): wait = wait for room, in order, up to
    `busy_wait_s`, then speak it with the fallback engine (`engine.fallback`); error = refuse it with `ServerBusy`
    at once (for clients other than Home Assistant that prefer an error to a later or plainer answer)."""

    busy_wait_s: float = 3.0
    """Longest wait for room in the engine before the reply is spoken by the fallback engine instead (0: at once).
    Without a fallback engine the request waits up to `limits.engine_timeout_s`."""

    unknown_voice: Literal["default", "error"] = "default"
    """A request naming a voice that is not there (renamed, removed, broken): default = speak with the default voice
    (or the first voice of the asked language) and log it; error = refuse with `VoiceNotFound`."""

    plugins_dir: Optional[Path] = None
    """Folder of extra `*.py` plugins, loaded after built-ins and entry points."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Logging level."""

    def validate(self) -> Optional[tuple[str, str]]:
        """Check values that types alone cannot."""
        if self.max_concurrent < 1:
            return ("max_concurrent", "must be at least 1")
        if self.first_clause_words < 0:
            return ("first_clause_words", "must be 0 (off) or more")
        if not 0 <= self.busy_wait_s <= 3600:  # NaN fails too
            return ("busy_wait_s", "must be between 0 (fallback at once) and 3600 seconds")
        problem = uri_problem(self.uri)
        if problem:
            return ("uri", problem)
        return None


def uri_problem(uri: str) -> Optional[str]:
    """Why `uri` is no place to listen (None when it is one): the scheme, a tcp host and port, a unix path."""
    from urllib.parse import urlparse

    if not uri.startswith(("tcp://", "unix://", "stdio://")):
        return f"expected tcp://HOST:PORT, unix://PATH or stdio://, got {describe_value(uri)}"
    parsed = urlparse(uri)
    if parsed.scheme == "unix" and not parsed.path:
        return f"{describe_value(uri)}: a unix:// URI needs a path (unix:///run/wyoming.sock)"
    if parsed.scheme != "tcp":
        return None
    try:
        port = parsed.port
    except ValueError:  # not a number, or out of range
        port = -1
    if not parsed.hostname or port is None:
        return f"{describe_value(uri)}: a tcp:// URI needs a host and a port (tcp://0.0.0.0:10200)"
    if port < 0:
        return f"{describe_value(uri)}: the port must be a number from 0 to 65535"
    return None


@dataclass(frozen=True)
class EngineChoice:
    """The `engine:` section: which engine serves, and what to use when it cannot start."""

    name: str = "cosyvoice"
    """Engine plugin name (see `wyoming-cosyvoice plugins`)."""

    fallback: Optional[str] = "espeak"
    """Engine to serve with when `name` cannot start here (null: refuse to start instead); while `name` serves, it
    also runs beside it and speaks what `name` cannot: a request that waited `server.busy_wait_s` for room, or
    one the engine failed (docs/reliability.md). null: no fallback, those wait longer or get an error."""


@dataclass(frozen=True)
class Limits:
    """The `limits:` section: protocol, resource and access limits (docs/reliability.md, "Limits")."""

    max_header_bytes: int = 65536
    """Longest accepted event header line (JSON), in bytes."""

    max_data_bytes: int = 1048576
    """Largest accepted event data section (`data_length`), in bytes."""

    max_payload_bytes: int = 1048576
    """Largest accepted event payload (`payload_length`), in bytes (a TTS server reads no audio from clients)."""

    max_text_chars: int = 10000
    """Longest text of one `synthesize` request or one `synthesize-chunk`, in characters."""

    max_stream_chars: int = 100000
    """Most text one connection may have queued or streamed in one `synthesize-start`..`stop`, in characters."""

    max_connections: int = 64
    """Open client connections at once; more are told `ServerBusy` and closed."""

    idle_timeout_s: float = 60.0
    """A connection with no synthesis in progress that completes no event for this long is closed."""

    write_timeout_s: float = 30.0
    """A client that accepts no audio for this long (stopped reading) is disconnected and its synthesis cancelled."""

    engine_timeout_s: float = 120.0
    """An engine that produces no audio for this long is considered hung: the request fails, the worker is replaced."""

    shutdown_grace_s: float = 10.0
    """After SIGTERM/SIGINT/SIGHUP, how long in-flight requests may finish before connections are closed."""

    max_reference_seconds: float = 120.0
    """Longest reference recording accepted, by its header (before it is read); longer files are refused."""

    allowed_networks: tuple[str, ...] = ()
    """Client networks allowed to connect (CIDR, e.g. 192.168.1.0/24 or 127.0.0.1/32); empty allows all."""

    def validate(self) -> Optional[tuple[str, str]]:
        """Check ranges and network syntax."""
        import ipaddress

        for name in (
            "max_header_bytes",
            "max_data_bytes",
            "max_payload_bytes",
            "max_text_chars",
            "max_stream_chars",
            "max_connections",
        ):
            if getattr(self, name) < 1:
                return (name, "must be at least 1")
        if self.max_header_bytes < 256:
            return ("max_header_bytes", "must be at least 256 (a Wyoming header line needs room)")
        for name in ("idle_timeout_s", "write_timeout_s", "engine_timeout_s", "max_reference_seconds"):
            if getattr(self, name) <= 0:
                return (name, "must be greater than 0")
        if self.shutdown_grace_s < 0:
            return ("shutdown_grace_s", "must be 0 or more")
        for i, net in enumerate(self.allowed_networks):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as err:
                return (f"allowed_networks[{i}]", f"not a network: {err}")
        return None


OPENAI_VOICE_NAMES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse")
"""OpenAI's built-in voice names: a request for one gets the voice `web.openai.voices` maps it to (else the default)."""


@dataclass(frozen=True)
class OpenAISettings:
    """The `web.openai:` section: the OpenAI-compatible speech API under `/v1` on the web port (docs/openai-api.md)."""

    enabled: bool = True
    """Serve `/v1/audio/speech`, `/v1/audio/voices` and `/v1/models` whenever the web port is on."""

    api_keys: tuple[str, ...] = ()
    """Keys accepted as `Authorization: Bearer KEY` besides `web.token`. With neither set the API answers only when
    `web.host` is a loopback address."""

    voices: Mapping[str, str] = field(default_factory=dict)
    """Voice names a request may use besides the profiles' own, mapped to a profile (e.g. `alloy: robot-en`).
    OpenAI's built-in names not listed here get the default voice."""

    def validate(self) -> Optional[tuple[str, str]]:
        """Check key lengths and the alias names."""
        for i, key in enumerate(self.api_keys):
            if len(key) < 8:
                return (f"api_keys[{i}]", "must have at least 8 characters")
        for alias, target in self.voices.items():
            if not target.strip():
                return (f"voices.{alias}", "must name a voice")
        return None


@dataclass(frozen=True)
class WebSettings:
    """The `web:` section: the voice studio page, served by the same process and event loop (docs/studio.md)."""

    enabled: bool = False
    """Serve the voice studio (needs the `web` extra: pip install 'wyoming-cosyvoice[web]')."""

    host: str = "127.0.0.1"
    """Address the page listens on; 127.0.0.1 keeps it to this machine."""

    port: int = 10201
    """TCP port of the page (0: any free port, logged at startup)."""

    token: Optional[str] = None
    """Access token every request that changes something must carry (null: none; env WYOMING_COSYVOICE_WEB_TOKEN)."""

    max_upload_bytes: int = 16 * 1024 * 1024
    """Largest accepted reference upload, in bytes (a 30 s 48 kHz stereo 32-bit WAV is 11.5 MB)."""

    max_uploads: int = 4
    """Uploads received or held at once (memory stays under max_uploads x max_upload_bytes); more wait, then 503."""

    max_connections: int = 32
    """Open connections to the web port at once; more are answered 503 and closed, so the Wyoming port keeps its
    file descriptors (lowered at start when the file limit cannot hold both)."""

    header_timeout_s: float = 10.0
    """A new connection that has not sent a whole request head within this is closed (slow or silent clients)."""

    body_timeout_s: float = 60.0
    """A request whose body has not arrived whole within this after its head is dropped (stalled uploads)."""

    idle_timeout_s: float = 30.0
    """A kept-alive connection that sends no whole next request head within this is closed."""

    studio: bool = True
    """Serve the studio page and its `/api` (false: the web port serves only the OpenAI-compatible `/v1`)."""

    openai: OpenAISettings = field(default_factory=OpenAISettings)
    """The OpenAI-compatible speech API on the same port (docs/openai-api.md)."""

    def validate(self) -> Optional[tuple[str, str]]:
        """Check ranges."""
        import math

        if not 0 <= self.port <= 65535:
            return ("port", "must be between 0 and 65535")
        if not self.host:
            return ("host", "must not be empty")
        if self.max_upload_bytes < 65536:
            return ("max_upload_bytes", "must be at least 65536")
        for name in ("max_uploads", "max_connections"):
            if getattr(self, name) < 1:
                return (name, "must be at least 1")
        for name in ("header_timeout_s", "body_timeout_s", "idle_timeout_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                return (name, "must be a finite number greater than 0")
        if self.token is not None and len(self.token) < 8:
            return ("token", "must have at least 8 characters (or be null for none)")
        return None


@dataclass(frozen=True)
class MetricsSettings:
    """The `metrics:` section: Prometheus metrics at `/metrics` (docs/metrics.md; needs the `metrics` extra)."""

    enabled: bool = True
    """Record metrics (when prometheus_client is installed) and serve them at `/metrics` on the studio's port."""

    port: Optional[int] = None
    """A listener for `/metrics` alone (null: none; the studio's port serves it when `web.enabled`)."""

    host: str = "127.0.0.1"
    """Address of that listener; any other than a loopback address needs a token (`token` or `web.token`)."""

    token: Optional[str] = None
    """Token a scraper sends as `Authorization: Bearer` (null: `web.token`; env WYOMING_COSYVOICE_METRICS_TOKEN)."""

    def validate(self) -> Optional[tuple[str, str]]:
        """Check ranges."""
        if self.port is not None and not 0 <= self.port <= 65535:
            return ("port", "must be between 0 and 65535 (or null for none)")
        if not self.host:
            return ("host", "must not be empty")
        if self.token is not None and len(self.token) < 8:
            return ("token", "must have at least 8 characters (or be null for web.token)")
        return None


@dataclass(frozen=True)
class Config:
    """The whole server configuration (`config/server.yaml`)."""

    server: ServerSettings = field(default_factory=ServerSettings)
    """Listening and admission settings."""

    engine: EngineChoice = field(default_factory=EngineChoice)
    """Engine selection."""

    engines: Mapping[str, Any] = field(default_factory=dict)
    """Per-engine settings, keyed by engine name; each engine validates its own section."""

    voice_providers: Mapping[str, Any] = field(default_factory=lambda: {"yaml": {}, "folder": {}})
    """Enabled voice-profile providers, keyed by name, with their settings."""

    sinks: Mapping[str, Any] = field(default_factory=dict)
    """Server-side sinks that receive a copy of every synthesis, keyed by name."""

    limits: Limits = field(default_factory=Limits)
    """Protocol, resource and access limits (see docs/reliability.md, "Limits")."""

    web: WebSettings = field(default_factory=WebSettings)
    """The voice studio page (off by default)."""

    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    """Prometheus metrics (recorded when prometheus_client is installed; served by the studio or `metrics.port`)."""

    _source: str = field(default="(defaults)", compare=False)
    _base_dir: Path = field(default=Path("."), compare=False)

    def section(self, group: str, name: str) -> Section:
        """The settings of plugin `name` in `group` (engines, voice_providers, sinks)."""
        data = getattr(self, group).get(name) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{self._source}:{group}.{name}: expected a mapping, got {describe_value(data)}")
        return Section(name=name, data=data, source=self._source, key=f"{group}.{name}", base_dir=self._base_dir)

    @property
    def source(self) -> str:
        """The file this configuration was read from."""
        return self._source

    @property
    def base_dir(self) -> Path:
        """Folder that relative paths in this configuration resolve against."""
        return self._base_dir


def load_config(path: Optional[Path]) -> Config:
    """Load `server.yaml` (or defaults when `path` is None)."""
    if path is None:
        return Config(_base_dir=DEFAULT_CONFIG_DIR)
    path = Path(path)
    data = load_yaml(path)
    base_dir = path.resolve().parent
    config = build(Config, data, source=str(path), base_dir=base_dir)
    return dataclasses.replace(config, _source=str(path), _base_dir=base_dir)
