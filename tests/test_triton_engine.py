"""The Triton engine against a REAL Triton Inference Server on the CPU (nvidia-pytriton's tritonserver and Python
backend) serving a model with upstream's CosyVoice contract, through our server and the `wyoming` client."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from wyoming.audio import AudioChunk, AudioStart
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeVoice

from wyoming_cosyvoice.config import load_config
from wyoming_cosyvoice.errors import ConfigError, EngineUnavailable
from wyoming_cosyvoice.plugins import Plugins
from wyoming_cosyvoice.server import build_service

from .cosyvoice_support import dominant_frequency, write_prompt
from .helpers import TIMEOUT, collect, connect, read, running_server, write_config
from .triton_support import MODELS, TritonServer, free_port, unavailable

REASON = unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no Triton server here: {REASON}")

SAMPLES_PER_CHAR = 1200
"""The tone model's audio per character of text (tests/triton_models/tone_model.py)."""
CHUNK = 4800


def tone_server(work: Path, name: str, control: Path, extra_models: bool = False) -> TritonServer:
    server = TritonServer(work, name)
    params = {"control_dir": str(control), "server_name": name, "chunk_samples": str(CHUNK)}
    server.add_model("cosyvoice2", MODELS / "tone_model.py", params)
    models: tuple[str, ...] = ("cosyvoice2",)
    if extra_models:  # the same model deployed for offline use (DECOUPLED_MODE=False): cannot stream
        server.add_model("offline", MODELS / "tone_model.py", params, decoupled=False)
        models += ("offline",)
    return server.start(models=models)


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("control")


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory, control: Path) -> Iterator[TritonServer]:
    server = tone_server(tmp_path_factory.mktemp("triton"), "a", control, extra_models=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def triton_survives(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test leaves the shared server running (a test that crashed it says so, with the server's log)."""
    yield
    if "triton" in request.fixturenames:
        problem = request.getfixturevalue("triton").alive()
        assert not problem, problem


def voices(tmp_path: Path) -> list[dict[str, Any]]:
    """A zero-shot voice at 220 Hz recorded at 48 kHz, a cross-lingual one at 330 Hz (22.05 kHz)."""
    return [
        {
            "name": "alice",
            "reference_audio": str(write_prompt(tmp_path / "alice.wav", pitch=220.0, rate=48000)),
            "mode": "zero_shot",
            "transcript": "Exactly what Alice says.",
        },
        {
            "name": "bob",
            "reference_audio": str(write_prompt(tmp_path / "bob.wav", pitch=330.0, rate=22050)),
            "mode": "cross_lingual",
        },
    ]


def triton_config(tmp_path: Path, endpoints: list[str], profiles: Any = None, **settings: Any) -> Any:
    path = write_config(
        tmp_path / "cfg",
        voices=profiles if profiles is not None else voices(tmp_path),
        engine={"name": "triton", "fallback": None},
        engines={"triton": {"endpoints": endpoints, **settings}},
    )
    return load_config(path)


def record(control: Path, token: str) -> dict[str, Any]:
    return json.loads((control / f"{token}.json").read_text())


async def until(condition: Any, what: str, timeout: float = TIMEOUT) -> None:
    """Poll `condition()` until true (generous deadline: the order of events is tested, not their speed)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def open_gate(control: Path, token: str) -> None:
    (control / f"open-{token}").write_text("open")


async def test_streams_as_triton_sends_exact_length_and_contract(
    tmp_path: Path, triton: TritonServer, control: Path
) -> None:
    config = triton_config(tmp_path, [f"grpc://127.0.0.1:{free_port()}", triton.url])  # a dead endpoint first
    async with running_server(config) as server:
        async with connect(server) as client:
            # The model holds its second response until the test has the first one: a server that waited for
            # the whole reply before sending would never get here.
            text = "id:s1 gate:s1 The quick brown fox jumps over the lazy dog."
            await client.write_event(Synthesize(text=text).event())
            start = AudioStart.from_event(await read(client))
            first = await read(client)
            assert first is not None and AudioChunk.is_type(first.type)
            assert len(first.payload or b"") == CHUNK * 2
            assert not (control / "open-s1").exists()
            open_gate(control, "s1")
            reply = await collect(client)
            assert not reply.errors
            assert start.rate == 24000 and start.width == 2 and start.channels == 1
            samples = len(first.payload or b"") // 2 + len(reply.audio) // 2
            assert samples == SAMPLES_PER_CHAR * len(text)
            assert reply.chunks + 1 == -(-SAMPLES_PER_CHAR * len(text) // CHUNK)

            # Upstream's contract, as the model saw it: batch dimension 1 everywhere, 16 kHz float reference.
            seen = record(control, "s1")
            assert seen["server"] == "a" and seen["target_text"] == text
            assert seen["target_text_shape"] == [1, 1] and seen["reference_text_shape"] == [1, 1]
            assert seen["reference_text"] == "Exactly what Alice says."
            assert seen["reference_wav_dtype"] == "float32"
            assert seen["reference_wav_len"]["shape"] == [1, 1] and seen["reference_wav_len"]["dtype"] == "int32"
            assert seen["reference_wav_shape"] == [1, seen["reference_wav_len"]["value"]]
            assert abs(seen["reference_wav_len"]["value"] - 3 * 16000) <= 160  # 3 s at 48 kHz, sent at 16 kHz
            assert abs(seen["pitch"] - 220.0) < 2

            # Cross-lingual: no transcript; the 22.05 kHz reference arrives at 16 kHz with its pitch.
            await client.write_event(Synthesize(text="id:s2 Hello there.", voice=SynthesizeVoice(name="bob")).event())
            reply = await collect(client)
            assert not reply.errors and len(reply.audio) // 2 == SAMPLES_PER_CHAR * len("id:s2 Hello there.")
            seen = record(control, "s2")
            assert seen["reference_text"] == "" and abs(seen["pitch"] - 330.0) < 2
            assert abs(dominant_frequency(reply.samples(), reply.rate) - 330.0) < 3

            # describe shows each endpoint's state; the dead one is down and was skipped.
            await client.write_event(Describe().event())
            description = Info.from_event(await read(client)).tts[0].description
            assert "engine: triton" in description and "endpoints=1/2 ready" in description
            assert "endpoint1=127.0.0.1:" in description and "down: unreachable: connection refused" in description
            version = server.service.engine.endpoints[1].version
            assert f"endpoint2=127.0.0.1:{triton.port} ready; triton {version}; 0 active; 2 served" in description


async def test_client_that_leaves_cancels_the_triton_request(
    tmp_path: Path, triton: TritonServer, control: Path
) -> None:
    # Cancelling is forced here: this tritonserver (2.51) is one that `auto` does not cancel on (see below); the
    # model is waiting at its gate, not sending, so the cancellation cannot hit that crash.
    config = triton_config(tmp_path, [triton.url], cancel_requests=True)
    async with running_server(config) as server:
        async with connect(server) as client:
            await client.write_event(Synthesize(text="gate:c1 " + "A long sentence nobody hears. " * 5).event())
            await read(client)  # audio-start
            chunk = await read(client)
            assert chunk is not None and AudioChunk.is_type(chunk.type)
        # The client is gone while the model waits to send its second response: Triton must tell the model.
        await until(lambda: (control / "cancelled-c1").exists(), "the model to see the request cancelled")
        assert (control / "cancelled-c1").read_text() == "a before response 1"
        assert not (control / "open-c1").exists()
        await until(lambda: server.service.engine.endpoints[0].outstanding == 0, "the request to end")


async def test_without_cancelling_a_left_request_is_read_to_its_end(
    tmp_path: Path, triton: TritonServer, control: Path
) -> None:
    config = triton_config(tmp_path, [triton.url], cancel_requests=False)  # what `auto` does on Triton < 2.53
    async with running_server(config) as server:
        endpoint = server.service.engine.endpoints[0]
        assert not endpoint.may_cancel
        async with connect(server) as client:
            await client.write_event(Synthesize(text="gate:d1 " + "Nobody hears the rest of this. " * 3).event())
            await read(client)  # audio-start
            assert AudioChunk.is_type((await read(client)).type)
        await until(lambda: endpoint.draining == 1, "the request to be drained")
        open_gate(control, "d1")
        await until(lambda: (control / "done-d1").exists(), "the model to send all its audio")
        await until(lambda: endpoint.draining == 0 and endpoint.outstanding == 0, "the drain to end")
        assert not (control / "cancelled-d1").exists()
        assert f"triton {endpoint.version}; 0 active; 1 served" in server.service.engine.health()["endpoint1"]


async def test_a_drained_request_keeps_its_admission_slot(tmp_path: Path, triton: TritonServer, control: Path) -> None:
    """`cancel_requests: auto` on this Triton 2.51: requests of clients that left run to their end on Triton, and
    each keeps its slot of `server.max_concurrent` meanwhile (they used to run outside it: 30 clients that hung up
    left 30 requests on Triton with max_concurrent 4)."""
    config = triton_config(tmp_path, [triton.url])
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, max_concurrent=2))
    async with running_server(config) as server:
        endpoint, cap = server.service.engine.endpoints[0], server.service.concurrency_limit
        assert endpoint.cancel == "auto" and not endpoint.may_cancel
        for token in ("k1", "k2"):
            async with connect(server) as client:
                await client.write_event(Synthesize(text=f"gate:{token} " + "Nobody hears this. " * 3).event())
                await read(client)  # audio-start
                assert AudioChunk.is_type((await read(client)).type)
        await until(lambda: endpoint.draining == 2, "both requests to be drained")
        assert cap.active == 2
        async with connect(server) as client:
            await client.write_event(Synthesize(text="One more.").event())
            reply = await collect(client)
        assert [e.code for e in reply.errors] == ["ServerBusy"] and not reply.audio
        for token in ("k1", "k2"):
            open_gate(control, token)
        await until(lambda: cap.active == 0 and endpoint.draining == 0, "the drains to end and free the slots")
        async with connect(server) as client:
            await client.write_event(Synthesize(text="One more.").event())
            reply = await collect(client)
        assert not reply.errors and reply.audio


async def test_clients_leaving_mid_stream_do_not_crash_triton(tmp_path: Path, control: Path) -> None:
    """tritonserver 2.51 (nvidia-pytriton 0.7.0) segfaulted here within 5-26 streams cancelled while the model was
    sending; `cancel_requests: auto` drains those streams on Triton < 2.53 instead, and the server survives. The
    drains hold their admission slots: never more than `server.max_concurrent` (4) run at once."""
    old = tone_server(tmp_path / "old", "old", control)
    try:
        config = triton_config(tmp_path, [old.url])
        async with running_server(config) as server:
            endpoint, cap = server.service.engine.endpoints[0], server.service.concurrency_limit
            most = 0
            for n in range(30):
                await until(lambda: cap.active < cap.limit, "a free slot")
                async with connect(server) as client:
                    await client.write_event(Synthesize(text=f"Leave number {n} " * 8).event())
                    await read(client)  # audio-start
                    assert AudioChunk.is_type((await read(client)).type)
                # gone while the model sends the rest
                most = max(most, endpoint.draining)
                assert endpoint.draining <= cap.active <= cap.limit
            await until(lambda: endpoint.draining == 0 and endpoint.outstanding == 0, "the drains to end")
            assert most >= 2  # the drains did overlap
            assert endpoint.state == "ready" and not old.alive(), old.alive()
    finally:
        old.stop()


async def test_model_error_before_audio_is_an_error_event(tmp_path: Path, triton: TritonServer) -> None:
    config = triton_config(tmp_path, [triton.url])
    async with running_server(config) as server:
        async with connect(server) as client:
            await client.write_event(Synthesize(text="fail:f1 Hello.").event())
            reply = await collect(client)
            assert reply.errors and reply.errors[0].code == "EngineError"
            assert "model error: RuntimeError: asked to fail (f1)" in reply.errors[0].text
        async with connect(server) as client:  # the failed request's connection was closed; the server goes on
            await client.write_event(Synthesize(text="Hello again.").event())
            reply = await collect(client)
            assert not reply.errors and len(reply.audio) // 2 == SAMPLES_PER_CHAR * len("Hello again.")


async def test_killing_one_of_two_servers_loses_no_request_without_audio(
    tmp_path: Path, triton: TritonServer, control: Path
) -> None:
    doomed = tone_server(tmp_path / "k", "k", control)
    try:
        # A server that stalls before the first audio: the request is cancelled there and retried on the other.
        config = triton_config(tmp_path / "stall", [doomed.url, triton.url], first_audio_timeout_s=1)
        async with running_server(config) as server:
            async with connect(server) as client:
                text = "id:st1 hold:st1 Stalled."
                await client.write_event(Synthesize(text=text).event())
                await until(lambda: (control / "cancelled-st1").exists(), "the stalled request to be cancelled")
                await until(lambda: record(control, "st1")["server"] == "a", "the retry to reach the other server")
                open_gate(control, "st1")
                reply = await collect(client)
                assert not reply.errors and len(reply.audio) // 2 == SAMPLES_PER_CHAR * len(text)
            stalled = server.service.engine.endpoints[0]
            assert stalled.state == "down" and stalled.problem == "no first audio within 1 s"

        config = triton_config(tmp_path, [doomed.url, triton.url])
        async with running_server(config) as server:
            engine = server.service.engine
            clients = {}
            connections = contextlib.AsyncExitStack()
            # Sent one after the other: each goes to the endpoint with the fewest requests running, so of each
            # kind one lands on each server. hold: no audio before its gate opens; gate: audio started, then waits.
            for kind in ("hold", "gate"):
                for n in (1, 2):
                    token = f"{kind}{n}"
                    client = await connections.enter_async_context(connect(server))
                    clients[token] = client
                    await client.write_event(Synthesize(text=f"id:{token} {kind}:{token} Hello from {token}.").event())
                    await until(lambda t=token: (control / f"{t}.json").exists(), f"{token} to reach Triton")
                    if kind == "gate":
                        assert AudioStart.is_type((await read(client)).type)
                        assert AudioChunk.is_type((await read(client)).type)
            where = {token: record(control, token)["server"] for token in clients}
            assert sorted(where[t] for t in ("hold1", "hold2")) == ["a", "k"], where
            assert sorted(where[t] for t in ("gate1", "gate2")) == ["a", "k"], where
            for token in clients:  # the retries must not find an old record
                (control / f"{token}.json").unlink()

            doomed.kill()
            for token in clients:
                open_gate(control, token)
            for token, client in clients.items():
                text_samples = SAMPLES_PER_CHAR * len(f"id:{token} {token.rstrip('12')}:{token} Hello from {token}.")
                reply = await collect(client)
                if token.startswith("hold"):  # no audio yet when its server died: retried on the other one
                    assert not reply.errors, (token, reply.errors)
                    assert len(reply.audio) // 2 == text_samples
                    if where[token] == "k":  # a second request reached the live server
                        assert record(control, token)["server"] == "a"
                elif where[token] == "k":  # audio had started: the reply ends with an error event
                    assert reply.errors and reply.errors[0].code == "EngineError", token
                    assert "failed after audio had started" in reply.errors[0].text
                else:
                    assert not reply.errors and len(reply.audio) // 2 + CHUNK == text_samples
            await connections.aclose()
            assert engine.endpoints[0].state == "down" and engine.retries >= 1
            # New requests go to the live server.
            async with connect(server) as client:
                await client.write_event(Synthesize(text="After the crash.").event())
                reply = await collect(client)
                assert not reply.errors and len(reply.audio) // 2 == SAMPLES_PER_CHAR * len("After the crash.")
    finally:
        doomed.stop()


async def test_voice_modes_instruct_refused_sft_sends_text_only(
    tmp_path: Path, triton: TritonServer, control: Path
) -> None:
    profiles = [
        {"name": "builtin", "mode": "sft", "speaker": "001"},
        {
            "name": "bossy",
            "mode": "instruct",
            "instruct": "Speak loudly.",
            "reference_audio": str(write_prompt(tmp_path / "b.wav")),
        },
    ]
    config = triton_config(tmp_path, [triton.url], profiles=profiles)
    async with running_server(config) as server:
        problems = server.service.catalog.problems
        assert any("voice 'bossy'" in p and "mode instruct is not served" in p for p in problems), problems
        async with connect(server) as client:
            await client.write_event(Synthesize(text="id:m1 Hi.", voice=SynthesizeVoice(name="builtin")).event())
            reply = await collect(client)
            assert not reply.errors and len(reply.audio) // 2 == SAMPLES_PER_CHAR * len("id:m1 Hi.")
            seen = record(control, "m1")
            assert seen["reference_wav_shape"] is None and seen["reference_text"] is None


async def start_error(tmp_path: Path, endpoints: list[str], **settings: Any) -> str:
    config = triton_config(tmp_path, endpoints, **settings)
    with pytest.raises((ConfigError, EngineUnavailable)) as caught:
        service = await build_service(config, Plugins())
        await service.engines.close()
    message = str(caught.value)
    assert "\n" not in message
    return message


async def test_bad_endpoint_config_is_one_line(tmp_path: Path, triton: TritonServer) -> None:
    message = await start_error(tmp_path, ["http://127.0.0.1:8000"])
    assert "engines.triton.endpoints[0]" in message and "only over gRPC" in message
    message = await start_error(tmp_path, ["grpc://127.0.0.1:8001", "tcp:/x"])
    assert "engines.triton.endpoints[1]: 'tcp:/x' is not grpc://host:port" in message
    assert "at least one Triton endpoint" in await start_error(tmp_path, [])
    assert "listed twice" in await start_error(tmp_path, [triton.url, triton.url])
    port = free_port()
    message = await start_error(tmp_path, [f"grpc://127.0.0.1:{port}"], start_timeout_s=0.3)
    assert message.startswith("triton engine: no endpoint is ready for model 'cosyvoice2'")
    assert f"grpc://127.0.0.1:{port}: unreachable: connection refused" in message
    # Configuration problems a restart of Triton would not fix are reported at once, without waiting.
    started = time.monotonic()
    message = await start_error(tmp_path, [triton.url], model="nope")
    assert "no model 'nope' on this server (models: cosyvoice2, offline)" in message
    message = await start_error(tmp_path, [triton.url], model="offline")
    assert "model 'offline' is not decoupled" in message
    assert time.monotonic() - started < 30


def test_serve_command_speaks_through_triton(tmp_path: Path, triton: TritonServer) -> None:
    """As a user: `wyoming-cosyvoice serve` with engine triton, then `say --out`."""
    config = triton_config(tmp_path, [triton.url])
    port = free_port()
    env = {**os.environ, "WYOMING_COSYVOICE_CACHE": str(tmp_path / "cache")}
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "wyoming_cosyvoice",
            "serve",
            "--config",
            str(config.source),
            "--uri",
            f"tcp://127.0.0.1:{port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        out = tmp_path / "reply.wav"
        deadline = time.monotonic() + 60
        while True:
            said = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "wyoming_cosyvoice",
                    "say",
                    "Hello from Triton.",
                    "--uri",
                    f"tcp://127.0.0.1:{port}",
                    "--out",
                    str(out),
                ],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            )
            if said.returncode == 0 or time.monotonic() > deadline or serve.poll() is not None:
                break
            time.sleep(0.2)
        assert said.returncode == 0, said.stderr
        import soundfile

        audio, rate = soundfile.read(str(out))
        assert rate == 24000 and len(audio) == SAMPLES_PER_CHAR * len("Hello from Triton.")
    finally:
        serve.terminate()
        output = serve.communicate(timeout=30)[0].decode(errors="replace")
    assert "Triton engine: model cosyvoice2 on 1 of 1 endpoints" in output, output


def test_health_command_probes_the_endpoints(tmp_path: Path, triton: TritonServer) -> None:
    dead = free_port()
    config = triton_config(tmp_path, [f"grpc://127.0.0.1:{dead}", triton.url])
    result = subprocess.run(
        [sys.executable, "-m", "wyoming_cosyvoice", "health", "--config", str(config.source)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "triton endpoints: 1/2 ready" in result.stdout
    assert f"triton endpoint1: 127.0.0.1:{dead} down: unreachable: connection refused" in result.stdout
    assert f"triton endpoint2: 127.0.0.1:{triton.port} ready; triton 2." in result.stdout
    assert "triton engine: can start" in result.stdout
