"""The self-check before serving (plugins/cosyvoice/selfcheck.py): on the REAL upstream code with the tiny random
CosyVoice2 model it passes on the pinned versions and fires when the LLM's cached decoding is broken the way
transformers >= 4.53 breaks it (the server then falls back, or refuses to start without a fallback); on the
stand-in checkout and CosyVoice 1 it says it does not apply."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import pytest

pytest.importorskip("torch")

from wyoming.info import Describe, Info  # noqa: E402

from wyoming_cosyvoice.config import load_config  # noqa: E402
from wyoming_cosyvoice.errors import EngineUnavailable  # noqa: E402
from wyoming_cosyvoice_plugins.cosyvoice import loader as cosyvoice_loader  # noqa: E402
from wyoming_cosyvoice_plugins.cosyvoice import selfcheck, upstream  # noqa: E402
from wyoming_cosyvoice_plugins.cosyvoice.engine import CosyVoiceEngine  # noqa: E402
from wyoming_cosyvoice_plugins.cosyvoice.options import CosyVoiceSettings, LoadPlan  # noqa: E402

from .cosyvoice_support import forget_cosyvoice  # noqa: E402
from .helpers import connect, read, running_server, write_config  # noqa: E402
from .test_cosyvoice_engine import fresh_import, settings, started  # noqa: E402,F401

# --- stand-in checkout: nothing to check, and it says so ------------------------------------------------------


async def test_standin_and_cosyvoice1_say_not_applicable(tmp_path: Path) -> None:
    engine = await started(settings(tmp_path / "v2"))
    try:
        assert engine.health()["self_check"] == "n/a (no Qwen2 LLM)"
    finally:
        await engine.close()
    engine = await started(settings(tmp_path / "v1", version=1))
    try:
        assert engine.health()["self_check"] == "n/a (no Qwen2 LLM (CosyVoice 1))"
    finally:
        await engine.close()
    engine = await started(settings(tmp_path / "off", self_check=False))
    try:
        assert engine.health()["self_check"] == "off (engines.cosyvoice.self_check: false)"
    finally:
        await engine.close()


# --- the real upstream code -----------------------------------------------------------------------------------


@pytest.fixture
def real(cosyvoice_repo: Path, tiny_cosyvoice2: Path) -> Any:
    """Upstream's modules, imported fresh from the real checkout by the engine's own importer."""
    forget_cosyvoice()
    upstream.import_cosyvoice(cosyvoice_repo)
    from cosyvoice.llm import llm

    yield llm
    forget_cosyvoice()


def attends_to_position_0_only(original: Callable[..., Any]) -> Callable[..., Any]:
    """Upstream's Qwen2Encoder.forward_one_step as transformers >= 4.53 runs it: the one-column attention mask passed
    with the KV cache is expanded so that every cached decode step attends to position 0 only."""

    def forward_one_step(self: Any, xs: Any, masks: Any, cache: Any = None) -> Any:
        if cache is None:
            return original(self, xs, masks, cache)
        import torch

        mask = torch.zeros((1, cache.get_seq_length() + xs.shape[1]), dtype=torch.long, device=xs.device)
        mask[0, 0] = 1
        outs = self.model(
            inputs_embeds=xs,
            attention_mask=mask,
            output_hidden_states=True,
            return_dict=True,
            use_cache=True,
            past_key_values=cache,
        )
        return outs.hidden_states[-1], outs.past_key_values

    return forward_one_step


def real_settings(tmp_path: Path, model_dir: Path, repo: Path, **overrides: Any) -> dict[str, Any]:
    return {
        "repo": str(repo),
        "model_dir": str(model_dir),
        "cache_dir": str(tmp_path / "cache"),
        "require_gpu": False,
        **overrides,
    }


async def describe(server: Any) -> str:
    async with connect(server) as client:
        await client.write_event(Describe().event())
        return Info.from_event(await read(client, 60)).tts[0].description


async def test_passes_on_the_pinned_versions_and_shows_in_describe(
    tmp_path: Path, cosyvoice_repo: Path, tiny_cosyvoice2: Path, real: Any
) -> None:
    repo, model_dir = cosyvoice_repo, tiny_cosyvoice2
    path = write_config(
        tmp_path / "cfg",
        engine={"name": "cosyvoice", "fallback": None},
        engines={"cosyvoice": real_settings(tmp_path, model_dir, repo)},
    )
    async with running_server(load_config(path)) as server:
        description = await describe(server)
    found = re.search(r"self_check=ok \(cached decoding max diff ([0-9.e+-]+)", description)
    assert found, description
    assert float(found.group(1)) <= selfcheck.CACHE_LIMIT / 100, "a correct cache matches to float precision"


async def test_a_broken_attention_mask_falls_back_or_refuses(
    tmp_path: Path, cosyvoice_repo: Path, tiny_cosyvoice2: Path, real: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, model_dir = cosyvoice_repo, tiny_cosyvoice2
    encoder = real.Qwen2Encoder
    monkeypatch.setattr(encoder, "forward_one_step", attends_to_position_0_only(encoder.forward_one_step))
    section = real_settings(tmp_path, model_dir, repo)
    path = write_config(
        tmp_path / "fallback", engine={"name": "cosyvoice", "fallback": "espeak"}, engines={"cosyvoice": section}
    )
    async with running_server(load_config(path)) as server:
        description = await describe(server)
    assert "engine: espeak" in description and "fallback from cosyvoice" in description, description
    assert "self-check: upstream's cached LLM decoding differs from a full recompute" in description
    assert 'pip install "transformers>=4.51.3,<4.53"' in description and "transformers 4." in description

    path = write_config(
        tmp_path / "strict", engine={"name": "cosyvoice", "fallback": None}, engines={"cosyvoice": section}
    )
    with pytest.raises(EngineUnavailable, match="self-check: upstream's cached LLM decoding differs") as caught:
        async with running_server(load_config(path)):
            pass
    assert "\n" not in str(caught.value)


def test_the_message_names_the_version_found_and_the_fix() -> None:
    line = selfcheck.mismatch_message(0.094, "4.57.6", "2.13.0")
    assert "transformers 4.57.6" in line and "needs transformers < 4.53" in line
    assert line.endswith('fix: pip install "transformers>=4.51.3,<4.53"')
    line = selfcheck.mismatch_message(0.094, "4.51.3", "2.13.0")
    assert "transformers 4.51.3 is in the range upstream pins" in line and "torch 2.13.0" in line


async def test_fp16_is_compared_with_fp32_on_the_real_model(
    tmp_path: Path, cosyvoice_repo: Path, tiny_cosyvoice2: Path, real: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp16 needs a GPU to run as upstream runs it; here the same comparison runs under the CPU's fp16 autocast, on a
    load plan that says fp16 (as on an Ampere GPU). An estimator that overflows in fp16 (as reported on some GPUs)
    makes automatic fp16 reload in fp32, and forced fp16 refuse with the fix."""
    repo, model_dir = cosyvoice_repo, tiny_cosyvoice2
    real_plan = cosyvoice_loader.plan_load
    auto = {"fp16": True}

    def gpu_plan(*args: Any, **kwargs: Any) -> LoadPlan:
        plan = real_plan(*args, **kwargs)
        return LoadPlan(plan.device, True, auto["fp16"], False, False, False, ("pretend fp16 GPU",))

    monkeypatch.setattr(cosyvoice_loader, "plan_load", gpu_plan)
    cfg = CosyVoiceSettings(**real_settings(tmp_path, model_dir, repo))  # type: ignore[arg-type]
    engine = CosyVoiceEngine(cfg)
    await engine.start()
    try:
        summary = engine.health()["self_check"]
        assert summary.startswith("ok (cached decoding max diff") and "fp16/fp32 llm" in summary, summary
        errors = selfcheck.fp16_errors(engine.model.model, "cpu")
        assert set(errors) == {"llm", "flow"} and max(errors.values()) <= selfcheck.FP16_LIMIT, errors
    finally:
        await engine.close()

    import torch
    from cosyvoice.flow import decoder

    forward = decoder.CausalConditionalDecoder.forward

    def overflowing(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = forward(self, *args, **kwargs)
        return out * float("inf") if torch.is_autocast_enabled("cpu") else out

    monkeypatch.setattr(decoder.CausalConditionalDecoder, "forward", overflowing)
    engine = CosyVoiceEngine(cfg)
    await engine.start()
    try:
        health = engine.health()
        assert health["precision"] == "fp32" and health["self_check"].startswith("ok (cached decoding"), health
    finally:
        await engine.close()
    auto["fp16"] = False
    engine = CosyVoiceEngine(cfg)
    try:
        with pytest.raises(EngineUnavailable, match=r"fp16 output differs from fp32 \(flow inf.*fp16: false"):
            await engine.start()
    finally:
        await engine.close()
