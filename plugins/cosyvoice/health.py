"""The CosyVoice engine's health facts: state, model, precision, streaming, voices, warm-up, GPU memory."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from wyoming_cosyvoice.gpu import driver_fit_here, gpu_facts, process_memory_mb

from .options import LoadPlan

if TYPE_CHECKING:
    from .engine import CosyVoiceEngine


def facts(engine: CosyVoiceEngine) -> dict[str, Any]:
    """Engine state, model, precision, prepared voices and GPU facts (NVML; cheap)."""
    found: dict[str, Any] = {"engine": engine.name, "state": engine.state, "sample_rate": engine.sample_rate}
    if engine.info is not None:
        found["model"] = f"{engine.info.class_name} ({engine.info.path.name})"
    if engine.plan is not None:
        found["device"] = engine.plan.device
        found["precision"] = "fp16" if engine.plan.fp16 else "fp32"
        found["tensorrt"] = "on" if engine.plan.load_trt else "off"
    if engine.streaming:
        found["streaming"] = engine.streaming
    found["concurrency"] = engine.concurrency_note or str(engine.concurrency)
    found["in_flight"] = engine.in_flight
    found["queued"] = engine.queued
    if engine.scheduling is not None:
        costs = engine.scheduling.costs.per_stream()
        if costs is not None:  # what one stream needs of the model per second of audio (admission weighs it)
            found["stream_cost"] = f"llm {costs[0]:.2f} + flow {costs[1]:.2f} s per s"
        found["batched_flow"] = engine.scheduling.batch_report()
    if engine.text_normalizer:
        found["text_normalizer"] = engine.text_normalizer
    if engine.self_check:
        found["self_check"] = engine.self_check
    found["voices_prepared"] = len(engine.voices.names)
    if engine.voices.errors:
        found["voices_failed"] = ", ".join(sorted(engine.voices.errors))
    found["prompt_cache"] = f"{engine.cache.hits} hits/{engine.cache.misses} computed"
    if engine.warmup_report:
        found["warmup"] = engine.warmup_report
    found.update(engine.lifecycle.facts())
    found.update(_vram(engine.plan))
    gpu = gpu_facts()
    found.update(gpu.as_dict())
    found["cuda_fit"] = driver_fit_here(gpu).line  # the driver vs torch's CUDA build, and what to do if apart
    return found


def _vram(plan: Optional[LoadPlan]) -> dict[str, str]:
    """The GPU memory this process holds (NVML; torch's reserved memory where NVML cannot see this process)."""
    if plan is None or plan.device != "cuda":
        return {}
    held = process_memory_mb()
    if held:
        return {"vram_held": f"{held} MiB"}
    try:
        import torch

        return {"vram_held": f"{int(torch.cuda.memory_reserved()) // 2**20} MiB reserved by torch"}
    except Exception:  # torch without CUDA support compiled in
        return {}
