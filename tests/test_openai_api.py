"""The OpenAI-compatible speech API (/v1) over real HTTP, driven by the real `openai` client."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiohttp", reason="the web port needs the web extra (pip install -e '.[web]')")
openai = pytest.importorskip("openai", reason="the API tests drive the real openai client (test extra)")

import soundfile  # noqa: E402
from aiohttp import ClientSession  # noqa: E402
from wyoming.tts import Synthesize, SynthesizeVoice  # noqa: E402

from wyoming_cosyvoice.config import OpenAISettings  # noqa: E402
from wyoming_cosyvoice.web.encoders import FORMATS  # noqa: E402

from .helpers import TIMEOUT, collect, connect  # noqa: E402
from .openai_support import ApiServer, api_server  # noqa: E402
from .studio_support import wait_for  # noqa: E402

TEXT = "Hello there. How are you today, my friend?"
GATE_SAMPLES = 6400 * 24000 // 16000
"""What the gate engine makes for one piece of text (6400 samples at 16 kHz), at the API's 24 kHz."""


async def _speak(srv: ApiServer, **fields: Any) -> tuple[Any, bytes]:
    """(headers, body) of one streamed speech request through the real client."""
    request = {"model": "tts-1", "voice": "tars", "input": TEXT, **fields}
    async with srv.client() as client, client.audio.speech.with_streaming_response.create(**request) as response:
        body = b"".join([chunk async for chunk in response.iter_bytes()])
        return response.headers, body


async def _wyoming_samples(srv: ApiServer, text: str, voice: str = "tars") -> int:
    """How many samples Wyoming gives for `text`, at 24 kHz."""
    async with connect(srv.server) as client:
        await client.write_event(Synthesize(text=text, voice=SynthesizeVoice(name=voice)).event())
        reply = await collect(client)
    return round(len(reply.audio) / 2 * 24000 / reply.rate)


def _decoded_samples(name: str, body: bytes) -> int:
    if name == "pcm":
        return len(body) // 2
    audio, rate = soundfile.read(io.BytesIO(body), dtype="int16")
    assert rate == 24000, f"{name} at {rate} Hz"
    return len(audio)


async def test_every_format_streams_and_decodes_to_the_length_wyoming_gives(tmp_path: Path) -> None:
    async with api_server(tmp_path) as srv:
        expected = await _wyoming_samples(srv, TEXT)
        for name in ("pcm", "wav", "mp3", "opus", "flac"):
            assert name in FORMATS, f"{name} unavailable in this libsndfile"
            headers, body = await _speak(srv, response_format=name)
            assert headers["content-type"].startswith(FORMATS[name].content_type.split(";")[0])
            assert headers["x-voice"] == "tars"
            samples = _decoded_samples(name, body)
            # MP3 adds its encoder's delay and padding (no Info tag in a stream says how much).
            slack = 2400 if name == "mp3" else 48
            assert abs(samples - expected) <= slack, f"{name}: {samples} samples, Wyoming gave {expected}"


async def test_aac_and_unknown_formats_are_a_400_naming_the_available_ones(tmp_path: Path) -> None:
    async with api_server(tmp_path) as srv:
        for name in ("aac", "ogg"):
            with pytest.raises(openai.BadRequestError) as caught:
                await _speak(srv, response_format=name)
            error = caught.value.body
            assert caught.value.status_code == 400 and error["param"] == "response_format"
            assert "available: pcm, wav, mp3, opus, flac" in error["message"], error


async def test_chunks_leave_before_the_reply_is_synthesized_and_the_same_reply_path_is_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    archive = tmp_path / "archive"
    caplog.set_level(logging.INFO)
    async with api_server(tmp_path, engine="gate", sections={"sinks": {"wav": {"dir": str(archive)}}}) as srv:
        gate = srv.gate
        request = {"model": "tts-1", "voice": "tars", "input": "One sentence only", "response_format": "pcm"}
        async with srv.client() as client, client.audio.speech.with_streaming_response.create(**request) as response:
            chunks = response.iter_bytes()
            first = await asyncio.wait_for(chunks.__anext__(), TIMEOUT)
            assert first and gate.outcomes == [], "audio arrived while the engine was still held at its gate"
            gate.gate.set()
            rest = b"".join([chunk async for chunk in chunks])
        assert (len(first) + len(rest)) // 2 == pytest.approx(GATE_SAMPLES, abs=4)
        assert gate.outcomes == ["done"]
        await srv.server.service.close_sinks()
        copies = list(archive.glob("*.wav"))
        assert len(copies) == 1, "the sinks got their copy of the reply"
        assert soundfile.info(str(copies[0])).frames == 6400
    lines = [r.message for r in caplog.records if r.name == "wyoming_cosyvoice.service"]
    assert any("voice=tars chars=17" in line and "end=done" in line for line in lines), "the request log line"


async def test_input_is_spoken_piece_by_piece_as_a_wyoming_stream_cuts_it(tmp_path: Path) -> None:
    async with api_server(tmp_path, engine="gate") as srv:
        srv.gate.gate.set()
        text = "Well then, as I was saying to you, it works. It does. Yes"
        _, body = await _speak(srv, input=text, response_format="pcm")
        # first clause (5+ words up to the comma), then two sentences and the tail: four pieces, four requests
        assert len(body) // 2 == pytest.approx(4 * GATE_SAMPLES, abs=16)
        assert srv.gate.outcomes == ["done"] * 4


async def test_a_client_that_leaves_mid_stream_stops_the_synthesis(tmp_path: Path) -> None:
    async with api_server(tmp_path, engine="gate") as srv:
        request = {"model": "tts-1", "voice": "tars", "input": "Stop me. Never said.", "response_format": "mp3"}
        async with srv.client() as client, client.audio.speech.with_streaming_response.create(**request) as response:
            assert response.status_code == 200
            await wait_for(lambda: srv.server.service.concurrency_limit.active == 1, what="synthesis running")
        # the client closed the stream without reading it to the end
        await wait_for(lambda: srv.gate.outcomes == ["cancelled"], what="the engine to be cancelled")
        await wait_for(lambda: srv.server.service.concurrency_limit.active == 0, what="the admission slot to be freed")
        assert srv.gate.outcomes == ["cancelled"], "the second sentence was never started"


async def test_sse_sends_base64_deltas_then_done(tmp_path: Path) -> None:
    async with api_server(tmp_path, engine="gate") as srv:
        srv.gate.gate.set()
        headers, body = await _speak(srv, input="One sentence only", response_format="pcm", stream_format="sse")
        assert headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in body.decode().split("\n\n") if line.startswith("data: ")]
        assert {e["type"] for e in events[:-1]} == {"speech.audio.delta"}
        assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["input_tokens"] == 17
        pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
        assert len(pcm) // 2 == pytest.approx(GATE_SAMPLES, abs=4)


async def test_keys_are_checked_before_the_body_and_errors_have_openai_shape(tmp_path: Path) -> None:
    settings = OpenAISettings(api_keys=("sk-second-key",))
    async with api_server(tmp_path, token="studio-token-1", openai_settings=settings) as srv:
        for wrong in ("sk-wrong", "studio-token-"):
            with pytest.raises(openai.AuthenticationError) as caught:
                await _speak_with(srv, wrong)
            assert caught.value.status_code == 401
            assert set(caught.value.body) == {"message", "type", "param", "code"}
            assert caught.value.body["code"] == "invalid_api_key"
        for right in ("studio-token-1", "sk-second-key"):
            headers, body = await _speak_with(srv, right, response_format="wav")
            assert headers["content-type"] == "audio/wav" and len(body) > 10000
        async with ClientSession() as http:  # no key at all, and a body that is never read
            async with http.post(srv.base_url + "/audio/speech", data=b"x" * 10_000_000) as response:
                assert response.status == 401 and (await response.json())["error"]["code"] == "invalid_api_key"
            async with http.get(srv.base_url + "/audio/voices") as response:  # as Open WebUI reads it: no key
                assert response.status == 200 and (await response.json())["voices"][0]["id"] == "tars"


async def _speak_with(srv: ApiServer, key: str, **fields: Any) -> tuple[Any, bytes]:
    request = {"model": "tts-1", "voice": "tars", "input": TEXT, **fields}
    async with srv.client(key) as client, client.audio.speech.with_streaming_response.create(**request) as response:
        return response.headers, b"".join([chunk async for chunk in response.iter_bytes()])


async def test_no_key_configured_is_open_on_loopback_only(tmp_path: Path) -> None:
    async with api_server(tmp_path / "open") as srv:
        async with srv.client() as client:
            models = await client.models.list()
        assert "tts-1" in [m.id for m in models.data]
        await _speak(srv, response_format="pcm")
    async with api_server(tmp_path / "lan", host="0.0.0.0") as srv:
        with pytest.raises(openai.AuthenticationError) as caught:
            await _speak(srv, response_format="pcm")
        assert "web.openai.api_keys" in caught.value.body["message"]


async def test_voices_unknown_builtin_and_aliased(tmp_path: Path) -> None:
    settings = OpenAISettings(voices={"nova": "anna"})
    async with api_server(tmp_path, engine="gate", openai_settings=settings) as srv:
        srv.gate.gate.set()
        headers, _ = await _speak(srv, voice="nobody", response_format="pcm")
        assert headers["x-voice"] == "tars", "an unknown voice is spoken by the default voice (never silent)"
        headers, _ = await _speak(srv, voice="alloy", response_format="pcm")
        assert headers["x-voice"] == "tars", "OpenAI's built-in names without an alias get the default voice"
        headers, _ = await _speak(srv, voice="nova", response_format="pcm")
        assert headers["x-voice"] == "anna"
        headers, _ = await _speak(srv, voice="anna", response_format="pcm", instructions="whisper")
        assert headers["x-voice"] == "anna" and headers["x-instructions"].startswith("ignored")
        async with ClientSession() as http:
            async with http.get(srv.base_url + "/audio/voices") as response:
                listing = await response.json()
        assert [v["id"] for v in listing["voices"]] == ["tars", "anna"] and listing["aliases"] == {"nova": "anna"}
        assert [v["default"] for v in listing["voices"]] == [True, False]


async def test_an_unknown_voice_is_a_404_when_the_server_refuses_them(tmp_path: Path) -> None:
    async with api_server(tmp_path, engine="gate", server={"unknown_voice": "error"}) as srv:
        srv.gate.gate.set()
        with pytest.raises(openai.NotFoundError) as caught:
            await _speak(srv, voice="nobody")
        assert caught.value.body["code"] == "voice_not_found" and caught.value.body["param"] == "voice"
        headers, _ = await _speak(srv, voice="alloy", response_format="pcm")
        assert headers["x-voice"] == "tars", "OpenAI's built-in names still get the default voice"


async def test_bad_requests_are_refused_with_the_field_named(tmp_path: Path) -> None:
    async with api_server(tmp_path, server={}, sections={"limits": {"max_text_chars": 100}}) as srv:
        cases: list[tuple[dict[str, Any], int, str]] = [
            ({"input": "x" * 101}, 413, "input"),
            ({"input": "   "}, 400, "input"),
            ({"model": "gpt-5"}, 400, "model"),
            ({"speed": 4.5}, 400, "speed"),
            ({"stream_format": "ws"}, 400, "stream_format"),
        ]
        for fields, status, param in cases:
            with pytest.raises(openai.APIStatusError) as caught:
                await _speak(srv, **fields)
            assert caught.value.status_code == status and caught.value.body["param"] == param, (fields, caught.value)
        async with ClientSession() as http:
            async with http.post(srv.base_url + "/audio/speech", data=b"{" + b" " * 2_000_000) as response:
                assert response.status == 413 and (await response.json())["error"]["code"] == "request_too_large"
            nan = b'{"model": "tts-1", "input": "Hi.", "voice": "tars", "speed": NaN}'  # Python's json reads NaN
            async with http.post(srv.base_url + "/audio/speech", data=nan) as response:
                assert response.status == 400 and (await response.json())["error"]["param"] == "speed"
            async with http.post(srv.base_url + "/audio/speech", data=b"not json") as response:
                assert response.status == 400 and (await response.json())["error"]["code"] == "invalid_json"
            async with http.get(srv.base_url + "/audio/nothing") as response:
                assert response.status == 404 and "error" in await response.json()


async def test_busy_is_a_429(tmp_path: Path) -> None:
    async with api_server(tmp_path, engine="gate", server={"max_concurrent": 1}) as srv:
        request = {"model": "tts-1", "voice": "tars", "input": "Hold on.", "response_format": "pcm"}
        async with srv.client() as client, client.audio.speech.with_streaming_response.create(**request) as held:
            with pytest.raises(openai.RateLimitError) as caught:
                await _speak(srv)
            assert caught.value.body["code"] == "server_busy"
            srv.gate.gate.set()
            assert len(await held.read()) // 2 == pytest.approx(GATE_SAMPLES, abs=4)


async def test_fifty_clients_through_http_and_wyoming_together_lose_nothing(tmp_path: Path) -> None:
    async with api_server(tmp_path, engine="gate", server={"max_concurrent": 64}) as srv:
        srv.gate.gate.set()

        async def http(i: int) -> int:
            _, body = await _speak(srv, input=f"Request number {i}", response_format="pcm")
            return len(body) // 2

        async def wyoming(i: int) -> int:
            return await _wyoming_samples(srv, f"Request number {i}")

        results = await asyncio.wait_for(
            asyncio.gather(*(http(i) if i % 2 else wyoming(i) for i in range(50))), TIMEOUT * 3
        )
        assert all(abs(n - GATE_SAMPLES) <= 4 for n in results), results
        assert srv.gate.outcomes == ["done"] * 50 and srv.server.service.concurrency_limit.active == 0


async def test_models_lists_openai_names_and_the_engine(tmp_path: Path) -> None:
    async with api_server(tmp_path, engine="gate") as srv:
        async with srv.client() as client:
            names = [m.id for m in (await client.models.list()).data]
        async with ClientSession() as http:
            async with http.get(srv.base_url + "/audio/models") as response:
                listed = [m["id"] for m in (await response.json())["models"]]
    assert names == ["tts-1", "tts-1-hd", "gpt-4o-mini-tts", "wyoming-cosyvoice", "gate"] and listed == names


def test_the_openai_section_is_checked_with_its_key_path(tmp_path: Path) -> None:
    from wyoming_cosyvoice.config import Config, build
    from wyoming_cosyvoice.errors import ConfigError

    for section, problem in (
        ({"api_keys": ["short"]}, "web.openai.api_keys[0]: must have at least 8 characters"),
        ({"voices": {"alloy": 3}}, "web.openai.voices.alloy: expected a string"),
        ({"keys": []}, "web.openai.keys: unknown key"),
    ):
        with pytest.raises(ConfigError, match=problem.replace("[", r"\[").replace("]", r"\]")):
            build(Config, {"web": {"openai": section}}, source="server.yaml")
    config = build(Config, {"web": {"studio": False, "openai": {"voices": {"alloy": "tars"}}}}, source="s")
    assert config.web.studio is False and config.web.openai.voices == {"alloy": "tars"}


async def test_without_the_studio_the_port_serves_only_the_api(tmp_path: Path) -> None:
    async with api_server(tmp_path, engine="gate", studio=False) as srv, ClientSession() as http:
        base = srv.base_url.removesuffix("/v1")
        for path in ("/", "/api/status", "/api/voices"):
            async with http.get(base + path) as response:
                assert response.status == 404, path
        srv.gate.gate.set()
        headers, body = await _speak(srv, input="Only the API.", response_format="pcm")
        assert headers["x-voice"] == "tars" and len(body) // 2 == pytest.approx(GATE_SAMPLES, abs=4)


async def test_an_engine_failing_mid_stream_cuts_the_transfer_and_sse_says_why(tmp_path: Path) -> None:
    async with api_server(tmp_path, engine="fault") as srv:
        with pytest.raises(Exception) as broken:  # no end-of-stream marker: a broken reply, not a short one
            await _speak(srv, input="RAISE after the first chunk", response_format="pcm")
        assert type(broken.value).__name__ == "RemoteProtocolError", broken.value  # httpx's (its module name varies)
        headers, body = await _speak(
            srv, input="RAISE after the first chunk", response_format="pcm", stream_format="sse"
        )
        events = [json.loads(line[6:]) for line in body.decode().split("\n\n") if line.startswith("data: ")]
        assert events[0]["type"] == "speech.audio.delta" and events[-1]["type"] == "error", events[-1]
        assert events[-1]["error"]["code"] == "EngineError"
        with pytest.raises(openai.InternalServerError) as caught:  # before any audio: a JSON answer
            await _speak(srv, input="OOM at once", response_format="pcm")
        assert caught.value.body["type"] == "server_error" and "traceback" not in str(caught.value.body).lower()
        _, body = await _speak(srv, input="Still serving", response_format="pcm")
        assert len(body) > 0, "one failed reply does not hurt the next"
