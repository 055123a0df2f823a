"""How a voice profile maps onto CosyVoice's inference calls per model version (pure: no torch, no model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from wyoming_cosyvoice.errors import VoiceError
from wyoming_cosyvoice.voices import VoiceProfile

END_OF_PROMPT = "<|endofprompt|>"
CV3_SYSTEM = "You are a helpful assistant."
"""CosyVoice 3 needs `<|endofprompt|>` in its prompt; the official examples put this system prompt before it."""

V1_LANGUAGE_TAGS = {"zh": "<|zh|>", "en": "<|en|>", "ja": "<|ja|>", "yue": "<|yue|>", "ko": "<|ko|>"}
"""CosyVoice 1 cross-lingual text starts with the target language's tag."""


@dataclass(frozen=True)
class Recipe:
    """Which upstream call serves a profile and what prompt text it is prepared with."""

    method: str
    """sft, instruct (v1, built-in speaker), zero_shot, cross_lingual or instruct2 (v2/v3)."""

    prompt_text: Optional[str] = None
    """Text passed to `add_zero_shot_spk` (None: a built-in speaker, nothing to prepare)."""

    speaker: str = ""
    """Built-in speaker id (sft, v1 instruct)."""

    instruct_text: str = ""
    """Instruction for v1 instruct mode (v2/v3 keep theirs inside the prepared entry)."""


@dataclass(frozen=True)
class PreparedVoice:
    """A prepared profile: upstream method and the speaker id in `frontend.spk2info`."""

    method: str
    """As in Recipe."""

    spk_id: str
    """Built-in speaker or our prepared `zero_shot_spk_id`."""

    instruct_text: str = ""
    """Instruction for v1 instruct mode."""

    from_cache: bool = False
    """The prompt features were loaded from disk instead of computed."""


def with_end_of_prompt(text: str) -> str:
    """`text` ending in `<|endofprompt|>` (added when missing)."""
    text = text.strip()
    return text if END_OF_PROMPT in text else text + END_OF_PROMPT


def recipe(profile: VoiceProfile, version: int, speakers: Sequence[str]) -> Recipe:
    """The recipe for `profile` on CosyVoice `version`; what the profile lacks is a one-line VoiceError."""
    name, mode = profile.name, profile.mode
    if mode == "sft" or (mode == "instruct" and version == 1):
        if not profile.speaker or profile.speaker not in speakers:
            known = ", ".join(speakers) if speakers else "none: this model has no built-in speakers"
            raise VoiceError(f"voice {name!r}: mode {mode} needs `speaker` set to a built-in speaker ({known})")
        if mode == "sft":
            return Recipe("sft", speaker=profile.speaker)
        if not (profile.instruct or "").strip():
            raise VoiceError(f"voice {name!r}: mode instruct needs `instruct` text")
        return Recipe("instruct", speaker=profile.speaker, instruct_text=with_end_of_prompt(profile.instruct or ""))
    if profile.reference_audio is None:
        raise VoiceError(f"voice {name!r}: mode {mode} needs reference_audio")
    if mode == "zero_shot":
        transcript = (profile.transcript or "").strip()
        if not transcript:
            raise VoiceError(
                f"voice {name!r}: mode zero_shot needs the transcript of its reference audio "
                "(or use mode cross_lingual)"
            )
        if version == 3 and END_OF_PROMPT not in transcript:
            transcript = CV3_SYSTEM + END_OF_PROMPT + transcript
        return Recipe("zero_shot", transcript)
    if mode == "instruct":
        text = (profile.instruct or "").strip()
        if not text:
            raise VoiceError(f"voice {name!r}: mode instruct needs `instruct` text")
        return Recipe("instruct2", with_end_of_prompt(f"{CV3_SYSTEM} {text}" if version == 3 else text))
    if version == 3:
        # CosyVoice 3 cross-lingual needs the prompt marker; as an instruction it keeps text normalization
        # (a marker inside the text would switch upstream's normalization off).
        return Recipe("instruct2", CV3_SYSTEM + END_OF_PROMPT)
    return Recipe("cross_lingual", "")


def v1_language_tag(profile: VoiceProfile) -> str:
    """The CosyVoice 1 language tag for the profile's first language ("" when it has none)."""
    primary = profile.languages[0].replace("_", "-").split("-")[0].lower() if profile.languages else ""
    return V1_LANGUAGE_TAGS.get(primary, "")


def speakable(text: str) -> bool:
    """Upstream raises on empty or blank text and yields nothing for punctuation only: only letters/digits speak."""
    return any(ch.isalnum() for ch in text)


def synthetic_prompt(rate: int = 24000, seconds: float = 3.0) -> np.ndarray:
    """A voiced, syllable-shaped harmonic signal: the warm-up prompt when no voice is configured."""
    t = np.arange(int(rate * seconds)) / rate
    f0 = 130.0 + 20.0 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * t) ** 2
    return (0.3 * voice * envelope / np.abs(voice).max()).astype(np.float32)
