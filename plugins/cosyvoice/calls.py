"""Upstream's inference call for a prepared voice: which generator speaks a text in it."""

from __future__ import annotations

from typing import Any, Generator, Optional

from .recipes import PreparedVoice


def inference(
    model: Any, voice: PreparedVoice, text: str, v1_tag: Optional[str], kwargs: dict
) -> Generator[dict, None, None]:
    """The upstream generator for `voice` (a method of `model`, CosyVoice 1/2/3); `v1_tag`: CosyVoice 1's language
    tag for a cross-lingual voice (None: none or another version)."""
    if voice.method == "sft":
        return model.inference_sft(text, voice.spk_id, **kwargs)
    if voice.method == "instruct":
        return model.inference_instruct(text, voice.spk_id, voice.instruct_text, **kwargs)
    if voice.method == "zero_shot":
        return model.inference_zero_shot(text, "", "", zero_shot_spk_id=voice.spk_id, **kwargs)
    if voice.method == "instruct2":
        return model.inference_instruct2(text, "", "", zero_shot_spk_id=voice.spk_id, **kwargs)
    if v1_tag:
        return _tagged_cross_lingual(model, text, v1_tag, voice.spk_id, kwargs)
    return model.inference_cross_lingual(text, "", zero_shot_spk_id=voice.spk_id, **kwargs)


def _tagged_cross_lingual(model: Any, text: str, tag: str, spk_id: str, kwargs: dict) -> Generator[dict, None, None]:
    """CosyVoice 1 cross-lingual: upstream's own normalization and sentence split first, then the language tag on
    each segment (a tag in front of the whole text makes upstream skip both)."""
    for segment in model.frontend.text_normalize(text, split=True):
        yield from model.inference_cross_lingual(tag + segment, "", zero_shot_spk_id=spk_id, **kwargs)
