"""Self-check before serving: the loaded model's cached LLM decoding against a full recompute, fp16 against fp32.

Both failures are silent upstream: transformers >= 4.53 changed how the one-column attention mask that
`Qwen2Encoder.forward_one_step` passes along with the KV cache is expanded, so every cached decode step attends to
position 0 only (no error; real weights speak garbage), and fp16 has produced NaN or silent audio on some GPUs. A few
milliseconds on the loaded model catch both. Torch is reached only through upstream's objects and a local import.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Optional

_LOGGER = logging.getLogger(__name__)

CACHE_LIMIT = 1e-3
"""Largest allowed difference, relative to the hidden states' peak, between cached decoding and a full recompute
(a sound decoder stays orders of magnitude below it, a broken mask far above: docs/cosyvoice.md has the figures)."""

FP16_LIMIT = 0.1
"""Largest allowed RMS difference between fp16 and fp32 output, relative to the fp32 output's RMS (the failure this
guards against is NaN or silent output: a difference of 1 or more)."""

TRANSFORMERS_FIX = 'pip install "transformers>=4.51.3,<4.53"'

PREFIX_TOKENS = 12
"""Length of the prompt the cached steps continue (text embeddings, then speech-token embeddings)."""

STEPS = 4
"""Cached decode steps compared with the recompute."""


@dataclass(frozen=True)
class Result:
    """What the self-check found."""

    summary: str
    """For `health` and `describe`: ok (...), n/a (...), off (...) or failed (...)."""

    problem: Optional[str] = None
    """One line naming the library and version and the fix; None when nothing is wrong."""

    fp16: bool = False
    """The problem is fp16's (an automatic fp16 choice is reloaded in fp32 instead of failing)."""


def package_version(name: str) -> str:
    """The installed version of a distribution, or "not installed"."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def mismatch_message(error: float, transformers: str, torch: str) -> str:
    """The one line for a cached-decoding mismatch: what differs, the versions found, the fix."""
    head = (
        f"self-check: upstream's cached LLM decoding differs from a full recompute by {error:.2g} "
        f"(limit {CACHE_LIMIT:g}) with transformers {transformers}, torch {torch}; "
    )
    if transformers == "not installed" or _release(transformers) >= (4, 53):
        return head + f"upstream's Qwen2 decoding needs transformers < 4.53, fix: {TRANSFORMERS_FIX}"
    return head + (
        f"transformers {transformers} is in the range upstream pins, so the checkout or torch differs from what "
        f"was tested (docs/cosyvoice.md); fix: reinstall the pinned set, {TRANSFORMERS_FIX}"
    )


def not_applicable(inner: Any) -> Optional[str]:
    """Why the cached-decoding check does not apply to upstream's model object `inner`, or None when it does."""
    llm = getattr(inner, "llm", None)
    if hasattr(llm, "vllm"):
        return "vLLM decodes, not transformers"
    encoder = getattr(llm, "llm", None)
    if not callable(getattr(encoder, "forward_one_step", None)):
        return "no Qwen2 LLM (CosyVoice 1)" if type(inner).__name__ == "CosyVoiceModel" else "no Qwen2 LLM"
    embed = getattr(getattr(getattr(encoder, "model", None), "model", None), "embed_tokens", None)
    if embed is None or getattr(llm, "speech_embedding", None) is None:
        return "no Qwen2 LLM"
    return None


def _spread(count: int, size: int, seed: int) -> list[int]:
    """`count` deterministic ids spread over [0, size)."""
    return [(seed + 7919 * i) % size for i in range(count)]


def _prompt(llm: Any) -> tuple[Any, list[Any]]:
    """(prefix [1, PREFIX_TOKENS, D], STEPS single-token inputs [1, 1, D]) from the model's own embedding tables."""
    import torch

    embed = llm.llm.model.model.embed_tokens
    speech = llm.speech_embedding.weight
    device = speech.device
    text_ids = torch.tensor([_spread(PREFIX_TOKENS // 2, embed.num_embeddings, 11)], device=device)
    speech_ids = _spread(PREFIX_TOKENS - PREFIX_TOKENS // 2 + STEPS, speech.shape[0], 101)
    prefix = torch.cat([embed(text_ids), speech[speech_ids[: PREFIX_TOKENS - PREFIX_TOKENS // 2]].unsqueeze(0)], 1)
    steps = [speech[i].reshape(1, 1, -1) for i in speech_ids[PREFIX_TOKENS - PREFIX_TOKENS // 2 :]]
    return prefix, steps


def _causal(length: int, device: Any) -> Any:
    import torch

    return torch.tril(torch.ones((1, length, length), device=device)).to(torch.bool)


def cached_decoding_error(llm: Any) -> float:
    """Upstream's decode loop (`Qwen2LM.inference_wrapper`: the prompt, then one token per call with the KV cache and
    a one-column mask) against one `forward_one_step` over the whole sequence: max difference / peak."""
    import torch

    encoder = llm.llm
    prefix, steps = _prompt(llm)
    device = prefix.device
    with torch.inference_mode():
        hidden, cache = encoder.forward_one_step(prefix, masks=_causal(prefix.shape[1], device), cache=None)
        cached = [hidden[:, -1]]
        for step in steps:
            hidden, cache = encoder.forward_one_step(step, masks=_causal(1, device), cache=cache)
            cached.append(hidden[:, -1])
        whole = torch.cat([prefix, *steps], 1)
        hidden, _ = encoder.forward_one_step(whole, masks=_causal(whole.shape[1], device), cache=None)
        full = hidden[0, prefix.shape[1] - 1 :].float()
        got = torch.cat(cached, 0).float()
        if not bool(torch.isfinite(got).all()) or not bool(torch.isfinite(full).all()):
            return float("inf")
        return float((got - full).abs().max() / full.abs().max().clamp_min(1e-6))


def _relative_rms(half: Any, full: Any) -> float:
    import torch

    half, full = half.float(), full.float()
    if not bool(torch.isfinite(half).all()):
        return float("inf")
    return float(torch.linalg.vector_norm(half - full) / torch.linalg.vector_norm(full).clamp_min(1e-6))


def _has_weights(module: Any) -> bool:
    parameters = getattr(module, "parameters", None)
    return callable(parameters) and next(iter(parameters()), None) is not None


def _flow_mel(flow: Any) -> Any:
    """The flow's mel for 30 speech tokens without a prompt (the flow's noise seeded: v1 draws it per call)."""
    import torch

    device = next(flow.parameters()).device
    vocab = int(getattr(flow, "vocab_size", 0) or flow.input_embedding.num_embeddings)
    token = torch.tensor([_spread(30, vocab, 3)], dtype=torch.int32, device=device)
    kwargs: dict[str, Any] = {
        "token": token,
        "token_len": torch.tensor([token.shape[1]], dtype=torch.int32, device=device),
        "prompt_token": torch.zeros((1, 0), dtype=torch.int32, device=device),
        "prompt_token_len": torch.tensor([0], dtype=torch.int32, device=device),
        "prompt_feat": torch.zeros((1, 0, 80), device=device),
        "prompt_feat_len": torch.tensor([0], dtype=torch.int32, device=device),
        "embedding": torch.ones((1, 192), device=device),
    }
    parameters = inspect.signature(flow.inference).parameters
    if "flow_cache" in parameters:  # CosyVoice 1
        kwargs["flow_cache"] = torch.zeros((1, 80, 0, 2), device=device)
    else:
        kwargs.update(streaming=False, finalize=True)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        mel, _ = flow.inference(**kwargs)
    return mel


def fp16_errors(inner: Any, device_type: str, flow: bool = True) -> dict[str, float]:
    """Relative RMS difference of fp16 autocast (as upstream runs with fp16 on) against fp32, for the LLM's hidden
    states (CosyVoice 2/3) and, unless `flow` is False (a TensorRT plan of fixed precision), the flow's mel."""
    import torch

    errors: dict[str, float] = {}

    def both(run: Any) -> tuple[Any, Any]:
        with torch.inference_mode():
            full = run()
            with torch.autocast(device_type, dtype=torch.float16):
                half = run()
        return half, full

    llm: Any = getattr(inner, "llm", None)  # upstream's model, untyped; not None when applicable
    if not_applicable(inner) is None:
        prefix, steps = _prompt(llm)
        whole = torch.cat([prefix, *steps], 1)
        half, full = both(lambda: llm.llm.forward_one_step(whole, masks=_causal(whole.shape[1], whole.device))[0])
        errors["llm"] = _relative_rms(half, full)
    if flow and _has_weights(getattr(inner, "flow", None)) and callable(getattr(inner.flow, "inference", None)):
        half, full = both(lambda: _flow_mel(inner.flow))
        errors["flow"] = _relative_rms(half, full)
    return errors


def run(inner: Any, fp16: bool, trt: bool, device_type: str) -> Result:
    """Check upstream's model object `inner` as loaded (fp16: compare it with fp32 too); never raises for a model
    it cannot inspect (a stand-in, a future upstream): that is `n/a`."""
    started = time.perf_counter()
    parts: list[str] = []
    why = not_applicable(inner)
    try:
        if why is None:
            error = cached_decoding_error(inner.llm)
            parts.append(f"cached decoding max diff {error:.0e}")
            if not error <= CACHE_LIMIT:
                return Result(
                    f"failed (cached decoding max diff {error:.2g})",
                    mismatch_message(error, package_version("transformers"), package_version("torch")),
                )
        if fp16:
            errors = fp16_errors(inner, device_type, flow=not trt)
            if errors:
                parts.append("fp16/fp32 " + ", ".join(f"{k} {v:.0e}" for k, v in errors.items()))
            bad = {k: v for k, v in errors.items() if not v <= FP16_LIMIT}
            if bad:
                where = ", ".join(f"{k} {v:.2g}" for k, v in bad.items())
                return Result(
                    f"failed (fp16 differs from fp32: {where})",
                    f"self-check: fp16 output differs from fp32 ({where}; limit {FP16_LIMIT:g}) with "
                    f"torch {package_version('torch')} on this GPU; fix: set engines.cosyvoice.fp16: false",
                    fp16=True,
                )
    except Exception as err:  # a model this check does not understand must not stop a working engine
        _LOGGER.warning("Self-check could not run on this model (%s: %s); serving without it", type(err).__name__, err)
        return Result(f"n/a (could not run: {type(err).__name__})")
    if not parts:
        return Result(f"n/a ({why})")
    note = f"; {why}" if why else ""
    return Result(f"ok ({'; '.join(parts)}{note}; {(time.perf_counter() - started) * 1000:.0f} ms)")
