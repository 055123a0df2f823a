"""CosyVoice engine: load options per GPU (Turing defaults), every one-line error, TensorRT plan keying (no torch)."""

from __future__ import annotations

from pathlib import Path

import pytest

from wyoming_cosyvoice.config import ConfigError, build
from wyoming_cosyvoice.errors import EngineUnavailable
from wyoming_cosyvoice.gpu import gpu_facts
from wyoming_cosyvoice_plugins.cosyvoice import upstream
from wyoming_cosyvoice_plugins.cosyvoice.options import CosyVoiceSettings, plan_load

from .cosyvoice_support import STANDIN_REPO, make_model_dir

TURING = (7, 5)
AMPERE = (8, 6)


@pytest.fixture
def model_v2(tmp_path: Path) -> Path:
    path = make_model_dir(tmp_path / "CosyVoice2-0.5B", 2)
    (path / "flow.decoder.estimator.fp32.onnx").write_bytes(b"onnx")
    return path


def test_turing_defaults_are_fp32_tensorrt(model_v2: Path) -> None:
    plan = plan_load(CosyVoiceSettings(), 2, model_v2, True, TURING, "10.8.0")
    assert (plan.device, plan.fp16, plan.load_trt, plan.load_jit, plan.load_vllm) == ("cuda", False, True, False, False)
    assert plan.fp16_auto
    assert any("fp16 off (auto, compute capability 7.5)" in n for n in plan.notes)
    assert any("fp32 plan" in n for n in plan.notes)


def test_ampere_gets_fp16_automatically(model_v2: Path) -> None:
    plan = plan_load(CosyVoiceSettings(), 2, model_v2, True, AMPERE, "10.8.0")
    assert plan.fp16 and plan.fp16_auto and plan.load_trt


def test_fp16_forced_on_turing_is_noted(model_v2: Path) -> None:
    plan = plan_load(CosyVoiceSettings(fp16=True), 2, model_v2, True, TURING, None)
    assert plan.fp16 and not plan.fp16_auto
    assert any("forced" in n for n in plan.notes)
    assert not plan.load_trt and any("TensorRT not installed" in n for n in plan.notes)


def test_fp16_off_on_ampere_when_asked(model_v2: Path) -> None:
    assert not plan_load(CosyVoiceSettings(fp16=False, load_trt=False), 2, model_v2, True, AMPERE, "10").fp16


def test_cpu_plan_when_gpu_not_required(model_v2: Path) -> None:
    plan = plan_load(CosyVoiceSettings(require_gpu=False, fp16=True, load_trt=True), 2, model_v2, False, None, None)
    assert (plan.device, plan.fp16, plan.load_trt) == ("cpu", False, False)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text.startswith("cosyvoice engine: ")
    return text


@pytest.mark.parametrize(
    "settings, version, cuda, trt, vllm, expected",
    [
        (CosyVoiceSettings(), 2, False, None, None, "no CUDA GPU visible to torch"),
        (CosyVoiceSettings(load_trt=True), 2, True, None, None, "load_trt is true but TensorRT is not installed"),
        (CosyVoiceSettings(load_jit=True), 3, True, None, None, "load_jit is not supported by CosyVoice3"),
        (CosyVoiceSettings(load_jit=True), 2, True, None, None, "flow.encoder.fp32.zip missing"),
        (CosyVoiceSettings(load_vllm=True), 1, True, None, None, "load_vllm needs CosyVoice2 or CosyVoice3"),
        (CosyVoiceSettings(load_vllm=True), 2, True, None, False, "vllm package is not installed"),
    ],
)
def test_option_errors(model_v2: Path, settings, version, cuda, trt, vllm, expected) -> None:
    with pytest.raises(EngineUnavailable) as err:
        plan_load(settings, version, model_v2, cuda, TURING, trt, vllm_installed=vllm)
    assert expected in _one_line(err)


def test_tensorrt_without_onnx(tmp_path: Path) -> None:
    path = make_model_dir(tmp_path / "m", 2)
    with pytest.raises(EngineUnavailable) as err:
        plan_load(CosyVoiceSettings(load_trt=True), 2, path, True, TURING, "10.8.0")
    assert "flow.decoder.estimator.fp32.onnx is missing" in _one_line(err)
    auto = plan_load(CosyVoiceSettings(), 2, path, True, TURING, "10.8.0")
    assert not auto.load_trt and any("no flow.decoder.estimator.fp32.onnx" in n for n in auto.notes)


def test_checkout_errors(tmp_path: Path) -> None:
    cases = [
        (None, "engines.cosyvoice.repo is not set"),
        (tmp_path / "nowhere", "git clone --recursive https://github.com/FunAudioLLM/CosyVoice.git"),
        (tmp_path, "is not a CosyVoice checkout (no cosyvoice/cli/cosyvoice.py)"),
    ]
    for repo, expected in cases:
        with pytest.raises(EngineUnavailable) as err:
            upstream.check_checkout(repo)
        assert expected in _one_line(err)
    (tmp_path / "cosyvoice" / "cli").mkdir(parents=True)
    (tmp_path / "cosyvoice" / "cli" / "cosyvoice.py").write_text("")
    with pytest.raises(EngineUnavailable) as err:
        upstream.check_checkout(tmp_path)
    assert "submodule update --init --recursive" in _one_line(err)
    assert upstream.check_checkout(STANDIN_REPO) == STANDIN_REPO.resolve()


def test_model_dir_errors(tmp_path: Path) -> None:
    for model_dir, expected in [
        (None, "engines.cosyvoice.model_dir is not set"),
        (tmp_path / "missing", "wyoming-cosyvoice download CosyVoice2-0.5B"),
        (tmp_path, "is not a CosyVoice model directory (none of cosyvoice.yaml, cosyvoice2.yaml, cosyvoice3.yaml"),
    ]:
        with pytest.raises(EngineUnavailable) as err:
            upstream.inspect_model_dir(model_dir)
        assert expected in _one_line(err)
    path = make_model_dir(tmp_path / "v3", 3)
    (path / "flow.pt").unlink()
    (path / "speech_tokenizer_v3.onnx").unlink()
    with pytest.raises(EngineUnavailable) as err:
        upstream.inspect_model_dir(path)
    assert "is incomplete: missing flow.pt, speech_tokenizer_v3.onnx" in _one_line(err)


def test_model_dir_identity_and_class(tmp_path: Path) -> None:
    for version, name, rate in ((1, "CosyVoice", 22050), (2, "CosyVoice2", 24000), (3, "CosyVoice3", 24000)):
        info = upstream.inspect_model_dir(make_model_dir(tmp_path / f"v{version}", version))
        assert (info.class_name, info.version, info.sample_rate) == (name, version, rate)
    first = upstream.inspect_model_dir(tmp_path / "v2").identity
    assert upstream.inspect_model_dir(tmp_path / "v2").identity == first
    (tmp_path / "v2" / "llm.pt").write_bytes(b"other weights, other size")
    assert upstream.inspect_model_dir(tmp_path / "v2").identity != first


def test_settings_from_yaml_reject_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server.yaml:engines.cosyvoice.fp16: expected bool or 'auto', got 'yes'"):
        build(CosyVoiceSettings, {"fp16": "yes"}, source="server.yaml", key="engines.cosyvoice")
    with pytest.raises(ConfigError, match="engines.cosyvoice.max_queue: must be at least 0"):
        build(CosyVoiceSettings, {"max_queue": -1}, source="server.yaml", key="engines.cosyvoice")
    with pytest.raises(ConfigError, match="engines.cosyvoice.concurrency: must be auto or at least 1"):
        build(CosyVoiceSettings, {"concurrency": 0}, source="server.yaml", key="engines.cosyvoice")
    with pytest.raises(ConfigError, match="engines.cosyvoice.concurrency: expected int or 'auto', got True"):
        build(CosyVoiceSettings, {"concurrency": True}, source="server.yaml", key="engines.cosyvoice")
    assert build(CosyVoiceSettings, {"concurrency": 3}, source="s").concurrency == 3
    assert build(CosyVoiceSettings, {}, source="s").concurrency == "auto"
    settings = build(CosyVoiceSettings, {"repo": "cv", "model_dir": "models/x"}, source="s", base_dir=tmp_path)
    assert settings.repo == tmp_path / "cv" and settings.model_dir == tmp_path / "models" / "x"


def test_tensorrt_plans_are_keyed(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    cache = tmp_path / "cache"
    turing = upstream.keyed_plan_path(cache, "abc", False, "NVIDIA GeForce RTX 2070", TURING, "10.8.0.43")
    ampere = upstream.keyed_plan_path(cache, "abc", False, "NVIDIA GeForce RTX 3090", AMPERE, "10.8.0.43")
    newer_trt = upstream.keyed_plan_path(cache, "abc", False, "NVIDIA GeForce RTX 2070", TURING, "10.9.0")
    assert len({turing, ampere, newer_trt}) == 3
    assert turing.name == "flow.decoder.estimator.fp32.abc.nvidia-geforce-rtx-2070.sm75.trt10.8.0.43.plan"
    name = upstream.upstream_plan_path(model, False)
    assert name.name == "flow.decoder.estimator.fp32.mygpu.plan"
    # A plan of unknown origin is moved aside; nothing keyed yet, so upstream will build one.
    name.write_bytes(b"old plan")
    assert upstream.link_plan(name, turing) is False
    assert not name.exists() and (model / "flow.decoder.estimator.fp32.mygpu.plan.stale").read_bytes() == b"old plan"
    # Upstream builds the plan under its name; we adopt it into the keyed cache and link it back.
    name.write_bytes(b"turing plan")
    upstream.adopt_plan(name, turing)
    assert turing.read_bytes() == b"turing plan" and name.is_symlink() and name.read_bytes() == b"turing plan"
    # Same GPU next start: linked, no rebuild. Another GPU: the link is dropped so upstream builds a new plan.
    assert upstream.link_plan(name, turing) is True and name.read_bytes() == b"turing plan"
    assert upstream.link_plan(name, ampere) is False and not name.exists() and turing.is_file()


def test_gpu_facts_without_nvml_is_a_normal_state() -> None:
    facts = gpu_facts()
    if facts.available:  # a machine with an NVIDIA GPU and nvidia-ml-py
        assert facts.name and facts.memory_total_mb > 0
    else:
        assert facts.reason and facts.as_dict()["gpu"] == "none"
