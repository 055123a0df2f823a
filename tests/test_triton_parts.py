"""The Triton engine's parts that need no server: settings, the 16 kHz reference, the request contract, and that
the core never imports the Triton client."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wyoming_cosyvoice.audio import resample_clip as resample
from wyoming_cosyvoice.config import Section
from wyoming_cosyvoice.errors import ConfigError, VoiceError
from wyoming_cosyvoice.voices import VoiceProfile
from wyoming_cosyvoice_plugins.triton.references import prepare_voice
from wyoming_cosyvoice_plugins.triton.settings import TritonSettings, parse_endpoint

from .cosyvoice_support import dominant_frequency, write_prompt

ROOT = Path(__file__).resolve().parents[1]


def settings(**data: object) -> TritonSettings:
    return Section("triton", data, "server.yaml", "engines.triton", Path(".")).parse(TritonSettings)


def test_endpoint_urls() -> None:
    assert parse_endpoint("grpc://gpu-1.lan:8001") == "gpu-1.lan:8001"
    assert parse_endpoint("grpc://10.0.0.7") == "10.0.0.7:8001"
    assert parse_endpoint("grpc://[::1]:18001/") == "[::1]:18001"
    for bad, why in [
        ("http://h:8000", "only over gRPC"),
        ("h:8001", "is not grpc://host:port"),
        ("grpc://h:99999", "out of range"),
        ("grpc://h:8001/models", "is not grpc://host:port"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_endpoint(bad)


def test_settings_errors_name_the_key() -> None:
    assert settings(endpoints=["grpc://a:1", "grpc://b:2"]).targets() == [("grpc://a:1", "a:1"), ("grpc://b:2", "b:2")]
    assert settings(endpoints="grpc://a:1").endpoints == ("grpc://a:1",)  # one string is a list of one
    cases = [
        ({}, "server.yaml:engines.triton.endpoints: at least one Triton endpoint is needed"),
        ({"endpoints": ["grpc://a:1", "ftp://b"]}, "server.yaml:engines.triton.endpoints[1]: 'ftp://b' is not grpc"),
        ({"endpoints": ["grpc://a"], "model": "a b"}, "engines.triton.model: 'a b' is not a Triton model name"),
        ({"endpoints": ["grpc://a"], "chunk_timeout_s": 0}, "engines.triton.chunk_timeout_s: must be above 0"),
        ({"endpoints": ["grpc://a"], "timeout": 3}, "engines.triton.timeout: unknown key"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError) as caught:
            settings(**data)
        assert message in str(caught.value) and "\n" not in str(caught.value)


def test_resample_to_16k_keeps_pitch_and_length() -> None:
    for rate in (16000, 22050, 24000, 44100, 48000):
        t = np.arange(rate * 2) / rate
        tone = np.sin(2 * np.pi * 440.0 * t).astype(np.float32)
        # A partial above 8 kHz must not fold back into the band (aliasing).
        high = 0.5 * np.sin(2 * np.pi * 9000.0 * t) if rate > 18000 else 0.0
        out = resample((tone + high).astype(np.float32), rate, 16000)
        assert out.dtype == np.float32 and len(out) == 32000
        assert abs(dominant_frequency(out, 16000) - 440.0) <= 1.0
        spectrum = np.abs(np.fft.rfft(out))
        assert spectrum[np.fft.rfftfreq(len(out), 1 / 16000) > 1000].max() < 0.01 * spectrum.max()


def test_prepared_voice_per_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WYOMING_COSYVOICE_CACHE", str(tmp_path / "cache"))
    wav = write_prompt(tmp_path / "v.wav", pitch=200.0, rate=44100, seconds=2.0)
    voice = prepare_voice(VoiceProfile(name="z", reference_audio=wav, mode="zero_shot", transcript=" Hi. "), "x")
    assert voice.reference_text == "Hi." and voice.reference is not None and voice.reference.dtype == np.float32
    assert abs(voice.seconds - 2.0) < 0.05 and abs(dominant_frequency(voice.reference, 16000) - 200.0) < 1.5
    voice = prepare_voice(VoiceProfile(name="c", reference_audio=wav, mode="cross_lingual", transcript="Hi."), "x")
    assert voice.reference_text == "" and voice.reference is not None
    assert prepare_voice(VoiceProfile(name="s", mode="sft", speaker="001"), "cosyvoice2").reference is None
    with pytest.raises(VoiceError, match="voice 's': mode sft needs upstream.s cosyvoice2 Triton model"):
        prepare_voice(VoiceProfile(name="s", mode="sft", speaker="001"), "cosyvoice3")
    with pytest.raises(VoiceError, match="mode instruct is not served"):
        prepare_voice(VoiceProfile(name="i", reference_audio=wav, mode="instruct", instruct="Whisper."), "x")
    with pytest.raises(VoiceError, match="sample rate 8000 Hz is below"):
        prepare_voice(VoiceProfile(name="low", reference_audio=write_prompt(tmp_path / "l.wav", rate=8000)), "x")


def test_request_follows_upstreams_contract() -> None:
    pytest.importorskip("tritonclient.grpc")
    from tritonclient.grpc import model_config_pb2

    from wyoming_cosyvoice_plugins.triton.contract import ContractError, build_request, check_config

    config = model_config_pb2.ModelConfig(name="cosyvoice2", max_batch_size=16)
    config.model_transaction_policy.decoupled = True
    for name, kind in [("reference_wav", 11), ("reference_wav_len", 8), ("reference_text", 13), ("target_text", 13)]:
        config.input.add(name=name, data_type=kind)  # TYPE_FP32, TYPE_INT32, TYPE_STRING
    config.output.add(name="waveform", data_type=11)
    contract = check_config(config, "cosyvoice2")
    assert contract.batched
    wav = np.linspace(-1, 1, 1600, dtype=np.float32)
    request = build_request("cosyvoice2", contract, "Hello", wav, "Hi", "r1")
    shapes = {t.name: (t.datatype, list(t.shape)) for t in request.inputs}
    assert shapes == {
        "reference_wav": ("FP32", [1, 1600]),
        "reference_wav_len": ("INT32", [1, 1]),
        "reference_text": ("BYTES", [1, 1]),
        "target_text": ("BYTES", [1, 1]),
    }
    assert np.frombuffer(request.raw_input_contents[0], "<f4").tolist() == wav.tolist()
    assert np.frombuffer(request.raw_input_contents[1], "<i4").tolist() == [1600]
    assert request.raw_input_contents[3] == len(b"Hello").to_bytes(4, "little") + b"Hello"
    assert request.parameters["triton_enable_empty_final_response"].bool_param
    assert [t.name for t in build_request("cosyvoice2", contract, "Hi", None, "", "r2").inputs] == ["target_text"]

    config.model_transaction_policy.decoupled = False
    with pytest.raises(ContractError, match="not decoupled"):
        check_config(config, "cosyvoice2")
    config.model_transaction_policy.decoupled = True
    config.input[3].data_type = 11
    with pytest.raises(ContractError, match="input 'target_text' is TYPE_FP32, expected TYPE_STRING"):
        check_config(config, "cosyvoice2")


def test_core_never_imports_the_triton_client() -> None:
    code = (
        "import sys\n"
        "from wyoming_cosyvoice.plugins import Plugins\n"
        "from wyoming_cosyvoice.config import load_config\n"
        "from wyoming_cosyvoice.server import build_service\n"
        "import wyoming_cosyvoice.__main__\n"
        "plugins = Plugins()\n"
        "assert 'triton' in plugins.registry['engines']\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tritonclient', 'grpc'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


async def test_warns_when_upstreams_prompt_cache_would_mix_up_voices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("tritonclient.grpc")
    from wyoming_cosyvoice_plugins.triton.engine import TritonEngine

    monkeypatch.setenv("WYOMING_COSYVOICE_CACHE", str(tmp_path / "cache"))
    one = VoiceProfile(name="one", reference_audio=write_prompt(tmp_path / "1.wav", pitch=150.0))
    two = VoiceProfile(name="two", reference_audio=write_prompt(tmp_path / "2.wav", pitch=250.0))
    three = VoiceProfile(
        name="three", reference_audio=write_prompt(tmp_path / "3.wav"), mode="zero_shot", transcript="Hi."
    )
    engine = TritonEngine(settings(endpoints=["grpc://a"], model="cosyvoice3"))
    await engine.prepare([one, two, three])
    warnings = [r.getMessage() for r in caplog.records if "same reference text" in r.getMessage()]
    assert len(warnings) == 1 and "Voices 'one' and 'two'" in warnings[0] and "cosyvoice3" in warnings[0]
    caplog.clear()
    engine = TritonEngine(settings(endpoints=["grpc://a"]))  # cosyvoice2 computes the prompt per request
    await engine.prepare([one, two])
    assert not [r for r in caplog.records if "same reference text" in r.getMessage()]


def test_cancel_policy_by_triton_version() -> None:
    pytest.importorskip("tritonclient.grpc")
    from wyoming_cosyvoice_plugins.triton.endpoint import Endpoint, parse_version

    assert parse_version("2.51.0") == (2, 51, 0) and parse_version("2.53.0dev") == (2, 53) and parse_version("") == ()
    endpoint = Endpoint("grpc://a:1", "a:1", "cosyvoice2", 1.0, "auto")
    for version, cancels in [("", False), ("2.51.0", False), ("2.52.9", False), ("2.53.0", True), ("2.59.1", True)]:
        endpoint.version = version
        assert endpoint.may_cancel is cancels, version
    assert Endpoint("grpc://a:1", "a:1", "m", 1.0, True).may_cancel
    assert not Endpoint("grpc://a:1", "a:1", "m", 1.0, False).may_cancel
    assert settings(endpoints=["grpc://a"], cancel_requests=True).cancel_requests is True
    with pytest.raises(ConfigError, match="engines.triton.cancel_requests"):
        settings(endpoints=["grpc://a"], cancel_requests="sometimes")
