"""`engines.cosyvoice` settings and how they become upstream load options on a given GPU (pure, no torch)."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

from wyoming_cosyvoice.errors import EngineUnavailable
from wyoming_cosyvoice.gpu import driver_fit_here

PREFIX = "cosyvoice engine: "

FP16_MIN_CAPABILITY = (8, 0)
"""fp16 has produced NaN/silent audio on older cards; Ampere (8.0) and newer get it by default."""


@dataclass(frozen=True)
class CosyVoiceSettings:
    """`engines.cosyvoice` settings."""

    repo: Optional[Path] = None
    """CosyVoice checkout (git clone --recursive https://github.com/FunAudioLLM/CosyVoice)."""

    model_dir: Optional[Path] = None
    """Model directory (CosyVoice2-0.5B, Fun-CosyVoice3-0.5B, CosyVoice-300M...); the class is chosen by its yaml."""

    fp16: Union[bool, Literal["auto"]] = "auto"
    """Half precision: auto = only on compute capability >= 8.0; true forces it (warm-up checks the output)."""

    load_trt: Union[bool, Literal["auto"]] = "auto"
    """TensorRT flow decoder: auto = when TensorRT and flow.decoder.estimator.fp32.onnx are present; true requires
    them."""

    load_jit: bool = False
    """TorchScript parts (CosyVoice 1/2 only; needs the *.zip files in the model directory)."""

    load_vllm: bool = False
    """vLLM for the language model (CosyVoice 2/3; needs the vllm package)."""

    trt_concurrent: int = 1
    """TensorRT execution contexts: this many flow + vocoder passes of concurrent requests may run at once."""

    concurrency: Union[int, Literal["auto"]] = "auto"
    """Requests in flight at once on the one loaded model (CosyVoice 2/3; CosyVoice 1 streams with upstream's loop
    and runs 1): auto = from the GPU's free memory after loading (1 to 8), 1 on the CPU."""

    batch_flow: bool = True
    """CosyVoice 2/3: run the flow-matching decoders of passes that are ready together (several requests in flight)
    as one batched call (PyTorch flow only: off with TensorRT); false runs every pass alone."""

    max_flow_batch: Union[int, Literal["auto"]] = "auto"
    """The most passes in one batch: auto = `concurrency` (at most AUTO_MAX_FLOW_BATCH)."""

    keep_real_time: bool = True
    """Refuse a new request (ServerBusy) while the measured costs say the streams in flight plus it could not all
    stay ahead of real time; false: admit up to `concurrency` and let them share the machine."""

    cache_dir: Optional[Path] = None
    """Prepared voices and TensorRT plans (default: $WYOMING_COSYVOICE_CACHE, else ~/.cache/wyoming-cosyvoice)."""

    stream: bool = True
    """Stream chunks as the model makes them (a voice with speed != 1.0 is synthesized whole: upstream limitation)."""

    early_first_chunk: bool = True
    """CosyVoice 2/3: end the first chunk early (at the prompt's padding, >= 10 tokens) when the model (this
    request's LLM rate, the measured flow + vocoder cost) is fast enough for every next chunk to arrive before the
    audio sent until then has played; false = upstream's first chunk size."""

    max_queue: int = 4
    """Requests waiting for a free slot when `concurrency` requests are in flight; more are refused (ServerBusy)."""

    require_gpu: bool = True
    """Refuse to start without CUDA (false: run on the CPU, very slow; for tests and trials)."""

    self_check: bool = True
    """At load, compare upstream's cached LLM decoding with a full recompute (and fp16 with fp32 when fp16 is on);
    a mismatch stops the engine (fallback rule). false skips it (timing runs with random weights only)."""

    warmup_text: str = "Hello, this is a warm-up."
    """Text synthesized once at startup (checks the output is finite, primes kernels and plans)."""

    keep_alive: float = -1
    """Seconds without a request (and no reply open) before the model is parked to free the GPU for other programs;
    -1 never, 0 after every reply. A request, or a reply opening (`synthesize-start`), wakes it (docs/cosyvoice.md)."""

    park: Literal["host", "unload"] = "host"
    """How the model parks: host = weights copied to (pinned) host memory, waking copies them back; unload = the model
    is dropped (memory released), waking reloads it from disk; prepared voices stay prepared either way."""

    def validate(self) -> Optional[tuple[str, str]]:
        """Check ranges."""
        if self.trt_concurrent < 1:
            return ("trt_concurrent", "must be at least 1")
        if self.max_queue < 0:
            return ("max_queue", "must be at least 0")
        if self.concurrency != "auto" and self.concurrency < 1:
            return ("concurrency", "must be auto or at least 1")
        if not math.isfinite(self.keep_alive) or (self.keep_alive < 0 and self.keep_alive != -1):
            return ("keep_alive", "must be -1 (never park), 0 (after every reply) or seconds")
        if self.max_flow_batch != "auto" and self.max_flow_batch < 1:
            return ("max_flow_batch", "must be auto or at least 1")
        return None

    def flow_batch_limit(self) -> int:
        """The batch bound before the concurrency is known (the engine lowers it to the concurrency then)."""
        if not self.batch_flow:
            return 1
        return AUTO_MAX_FLOW_BATCH if self.max_flow_batch == "auto" else int(self.max_flow_batch)


AUTO_MAX_FLOW_BATCH = 8
"""The most passes `max_flow_batch: auto` runs in one batch (it is lowered to `concurrency`)."""

AUTO_MAX_CONCURRENCY = 8
"""The most requests `concurrency: auto` puts in flight (the flow + vocoder is shared: more rarely pays)."""

STREAM_MEMORY_GIB = 0.5
"""GPU memory one more stream in flight may take (its LLM's KV cache and activations; an estimate with margin)."""

RESERVED_MEMORY_GIB = 2.0
"""GPU memory kept free for one flow + vocoder pass over a long reply and the allocator's slack."""


def auto_concurrency(device: str, free_bytes: Optional[int]) -> tuple[int, str]:
    """`concurrency: auto`: (requests in flight, why) from the GPU memory free after loading; 1 on the CPU."""
    if device != "cuda" or free_bytes is None:
        return 1, "auto: 1 on the CPU"
    free = free_bytes / 2**30
    n = max(1, min(AUTO_MAX_CONCURRENCY, int((free - RESERVED_MEMORY_GIB) // STREAM_MEMORY_GIB)))
    return n, f"auto: {free:.1f} GiB free after loading"


@dataclass(frozen=True)
class LoadPlan:
    """The options the model is constructed with, and why."""

    device: str
    """cuda or cpu."""

    fp16: bool
    """Half precision."""

    fp16_auto: bool
    """fp16 was chosen automatically (a non-finite warm-up then reloads in fp32 instead of failing)."""

    load_trt: bool
    """TensorRT flow decoder."""

    load_jit: bool
    """TorchScript parts."""

    load_vllm: bool
    """vLLM language model."""

    notes: tuple[str, ...] = ()
    """Human-readable reasons for the choices (logged at startup)."""


def jit_files(version: int, fp16: bool) -> list[str]:
    """TorchScript files upstream loads with load_jit for model `version`."""
    precision = "fp16" if fp16 else "fp32"
    if version == 1:
        return [f"llm.text_encoder.{precision}.zip", f"llm.llm.{precision}.zip", f"flow.encoder.{precision}.zip"]
    return [f"flow.encoder.{precision}.zip"]


def plan_load(
    settings: CosyVoiceSettings,
    version: int,
    model_dir: Path,
    cuda: bool,
    capability: Optional[tuple[int, int]],
    trt_version: Optional[str],
    vllm_installed: Optional[bool] = None,
) -> LoadPlan:
    """Decide the load options for this machine; a required piece that is missing is a one-line EngineUnavailable."""
    if not cuda:
        if settings.require_gpu:
            fit = driver_fit_here()
            hint = "; is CUDA_VISIBLE_DEVICES empty?" if fit.fits else ""
            raise EngineUnavailable(
                PREFIX + f"no CUDA GPU visible to torch: {fit.line}{hint}; "
                "or set engines.cosyvoice.require_gpu: false to run on the CPU (slow)"
            )
        return LoadPlan("cpu", False, False, False, False, False, ("no CUDA: CPU, fp32, no TensorRT/JIT/vLLM",))
    notes: list[str] = []
    cc = capability or (0, 0)
    cc_text = "%d.%d" % cc
    if settings.fp16 == "auto":
        fp16, fp16_auto = cc >= FP16_MIN_CAPABILITY, True
        notes.append(f"fp16 {'on' if fp16 else 'off'} (auto, compute capability {cc_text})")
    else:
        fp16, fp16_auto = bool(settings.fp16), False
        if fp16 and cc < FP16_MIN_CAPABILITY:
            notes.append(f"fp16 forced on compute capability {cc_text} (< 8.0): warm-up checks the output")
    onnx = Path(model_dir) / "flow.decoder.estimator.fp32.onnx"
    if settings.load_trt is True:
        if trt_version is None:
            raise EngineUnavailable(
                PREFIX + "load_trt is true but TensorRT is not installed (pip install tensorrt-cu13, or tensorrt-cu12 "
                "with CUDA 12 torch; see docs/cosyvoice.md), or set engines.cosyvoice.load_trt: false"
            )
        if not onnx.is_file():
            raise EngineUnavailable(PREFIX + f"load_trt is true but {onnx} is missing (re-download the model)")
        load_trt = True
    elif settings.load_trt == "auto":
        load_trt = trt_version is not None and onnx.is_file()
        if not load_trt:
            why = "TensorRT not installed" if trt_version is None else f"no {onnx.name}"
            notes.append(f"TensorRT off ({why}; load_trt: auto)")
    else:
        load_trt = False
    if load_trt:
        notes.append(f"TensorRT {trt_version} flow decoder, {'fp16' if fp16 else 'fp32'} plan")
    if settings.load_jit:
        if version == 3:
            raise EngineUnavailable(
                PREFIX + "load_jit is not supported by CosyVoice3 (set engines.cosyvoice.load_jit: false)"
            )
        missing = [name for name in jit_files(version, fp16) if not (Path(model_dir) / name).is_file()]
        if missing:
            raise EngineUnavailable(PREFIX + f"load_jit is true but {', '.join(missing)} missing in {model_dir}")
    if settings.load_vllm:
        if version == 1:
            raise EngineUnavailable(
                PREFIX + "load_vllm needs CosyVoice2 or CosyVoice3 (set engines.cosyvoice.load_vllm: false)"
            )
        if vllm_installed is None:
            vllm_installed = importlib.util.find_spec("vllm") is not None
        if not vllm_installed:
            raise EngineUnavailable(PREFIX + "load_vllm is true but the vllm package is not installed")
    return LoadPlan("cuda", fp16, fp16_auto, load_trt, settings.load_jit, settings.load_vllm, tuple(notes))
