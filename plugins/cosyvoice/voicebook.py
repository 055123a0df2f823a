"""The prepared-voice book: which voices are prepared, under which signature, forgetting them, the disk cache."""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import Any, Iterable, Optional

from wyoming_cosyvoice.errors import VoiceError
from wyoming_cosyvoice.reference import normalized_reference
from wyoming_cosyvoice.voices import VoiceProfile

from . import upstream
from .prompts import PromptCache, prompt_key
from .recipes import PreparedVoice, recipe

_LOGGER = logging.getLogger(__name__)

WARMUP_NAME = "(warm-up)"
"""The warm-up's own profile: prepared like any voice, never counted or remembered as one."""


def signature(profile: VoiceProfile) -> tuple:
    """What a prepared voice depends on: a profile with the same signature shares it."""
    return (
        profile.mode,
        str(profile.reference_audio),
        profile.reference_stamp(),
        profile.transcript,
        profile.instruct,
        profile.speaker,
        profile.languages[:1],
    )


class VoiceBook:
    """The voices prepared on the loaded model (`spk2info` entries named `wcv-...`), keyed by signature, with the
    profile names that use each; the prompt features also go to the on-disk cache (`prompts.py`), keyed by content.
    Called on the engine's worker thread, which owns the model."""

    def __init__(self, cache: PromptCache) -> None:
        self.cache = cache
        self.prepared: dict[tuple, PreparedVoice] = {}
        self.signatures: dict[str, tuple] = {}  # profile name -> the signature it was prepared under
        self.errors: dict[str, str] = {}
        self.names: set[str] = set()
        self.first_profile: Optional[VoiceProfile] = None
        """The first profile prepared (the warm-up speaks with it: no extra prompt computation)."""
        self._lock = threading.Lock()

    def clear(self) -> None:
        """A fresh model was loaded: nothing is prepared on it."""
        self.prepared.clear()
        self.signatures.clear()
        self.names.clear()

    def failed(self, name: str, why: str) -> None:
        """Preparing `name` failed (health lists it until it is prepared or forgotten)."""
        self.errors[name] = why

    def voice(self, model: Any, info: upstream.ModelInfo, profile: VoiceProfile) -> PreparedVoice:
        """The prepared voice for `profile`, preparing it now on first use (worker thread)."""
        with self._lock:  # two requests for a voice not yet prepared: one prepares it
            key = signature(profile)
            voice = self.prepared.get(key)
            if voice is None or voice.spk_id not in model.frontend.spk2info:
                voice = self._prepare(model, info, profile)
                self.prepared[key] = voice
            if profile.name != WARMUP_NAME:
                self.first_profile = self.first_profile or profile
                self.signatures[profile.name] = key
                self.names.add(profile.name)
                self.errors.pop(profile.name, None)
            return voice

    def forget(self, names: Iterable[str], spk2info: Optional[dict]) -> None:
        """Drop these profiles' voices and their `spk2info` entries (None: no model loaded); an entry another profile
        still uses stays, and so does the disk cache (keyed by content, reused if the voice comes back)."""
        for name in names:
            self.names.discard(name)
            self.errors.pop(name, None)
            if self.first_profile is not None and self.first_profile.name == name:
                self.first_profile = None
            key = self.signatures.pop(name, None)
            if key is None or key in self.signatures.values():
                continue
            voice = self.prepared.pop(key, None)
            if voice is None or not voice.spk_id.startswith("wcv-"):  # a built-in speaker belongs to the model
                continue
            if any(v.spk_id == voice.spk_id for v in self.prepared.values()):
                continue
            if spk2info is not None:
                spk2info.pop(voice.spk_id, None)
            _LOGGER.debug("Voice %s forgotten (%s)", name, voice.spk_id)

    def _prepare(self, model: Any, info: upstream.ModelInfo, profile: VoiceProfile) -> PreparedVoice:
        plan = recipe(profile, info.version, list(model.list_available_spks()))
        if plan.prompt_text is None:
            return PreparedVoice(plan.method, plan.speaker, instruct_text=plan.instruct_text)
        prompt_text = plan.prompt_text
        if plan.method == "zero_shot":
            # Upstream's inference_zero_shot normalizes the transcript (add_zero_shot_spk does not); that same call
            # leaves a text with a `<|...|>` marker as it is (CosyVoice 3's prompt).
            prompt_text = model.frontend.text_normalize(" ".join(prompt_text.split()), split=False)
        # Validated, trimmed, mono 16-bit WAV at >= 16 kHz and <= 30 s; CosyVoice gets it by path.
        reference = normalized_reference(profile, self.cache.directory / "references")
        audio_hash = hashlib.sha256(reference.read_bytes()).hexdigest()
        key = prompt_key(audio_hash, prompt_text, info.identity)
        spk_id = f"wcv-{key[:16]}"
        frontend = model.frontend

        def compute() -> dict:
            try:
                model.add_zero_shot_spk(prompt_text, str(reference), spk_id)
            except Exception as err:  # upstream asserts and raises on prompts it cannot use
                raise VoiceError(
                    f"voice {profile.name!r}: CosyVoice could not prepare {profile.reference_audio}: "
                    f"{type(err).__name__}: {err}"
                ) from None
            return frontend.spk2info[spk_id]

        entry, hit = self.cache.get_or_compute(key, compute, map_location=getattr(frontend, "device", None))
        frontend.spk2info[spk_id] = entry
        _LOGGER.info("Voice %s prepared (%s, %s)", profile.name, plan.method, "from cache" if hit else "computed")
        return PreparedVoice(plan.method, spk_id, from_cache=hit)
