"""One Reply per audio reply (`Service.open_reply`): voice and engine found once, the sinks' copy start to finish."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import soundfile
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

from wyoming_cosyvoice.config import load_config
from wyoming_cosyvoice.errors import VoiceNotFound

from .helpers import collect, connect, running_server, write_config


def _count(monkeypatch: pytest.MonkeyPatch, obj: Any, name: str) -> list[Any]:
    """Record every call of `obj.name` (it still runs)."""
    calls: list[Any] = []
    original = getattr(obj, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, counted)
    return calls


async def test_each_reply_finds_its_voice_and_engine_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-shot reply and a streamed reply of three sentences: one lookup of voice and engine each."""
    config = load_config(write_config(tmp_path))
    async with running_server(config) as server:
        resolved = _count(monkeypatch, server.service.catalog, "resolve")
        routed = _count(monkeypatch, server.service.engines, "engine_for")
        async with connect(server) as client:
            await client.write_event(Synthesize(text="One reply.").event())
            one_shot = await collect(client)
            await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="anna")).event())
            for text in ("Erster Satz. ", "Zweiter Satz. ", "Dritter Satz."):
                await client.write_event(SynthesizeChunk(text=text).event())
            await client.write_event(SynthesizeStop().event())
            streamed = await collect(client, until="synthesize-stopped")
    assert not one_shot.errors and not streamed.errors and one_shot.audio and streamed.audio
    assert len(resolved) == 2 and len(routed) == 2


async def test_a_reply_copies_its_audio_to_the_sinks_from_start_to_finish(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    config = load_config(write_config(tmp_path / "cfg", sinks={"wav": {"dir": str(archive)}}))
    async with running_server(config) as server:
        service = server.service
        with pytest.raises(VoiceNotFound):
            service.open_reply("nobody", None, unknown_voice="error")
        assert service.open_reply("nobody", "de-DE").profile.name == "anna"  # the first voice of the language
        reply = service.open_reply("anna", None)
        assert reply.profile.name == "anna" and reply.engine is service.engine
        assert reply.format == service.engine.audio_format
        reply.start()
        pcm = b""
        for text in ("Hello there. ", "   ", "General Kenobi."):
            async for chunk in reply.speak(text):
                assert chunk.format == reply.format
                pcm += chunk.audio
        reply.finish(ok=True)
        audition = service.open_reply("anna", None, sinks=False)  # the studio's kind: no copy for the sinks
        audition.start()
        assert [c async for c in audition.speak("Not archived.")]
        audition.finish(ok=True)
        await service.close_sinks()
    (path,) = archive.glob("*.wav")
    data, rate = soundfile.read(path, dtype="int16")
    assert "-anna" in path.name and rate == reply.format.rate and data.tobytes() == pcm and pcm
