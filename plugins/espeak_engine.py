"""Embedded default engine: espeak-ng from the `espeakng-loader` wheel (bundled library and data, offline)."""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional

from wyoming_cosyvoice.config import Section
from wyoming_cosyvoice.engine import RequestCancelled, SynthesisOptions, ThreadedEngine
from wyoming_cosyvoice.errors import EngineError, EngineUnavailable, VoiceError
from wyoming_cosyvoice.hookspecs import Register, hookimpl
from wyoming_cosyvoice.isolation import Isolation
from wyoming_cosyvoice.voices import VoiceProfile

_LOGGER = logging.getLogger(__name__)

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_ENDPAUSE = 0x1000
_PARAM_RATE = 1
_PARAM_VOLUME = 2
_PARAM_PITCH = 3
_EE_OK = 0

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _EspeakVoice(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


@dataclass(frozen=True)
class EspeakSettings:
    """`engines.espeak` settings."""

    rate: int = 165
    """Words per minute at speed 1.0 (espeak's default is 175)."""

    pitch: int = 50
    """Base pitch, 0-100."""

    volume: int = 100
    """Volume, 0-200."""

    chunk_ms: int = 60
    """Audio per callback from espeak: smaller starts sooner, larger costs fewer events."""

    library: Optional[Path] = None
    """Path to libespeak-ng (default: the one bundled in espeakng-loader)."""

    data_dir: Optional[Path] = None
    """Path to espeak-ng-data (default: the one bundled in espeakng-loader)."""

    isolation: Literal["process", "thread"] = "process"
    """`process`: libespeak-ng runs in `processes` warm child processes, so a text that crashes it fails that one
    request (the child is replaced); `thread`: in the server process, on one worker thread (a crash ends the
    server; docs/reliability.md "Native engine crashes")."""

    processes: int = 2
    """Child processes with `isolation: process` (requests spoken at once; one more stays ready while a crashed
    one is replaced)."""

    max_restarts: int = 10
    """Child processes lost (crashed) within `restart_window_s` before no more are started and requests are refused
    until the window has passed (a crash loop: a broken library, or a flood of crashing texts)."""

    restart_window_s: float = 60.0
    """The crash-loop window."""

    def validate(self) -> Optional[tuple[str, str]]:
        """Check ranges."""
        if not 1 <= self.processes <= 16:
            return ("processes", "must be between 1 and 16")
        if self.max_restarts < 1:
            return ("max_restarts", "must be at least 1")
        if not 0 < self.restart_window_s < 1e6:
            return ("restart_window_s", "must be a positive number of seconds")
        if not 80 <= self.rate <= 500:
            return ("rate", "must be between 80 and 500 words per minute")
        if not 0 <= self.pitch <= 100:
            return ("pitch", "must be between 0 and 100")
        if not 0 <= self.volume <= 200:
            return ("volume", "must be between 0 and 200")
        if not 10 <= self.chunk_ms <= 1000:
            return ("chunk_ms", "must be between 10 and 1000")
        return None


VOICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+-]{0,63}")
"""espeak voice names (`en-us`, `en-us+f3`, `mb-de1`): libespeak-ng opens a name with `/` as a file: none has one."""


def espeak_voice_for(profile: VoiceProfile) -> str:
    """The espeak voice for a profile: `options.espeak_voice`, else its first language (VoiceError if unsafe)."""
    explicit = profile.options.get("espeak_voice")
    if explicit is None or explicit == "":
        voice = (profile.languages[0] if profile.languages else "en").lower().replace("_", "-")
    else:
        voice = explicit
    if not isinstance(voice, str) or not VOICE_NAME.fullmatch(voice):
        raise VoiceError(
            f"options.espeak_voice: {str(voice)[:40]!r} is not an espeak voice name (letters, digits, '_', '+', '-')"
        )
    return voice


def espeak_heard_as(profile: VoiceProfile) -> str:
    """ "espeak voice for de-DE" (or the voice `options.espeak_voice` names): espeak never uses the recording."""
    try:
        voice = espeak_voice_for(profile)
    except VoiceError as err:
        return f"no espeak voice: {err}"
    if profile.options.get("espeak_voice"):
        return f"espeak voice {voice}"
    return f"espeak voice for {profile.languages[0] if profile.languages else 'en'}"


class EspeakEngine(ThreadedEngine):
    """espeak-ng called through ctypes, in child processes (`isolation: process`) or on one worker thread of the
    server: one request at a time per library instance (it is not thread-safe)."""

    name = "espeak"

    def __init__(self, settings: EspeakSettings) -> None:
        super().__init__()
        self.settings = settings
        self._lib: Any = None
        self._callback: Any = None
        self._emit: Optional[Callable[[bytes], None]] = None
        self._cancel: Optional[threading.Event] = None
        self._voice: Optional[str] = None
        self._started = False
        self.sample_rate = 22050
        if settings.isolation == "process":
            self.isolation = Isolation(settings.processes, settings.max_restarts, settings.restart_window_s)

    def child_args(self) -> tuple[Any, ...]:
        """What a child process needs to rebuild this engine: its settings."""
        return (self.settings,)

    async def start(self) -> None:
        """Load and initialize libespeak-ng: in the child processes, or on the worker thread."""
        await super().start()
        self._started = True
        where = f"in {self.concurrency} worker processes" if self.isolation else "in the server process"
        _LOGGER.info("espeak-ng ready (%s Hz, %s)", self.sample_rate, where)

    def load(self) -> None:
        """Load and initialize libespeak-ng (blocking; where `render` will run)."""
        self.sample_rate = self._load()

    def _load(self) -> int:
        library, data_dir = self.settings.library, self.settings.data_dir
        if library is None or data_dir is None:
            try:
                import espeakng_loader
            except ImportError:
                raise EngineUnavailable("espeak engine: the espeakng-loader package is not installed") from None
            library = library or Path(espeakng_loader.get_library_path())
            data_dir = data_dir or Path(espeakng_loader.get_data_path())
        try:
            lib = ctypes.CDLL(str(library))
        except OSError as err:
            raise EngineUnavailable(f"espeak engine: cannot load {library}: {err}") from None
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_SetVoiceByProperties.argtypes = [ctypes.POINTER(_EspeakVoice)]
        lib.espeak_SetVoiceByProperties.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, self.settings.chunk_ms, str(data_dir).encode(), 0)
        if rate <= 0:
            raise EngineUnavailable(f"espeak engine: espeak_Initialize failed for data folder {data_dir}")
        self._callback = _SYNTH_CALLBACK(self._on_audio)
        lib.espeak_SetSynthCallback(self._callback)
        lib.espeak_SetParameter(_PARAM_PITCH, self.settings.pitch, 0)
        lib.espeak_SetParameter(_PARAM_VOLUME, self.settings.volume, 0)
        self._lib = lib
        return rate

    async def prepare(self, profiles: Iterable[VoiceProfile]) -> None:
        """Load each profile's espeak voice data once, so no request pays for it."""
        for profile in profiles:
            espeak_voice_for(profile)  # an unusable name breaks the voice here, with the reason
            await self.run_in_worker(self._warm_voice, profile)

    async def warmup(self) -> None:
        """Nothing beyond `prepare`: espeak has no model to warm."""

    def _warm_voice(self, profile: VoiceProfile) -> None:
        try:
            self.render("Ready.", profile, SynthesisOptions(), lambda pcm: None, threading.Event())
        except EngineError as err:
            _LOGGER.warning("voice %s: %s", profile.name, err)

    def _on_audio(self, wav: Any, count: int, _events: Any) -> int:
        """espeak's synth callback: forward samples; returning 1 aborts synthesis (cancellation)."""
        if self._cancel is not None and self._cancel.is_set():
            return 1
        if wav and count > 0 and self._emit is not None:
            try:
                self._emit(ctypes.string_at(wav, count * 2))
            except RequestCancelled:
                return 1
        return 0

    def _set_voice(self, voice: str) -> None:
        if voice == self._voice:
            return
        if self._lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
            props = _EspeakVoice(languages=voice.encode())
            if self._lib.espeak_SetVoiceByProperties(ctypes.byref(props)) != _EE_OK:
                primary = voice.split("-")[0]
                props = _EspeakVoice(languages=primary.encode())
                if self._lib.espeak_SetVoiceByProperties(ctypes.byref(props)) != _EE_OK:
                    raise EngineError(f"espeak engine: no espeak voice for {voice!r}")
        self._voice = voice

    def render(
        self,
        text: str,
        profile: VoiceProfile,
        options: SynthesisOptions,
        emit: Callable[[bytes], None],
        cancel: threading.Event,
    ) -> None:
        """Synthesize on the worker thread; espeak calls back every `chunk_ms` of audio."""
        if self._lib is None:
            raise EngineError("espeak engine used before start()")
        self._set_voice(espeak_voice_for(profile))
        rate = int(round(self.settings.rate * options.speed))
        self._lib.espeak_SetParameter(_PARAM_RATE, max(80, min(rate, 450)), 0)
        data = text.encode("utf-8") + b"\0"
        self._emit, self._cancel = emit, cancel
        try:
            result = self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8 | _ENDPAUSE, None, None)
        finally:
            self._emit, self._cancel = None, None
        if cancel.is_set():
            raise RequestCancelled()
        if result != _EE_OK:
            raise EngineError(f"espeak engine: espeak_Synth failed with code {result}")

    def heard_as(self, profile: VoiceProfile) -> str:
        """espeak's voice for the profile's language; the recording is never used."""
        return espeak_heard_as(profile)

    def health(self) -> dict[str, Any]:
        """Engine facts (with the child processes' under process isolation)."""
        facts = super().health()
        facts.setdefault("state", "ready" if self._started else "loading")
        return facts


def create_engine(section: Section) -> EspeakEngine:
    """Factory: `engines.espeak` settings -> engine."""
    return EspeakEngine(section.parse(EspeakSettings))


@hookimpl
def register_engines(register: Register) -> None:
    """Register the embedded espeak-ng engine."""
    register("espeak", create_engine)
