"""Test support for the CosyVoice engine: the stand-in checkout, model directories and prompt recordings."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import soundfile
import yaml

STANDIN_REPO = Path(__file__).resolve().parent / "standin_cosyvoice"
"""A fake CosyVoice checkout following the real API (see its README)."""

YAMLS = {1: "cosyvoice.yaml", 2: "cosyvoice2.yaml", 3: "cosyvoice3.yaml"}

ROOT = Path(__file__).resolve().parents[1]

UPSTREAM_IMPORTS = (
    "torch",
    "torchaudio",
    "hyperpyyaml",
    "onnxruntime",
    "onnx",
    "transformers",
    "diffusers",
    "conformer",
    "whisper",
    "omegaconf",
    "hydra",
    "librosa",
    "lightning",
    "inflect",
)
"""Python packages upstream CosyVoice (and its Matcha-TTS) import for inference."""


def upstream_repo() -> Path:
    """The real upstream checkout: $COSYVOICE_REPO, else ../shared/cosyvoice-upstream beside the repository."""
    return Path(os.environ.get("COSYVOICE_REPO") or ROOT.parent / "shared" / "cosyvoice-upstream")


def real_code_missing() -> Optional[str]:
    """One line saying why the real upstream code cannot run here, or None when it can."""
    repo = upstream_repo()
    if not (repo / "cosyvoice" / "cli" / "cosyvoice.py").is_file():
        return f"real CosyVoice code not found at {repo} (set COSYVOICE_REPO to a checkout)"
    for name in UPSTREAM_IMPORTS:
        if importlib.util.find_spec(name) is None:
            return f"real CosyVoice code needs the Python package {name!r} (docs/cosyvoice.md, 'Integration test')"
    return None


def make_model_dir(path: Path, version: int = 2, speakers: tuple[str, ...] = (), **knobs: Any) -> Path:
    """A model directory with the files upstream opens; `knobs` go to the stand-in's `standin:` yaml section."""
    path.mkdir(parents=True, exist_ok=True)
    doc = {"sample_rate": 22050 if version == 1 else 24000, "standin": {"token_s": 0.001, "poll_s": 0.01, **knobs}}
    (path / YAMLS[version]).write_text(yaml.safe_dump(doc))
    try:
        import torch
    except ImportError:  # enough for tests of the file checks, which never load the model
        torch = None
    for name in ("llm.pt", "flow.pt", "hift.pt"):
        if torch is None:
            (path / name).write_bytes(b"weights")
        else:
            torch.save({"weight": torch.zeros(2)}, path / name)
    for name in ("campplus.onnx", f"speech_tokenizer_v{version}.onnx"):
        (path / name).write_bytes(b"onnx stand-in")
    if version >= 2:
        (path / "CosyVoice-BlankEN").mkdir(exist_ok=True)
    if speakers:
        info = {}
        for n, name in enumerate(speakers):
            embedding = torch.zeros(1, 192)
            embedding[0, 0] = 200.0 + 50 * n
            info[name] = {"embedding": embedding}
        torch.save(info, path / "spk2info.pt")
    return path


def write_prompt(path: Path, pitch: float = 180.0, rate: int = 22050, seconds: float = 3.0, channels: int = 1) -> Path:
    """A voiced harmonic recording with its strongest partial at `pitch` Hz."""
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.5 * np.sin(2 * np.pi * pitch * t) + 0.1 * np.sin(2 * np.pi * 2 * pitch * t)
    data = np.repeat(wave[:, None], channels, axis=1).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), data, rate, subtype="PCM_16")
    return path


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    """Frequency of the strongest spectral peak."""
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


def forget_cosyvoice() -> None:
    """Drop imported `cosyvoice` modules so the next engine start imports (and patches) them afresh."""
    for name in [m for m in sys.modules if m.split(".")[0] in ("cosyvoice", "matcha", "modelscope")]:
        del sys.modules[name]  # submodules too: a new `matcha` package would lack the `utils` left behind
