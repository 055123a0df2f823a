"""Real CosyVoice2 model audio over the real Triton wire: the upstream CosyVoice2 code with a tiny random-weight
model, served by a real tritonserver (Python backend, CPU) under upstream's contract, spoken through our server's
Triton engine to the `wyoming` client. Runs where CosyVoice's Python dependencies are installed (docs/cosyvoice.md,
"Integration test"); the checkout is $COSYVOICE_REPO, else ../shared/cosyvoice-upstream beside this checkout.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pytest
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.tts import Synthesize

from wyoming_cosyvoice.config import load_config

from .cosyvoice_support import write_prompt
from .helpers import connect, read, running_server, write_config
from .triton_support import MODELS, TritonServer, unavailable

ROOT = Path(__file__).resolve().parents[1]
REPO = Path(os.environ.get("COSYVOICE_REPO") or ROOT.parent / "shared" / "cosyvoice-upstream")
TEXT = "The quick brown fox jumps over the lazy dog, and the whole path from client to model is real."
NEEDED = ("torch", "torchaudio", "hyperpyyaml", "onnxruntime", "transformers", "conformer", "diffusers", "whisper")


def missing() -> Optional[str]:
    """Why the real CosyVoice2 code cannot run here (None: it can)."""
    reason = unavailable()
    if reason:
        return f"no Triton server here: {reason}"
    if not (REPO / "cosyvoice" / "cli" / "cosyvoice.py").is_file():
        return f"no CosyVoice checkout at {REPO} (set COSYVOICE_REPO)"
    absent = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if absent:
        return f"CosyVoice's dependencies are not installed ({', '.join(absent)}; docs/cosyvoice.md 'Integration test')"
    import transformers

    if tuple(int(p) for p in transformers.__version__.split(".")[:2]) >= (4, 53):
        return f"transformers {transformers.__version__} breaks upstream's LLM decoding (needs < 4.53)"
    return None


REASON = missing()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture(scope="module")
def cosyvoice_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    work = tmp_path_factory.mktemp("triton-cosyvoice")
    model_dir = work / "CosyVoice2-tiny"
    subprocess.run(
        [sys.executable, "-m", "tests.tiny_cosyvoice2", "--repo", str(REPO), "--out", str(model_dir)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=600,
    )
    server = TritonServer(work, "cv")
    params = {"repo": str(REPO), "model_dir": str(model_dir), "cache_dir": str(work / "cache"), "warmup": "false"}
    server.add_model("cosyvoice2", MODELS / "cosyvoice2_model.py", params)
    try:  # OpenMP spin-waiting inflates CPU runs several times over when cores are shared (docs/cosyvoice.md)
        yield server.start(timeout=300, models=("cosyvoice2",), env={"OMP_WAIT_POLICY": "PASSIVE"})
    finally:
        server.stop()


async def test_real_cosyvoice2_audio_crosses_the_triton_wire(tmp_path: Path, cosyvoice_triton: TritonServer) -> None:
    voices = [
        {
            "name": "prompt",
            "reference_audio": str(write_prompt(tmp_path / "p.wav", rate=24000)),
            "mode": "cross_lingual",
        }
    ]
    path = write_config(
        tmp_path / "cfg",
        voices=voices,
        engine={"name": "triton", "fallback": None},
        engines={"triton": {"endpoints": [cosyvoice_triton.url], "first_audio_timeout_s": 120}},
    )
    async with running_server(load_config(path)) as server:
        async with connect(server) as client:
            started = time.perf_counter()
            await client.write_event(Synthesize(text=TEXT).event())
            rate, audio, chunks, first = 0, b"", 0, 0.0
            while True:
                event = await read(client, 120)
                assert event is not None and event.type != "error", event
                if AudioStart.is_type(event.type):
                    rate = AudioStart.from_event(event).rate
                elif AudioChunk.is_type(event.type):
                    first = first or time.perf_counter() - started
                    chunks += 1
                    audio += event.payload or b""
                elif AudioStop.is_type(event.type):
                    break
        samples = np.frombuffer(audio, dtype="<i2").astype(np.float32) / 32768.0
        print(f"\n{len(samples) / 24000:.2f} s of CosyVoice2 audio in {chunks} chunks, first after {first:.2f} s")
        assert rate == 24000 and len(samples) > 24000 and chunks >= 2  # streamed: several chunks
        assert np.abs(samples).max() > 0.01  # model output, not silence
        assert "served" in server.service.engine.health()["endpoint1"]
