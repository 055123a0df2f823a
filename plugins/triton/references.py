"""Voice profiles for the Triton engine: the reference prepared once (validated, normalized, 16 kHz float) and
what each mode sends with every request (blocking; the engine runs it on a thread)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import soundfile

from wyoming_cosyvoice.audio import resample_clip
from wyoming_cosyvoice.errors import VoiceError
from wyoming_cosyvoice.reference import normalized_reference
from wyoming_cosyvoice.voices import VoiceProfile, problem_line

from .contract import REFERENCE_RATE

CACHES_PROMPT_BY_TEXT = frozenset({"cosyvoice3", "cosyvoice2_dit"})
"""Upstream's Triton models that cache a prompt under its reference text alone (`speaker_cache[reference_text]`):
two voices that send the same text (every cross-lingual voice sends none) get the first one's prompt."""


@dataclass(frozen=True)
class PreparedVoice:
    """What a profile sends with each request."""

    reference: Optional[np.ndarray]
    """Reference audio, float32 mono at 16 kHz (None: the deployment's cached speaker; only `target_text` goes)."""

    reference_text: str
    """Transcript of the reference (zero-shot); empty for cross-lingual."""

    @property
    def seconds(self) -> float:
        """Length of the reference audio."""
        return 0.0 if self.reference is None else len(self.reference) / REFERENCE_RATE


def signature(profile: VoiceProfile) -> tuple:
    """What makes a prepared voice stale: mode, reference file (and its mtime/size) and transcript."""
    return (profile.mode, str(profile.reference_audio), profile.reference_stamp(), profile.transcript)


def prepare_voice(profile: VoiceProfile, model: str) -> PreparedVoice:
    """The request inputs for `profile`; VoiceError (one line) for a mode the Triton deployment cannot serve."""

    def refuse(problem: str) -> VoiceError:
        return VoiceError(problem_line(profile.source, profile.name, problem))

    if profile.mode == "instruct":
        raise refuse("mode instruct is not served by upstream's Triton model (it has no instruction input)")
    if profile.mode == "sft":
        if model != "cosyvoice2":
            raise refuse(f"mode sft needs upstream's cosyvoice2 Triton model (model {model!r} needs reference audio)")
        # Upstream's cosyvoice2 model speaks its cached speaker (spk2info.pt) when no reference is sent.
        return PreparedVoice(None, "")
    path = normalized_reference(profile)  # validated, trimmed, <= 30 s, peak-normalized, >= 16 kHz, cached
    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    reference = resample_clip(data.mean(axis=1), rate, REFERENCE_RATE)
    text = (profile.transcript or "").strip() if profile.mode == "zero_shot" else ""
    return PreparedVoice(reference, text)
