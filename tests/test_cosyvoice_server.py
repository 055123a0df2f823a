"""CosyVoice engine through the real server and the real wyoming client (stand-in checkout), and the fallback."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

from wyoming_cosyvoice.config import load_config
from wyoming_cosyvoice.errors import EngineUnavailable
from wyoming_cosyvoice.plugins import Plugins
from wyoming_cosyvoice.server import build_service

from .cosyvoice_support import STANDIN_REPO, dominant_frequency, forget_cosyvoice, make_model_dir, write_prompt
from .helpers import SHARED_VOICES, collect, connect, read, running_server, write_config


@pytest.fixture(autouse=True)
def fresh_import() -> Any:
    forget_cosyvoice()
    yield
    forget_cosyvoice()


def cosyvoice_config(tmp_path: Path, voices: list[dict], fallback: Any = None, **engine: Any) -> Path:
    pytest.importorskip("torch")
    section = {
        "repo": str(STANDIN_REPO),
        "model_dir": str(make_model_dir(tmp_path / "model", 2)),
        "cache_dir": str(tmp_path / "cache"),
        "require_gpu": False,
        **engine,
    }
    return write_config(
        tmp_path / "cfg",
        voices=voices,
        engine={"name": "cosyvoice", "fallback": fallback},
        engines={"cosyvoice": section},
    )


async def test_streams_cloned_voice_through_the_server(tmp_path: Path) -> None:
    prompt = write_prompt(tmp_path / "tars.wav", pitch=170.0, rate=44100)
    path = cosyvoice_config(
        tmp_path,
        [
            {"name": "tars", "reference_audio": str(prompt), "mode": "zero_shot", "transcript": "Hello there."},
            {
                "name": "nova",
                "reference_audio": str(write_prompt(tmp_path / "nova.wav", pitch=240.0)),
                "languages": ["de-DE"],
            },
        ],
    )
    async with running_server(load_config(path)) as server:
        async with connect(server) as client:
            await client.write_event(Describe().event())
            info = Info.from_event(await read(client))
            description = info.tts[0].description
            assert "engine: cosyvoice" in description and "state=ready" in description
            assert "voices_prepared=2" in description and "model=CosyVoice2 (model)" in description
            assert [v.name for v in info.tts[0].voices] == ["tars", "nova"]

            text = "The path from the client to the model and back is real, only the model is a stand-in."
            await client.write_event(Synthesize(text=text).event())
            reply = await collect(client)
            assert not reply.errors and reply.rate == 24000 and reply.chunks >= 3
            assert abs(dominant_frequency(reply.samples(), 24000) - 170.0) < 3.0

            # Streaming synthesis with the other voice: one audio-start, audio per sentence, synthesize-stopped.
            await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="nova")).event())
            for piece in ("Guten Tag. ", "Wie geht ", "es dir heute?"):
                await client.write_event(SynthesizeChunk(text=piece).event())
            await client.write_event(SynthesizeStop().event())
            reply = await collect(client, until="synthesize-stopped")
            assert not reply.errors and reply.stopped and len(reply.starts) == 1
            assert abs(dominant_frequency(reply.samples(), 24000) - 240.0) < 3.0
        assert server.service.engine.cache.misses == 2  # each voice once, at startup


async def test_client_leaving_cancels_and_others_are_served(tmp_path: Path) -> None:
    prompt = write_prompt(tmp_path / "p.wav")
    path = cosyvoice_config(tmp_path, [{"name": "tars", "reference_audio": str(prompt)}])
    async with running_server(load_config(path)) as server:
        engine = server.service.engine
        async with connect(server) as client:
            await client.write_event(Synthesize(text="A very long request that the client abandons. " * 6).event())
            first = await read(client)
            assert first is not None and first.type == "audio-start"
        # Disconnected: the engine stops at its next chunk and cleans upstream's per-call state.
        for _ in range(200):
            if not engine.busy and engine.in_flight + engine.queued == 0:
                break
            await asyncio.sleep(0.05)
        assert not engine.busy and engine.in_flight + engine.queued == 0
        assert engine.model.model.tts_speech_token_dict == {}
        async with connect(server) as client:
            await client.write_event(Synthesize(text="Still here.").event())
            reply = await collect(client)
            assert not reply.errors and reply.seconds > 0.5


@pytest.mark.skipif(
    not (SHARED_VOICES / "interstellar-tars-01-resemble-denoised.wav").is_file(),
    reason="shared test voices not present",
)
async def test_real_reference_recording(tmp_path: Path) -> None:
    tars = SHARED_VOICES / "interstellar-tars-01-resemble-denoised.wav"
    path = cosyvoice_config(tmp_path, [{"name": "tars", "reference_audio": str(tars), "mode": "cross_lingual"}])
    async with running_server(load_config(path)) as server:
        async with connect(server) as client:
            await client.write_event(Synthesize(text="Cloned from a real recording.").event())
            reply = await collect(client)
            assert not reply.errors and reply.rate == 24000 and np.isfinite(reply.samples()).all()
            assert reply.seconds > 1.0


async def test_falls_back_to_espeak_with_one_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_config(
        tmp_path / "cfg",
        engine={"name": "cosyvoice", "fallback": "espeak"},
        engines={"cosyvoice": {"repo": str(STANDIN_REPO), "model_dir": str(tmp_path / "no-model")}},
    )
    with caplog.at_level(logging.WARNING):
        async with running_server(load_config(path)) as server:
            assert server.service.engine.name == "espeak"
            async with connect(server) as client:
                await client.write_event(Describe().event())
                info = Info.from_event(await read(client))
                assert "fallback from cosyvoice: cosyvoice engine: model directory" in info.tts[0].description
                await client.write_event(Synthesize(text="Fallback speech.").event())
                reply = await collect(client)
                assert not reply.errors and reply.rate == 22050 and reply.seconds > 0.3
    lines = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert (
        len(lines) == 1 and "README: 'GPU engine: CosyVoice'" in lines[0] and "wyoming-cosyvoice download" in lines[0]
    )


async def test_no_fallback_refuses_to_start(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "cfg",
        engine={"name": "cosyvoice", "fallback": None},
        engines={"cosyvoice": {"model_dir": str(tmp_path)}},
    )
    config = load_config(path)
    with pytest.raises(EngineUnavailable, match=r"^cosyvoice engine: engines.cosyvoice.repo is not set"):
        await build_service(config, Plugins(config.server.plugins_dir))


def test_serve_command_prints_one_line(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "cfg",
        engine={"name": "cosyvoice", "fallback": None},
        engines={"cosyvoice": {"repo": str(tmp_path / "CosyVoice"), "model_dir": str(tmp_path)}},
    )
    result = subprocess.run(
        [sys.executable, "-m", "wyoming_cosyvoice", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cosyvoice engine: CosyVoice checkout {tmp_path / 'CosyVoice'} not found "
        f"(git clone --recursive https://github.com/FunAudioLLM/CosyVoice.git {tmp_path / 'CosyVoice'})"
    )


async def test_hot_reload_makes_the_engine_forget_removed_and_changed_voices(tmp_path: Path) -> None:
    import yaml

    low, high = write_prompt(tmp_path / "low.wav", pitch=150.0), write_prompt(tmp_path / "high.wav", pitch=260.0)
    path = cosyvoice_config(
        tmp_path, [{"name": "tars", "reference_audio": str(low)}, {"name": "nova", "reference_audio": str(high)}]
    )
    async with running_server(load_config(path)) as server:
        engine = server.service.engine
        spk2info = engine.model.frontend.spk2info
        before = {name: engine._prepared[sig].spk_id for name, sig in engine._signatures.items()}
        assert set(before) == {"tars", "nova"} and set(before.values()) <= set(spk2info)

        # nova removed, tars now cloned from the other recording.
        third = write_prompt(tmp_path / "third.wav", pitch=200.0)
        voices = tmp_path / "cfg" / "voices.yaml"
        voices.write_text(yaml.safe_dump({"voices": [{"name": "tars", "reference_audio": str(third)}]}))
        async with connect(server) as client:
            await client.write_event(Describe().event())
            assert [v.name for v in Info.from_event(await read(client)).tts[0].voices] == ["tars"]
        await asyncio.wait_for(server.service.preparer.wait_idle(), 30)
        assert not set(before.values()) & set(spk2info), "old entries dropped from upstream's spk2info"
        assert set(engine._signatures) == {"tars"} and len(engine._prepared) == 1
        assert health_value(engine) == 1
        assert len(list((tmp_path / "cache" / "voices").glob("*.pt"))) == 3  # the disk cache keeps all three
        async with connect(server) as client:
            await client.write_event(Synthesize(text="Cloned from the new recording now.").event())
            reply = await collect(client)
            assert not reply.errors and abs(dominant_frequency(reply.samples(), 24000) - 200.0) < 3.0


def health_value(engine: Any) -> Any:
    return engine.health()["voices_prepared"]
