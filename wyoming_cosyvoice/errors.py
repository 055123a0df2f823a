"""Project error classes: each prints as one line and maps to a Wyoming error code."""


class CosyVoiceServiceError(Exception):
    """Base class of user-facing errors; the CLI prints them as one line."""

    @property
    def code(self) -> str:
        """Machine-readable code for Wyoming `error` events: the class name."""
        return type(self).__name__


class ConfigError(CosyVoiceServiceError):
    """A configuration file is missing or invalid ("file:key: problem")."""


class PluginError(CosyVoiceServiceError):
    """A plugin could not be loaded or registered a duplicate name."""


class VoiceNotFound(CosyVoiceServiceError):
    """A request named a voice that no provider knows."""


class VoiceError(CosyVoiceServiceError):
    """A voice profile is invalid (bad reference audio, transcript, language)."""


class CacheUnwritable(VoiceError):
    """A cache folder cannot be written (read-only, full, not a folder): this machine's problem, not the voice's;
    a voice that fails with it is retried."""


class EngineUnavailable(CosyVoiceServiceError):
    """An engine cannot start here (missing model, checkout, library or GPU)."""


class EngineNotConfigured(EngineUnavailable):
    """An engine was never set up (a setting it needs is empty): the fallback serves, and that is no warning."""


class EngineError(CosyVoiceServiceError):
    """An engine failed while synthesizing a request."""


class BadRequest(CosyVoiceServiceError):
    """A client sent an event that is malformed or not allowed."""


class ServerBusy(CosyVoiceServiceError):
    """The server is at its concurrency bound and refused the request."""


class SinkError(CosyVoiceServiceError):
    """An audio sink cannot be set up (no audio device, file exists, bad target)."""


class ClientError(CosyVoiceServiceError):
    """The client could not talk to a Wyoming server (connection refused, timeout, connection closed)."""


class RemoteError(CosyVoiceServiceError):
    """A Wyoming server answered a request with an `error` event."""


class UsageError(CosyVoiceServiceError):
    """A command was given conflicting or missing options."""


class NoAudioDevice(SinkError):
    """This machine has no usable audio output (no device, or no PortAudio library)."""


class ProtocolError(BadRequest):
    """A client broke the Wyoming framing (bad header line, lengths, JSON or UTF-8); the connection is closed."""


class LimitExceeded(BadRequest):
    """A request exceeded a configured limit (`limits:` in server.yaml)."""


class ClientTimeout(CosyVoiceServiceError):
    """A client sent nothing (or only part of an event) for longer than `limits.idle_timeout_s`."""


class EngineTimeout(EngineError):
    """The engine produced no audio for longer than `limits.engine_timeout_s`; its worker was replaced."""


class EngineCrashed(EngineError):
    """The engine's worker process died during the request (a crash in native code) and was replaced, or it
    crashed too often of late and is not restarted yet; other requests and connections go on."""


class EngineOutOfMemory(EngineError):
    """The engine ran out of (GPU) memory for one request; caches were released and the next request may run."""


class DownloadError(CosyVoiceServiceError):
    """A model could not be downloaded (no hub client, no network); the message says what to do instead."""


class MissingExtra(CosyVoiceServiceError):
    """An optional extra a command needs is not installed (the CLI exits 1 with the line saying how to add it)."""
