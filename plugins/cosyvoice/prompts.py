"""Prompt audio loading for CosyVoice (soundfile + numpy resampling) and the on-disk cache of prepared voices."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from wyoming_cosyvoice.audio import resample_clip
from wyoming_cosyvoice.paths import cache_dir

_LOGGER = logging.getLogger(__name__)

MIN_PROMPT_RATE = 16000
"""CosyVoice's speech tokenizer and speaker model work at 16 kHz: lower rates would have to be upsampled."""


def soundfile_load_wav(wav: Any, target_sr: int, min_sr: int = MIN_PROMPT_RATE) -> Any:
    """Drop-in for CosyVoice's `load_wav` (torchaudio.load fails without torchcodec): tensor [1, N] at target_sr."""
    import soundfile
    import torch

    if hasattr(wav, "seek"):  # upstream reads the same file object several times without rewinding
        wav.seek(0)
    data, rate = soundfile.read(wav if hasattr(wav, "read") else str(wav), dtype="float32", always_2d=True)
    mono = data.mean(axis=1)
    if rate != target_sr:
        assert rate >= min_sr, "wav sample rate {} must be greater than {}".format(rate, target_sr)
        mono = resample_clip(mono, rate, target_sr)
    return torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32)).unsqueeze(0)


def prompt_key(audio_sha256: str, prompt_text: str, model_identity: str) -> str:
    """Cache key of one prepared voice: (audio content, exact prompt text, model identity)."""
    text = "\0".join((audio_sha256, prompt_text, model_identity))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def default_cache_dir() -> Path:
    """The project's cache folder: `$WYOMING_COSYVOICE_CACHE`, else ~/.cache/wyoming-cosyvoice (`paths.cache_dir`)."""
    return cache_dir()


class PromptCache:
    """Prepared-voice features (CosyVoice's `spk2info` entries) stored one file per key with torch.save."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.hits = 0
        """Voices loaded from disk since start."""
        self.misses = 0
        """Voices computed (and stored) since start."""

    def path(self, key: str) -> Path:
        """File of one entry."""
        return self.directory / "voices" / f"{key}.pt"

    def load(self, key: str, map_location: Any = None) -> Optional[dict]:
        """The stored entry, or None when absent or unreadable (it is then recomputed)."""
        import torch

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = torch.load(str(path), map_location=map_location, weights_only=True)
        except Exception as err:  # a truncated or foreign file: recompute rather than fail
            _LOGGER.warning("Prepared voice cache %s unreadable (%s); recomputing", path, err)
            return None
        if not isinstance(entry, dict):
            return None
        self.hits += 1
        return entry

    def store(self, key: str, entry: dict) -> None:
        """Write one entry atomically (a crash never leaves half a file under the final name)."""
        import torch

        path = self.path(key)
        self.misses += 1
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            torch.save({k: (v.detach().cpu() if hasattr(v, "detach") else v) for k, v in entry.items()}, tmp)
            os.replace(tmp, path)
        except OSError as err:  # a read-only cache costs a recompute next start, nothing more
            _LOGGER.warning("Cannot store prepared voice in %s: %s", path, err)

    def get_or_compute(self, key: str, compute: Callable[[], dict], map_location: Any = None) -> tuple[dict, bool]:
        """(entry, hit): the stored entry, else `compute()` stored for next time."""
        entry = self.load(key, map_location)
        if entry is not None:
            return entry, True
        entry = compute()
        self.store(key, entry)
        return entry, False
