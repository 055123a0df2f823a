"""Loading the CosyVoice model: the load plan, TensorRT plans, the self-check and the streaming loop installed."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from wyoming_cosyvoice.errors import EngineNotConfigured, EngineUnavailable

from . import parking, selfcheck, sessions, upstream
from . import stream as cosyvoice_stream
from .options import CosyVoiceSettings, LoadPlan, auto_concurrency, plan_load
from .parking import empty_cuda_cache

_LOGGER = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A loaded model and what was decided while loading it."""

    model: Any
    """Upstream's CosyVoice / CosyVoice2 / CosyVoice3 object."""
    info: upstream.ModelInfo
    plan: LoadPlan
    scheduling: Optional[cosyvoice_stream.Streaming]
    """The shared flow + vocoder scheduler (our own loop), or None: upstream's own loop, one call at a time."""
    streaming: str
    """How chunks are streamed: own loop (CosyVoice 2/3), upstream loop, or off."""
    free_memory: Optional[int]
    """GPU bytes free after loading (None: no CUDA, or not known)."""
    trt: Optional[parking.TrtPlan]
    """How to rebuild the TensorRT engine after a host park."""
    text_normalizer: str
    """Upstream's text normalizer: ttsfrd, wetext or none ("" when waking: unchanged)."""
    seconds: float
    """How long the (successful) load took."""

    def summary(self) -> str:
        """For the log: which class, from where, on what, how long, the rate and the plan's notes."""
        notes = "; ".join(self.plan.notes) or "defaults"
        return (
            f"{self.info.class_name} from {self.info.path} on {self.plan.device} in {self.seconds:.1f} s "
            f"({int(self.model.sample_rate)} Hz; {notes})"
        )


class Loader:
    """Loads the model a fresh start needs (plan, TensorRT, self-check, streaming loop) or a wake needs again."""

    def __init__(self, settings: CosyVoiceSettings, cache_dir: Path, release: Callable[[], None]) -> None:
        self.settings = settings
        self.cache_dir = cache_dir
        self.release = release
        """Drops the model in use before another loads (its GPU memory is needed)."""
        self.self_check = ""
        """The self-check's summary at the last fresh load (health, describe)."""

    def load(self, force_fp16: Optional[bool], waking: Optional[LoadedModel] = None) -> LoadedModel:
        """Load the model; `waking`: the model before an unload park (no self-check; its scheduler and measured costs
        stay). EngineUnavailable names what is missing or broken; automatic fp16 failing the check reloads in fp32."""
        started = time.perf_counter()
        settings = self.settings
        if settings.repo is None and settings.model_dir is None:
            # Never set up (a fresh install without a GPU model): the fallback serves, and that is no warning.
            raise EngineNotConfigured(upstream.PREFIX + f"engines.cosyvoice.repo is not set ({upstream.README_HINT})")
        repo = upstream.check_checkout(settings.repo)
        info = upstream.inspect_model_dir(settings.model_dir)
        try:
            import torch
        except ImportError:
            raise EngineUnavailable(upstream.PREFIX + "torch is not installed (pip install -e '.[gpu]')") from None
        cuda = bool(torch.cuda.is_available())
        capability: Optional[tuple[int, int]] = None
        if cuda:
            major, minor = torch.cuda.get_device_capability()
            capability = (int(major), int(minor))
        trt_version = upstream.tensorrt_version() if cuda else None
        plan = plan_load(settings, info.version, info.path, cuda, capability, trt_version)
        if force_fp16 is not None:
            plan = LoadPlan(plan.device, force_fp16, False, plan.load_trt, plan.load_jit, plan.load_vllm, plan.notes)
        module = upstream.import_cosyvoice(repo)
        plans: Optional[tuple[Path, Path]] = None
        if plan.load_trt:
            assert capability is not None  # TensorRT is planned with CUDA only
            keyed = upstream.keyed_plan_path(
                self.cache_dir, info.identity, plan.fp16, torch.cuda.get_device_name(), capability, trt_version or ""
            )
            plans = (upstream.upstream_plan_path(info.path, plan.fp16), keyed)
            if not upstream.link_plan(*plans):
                _LOGGER.info("Building the TensorRT plan for this GPU (first start only; takes minutes)")
        model = self._construct(module, info, plan)
        trt: Optional[parking.TrtPlan] = None
        if plans is not None:
            upstream.adopt_plan(*plans)
            onnx = info.path / "flow.decoder.estimator.fp32.onnx"
            trt = parking.TrtPlan(plans[0], onnx, settings.trt_concurrent, plan.fp16)
        checked = selfcheck.Result(self.self_check) if waking else self._self_check(model, plan)
        if checked.problem is not None:
            del model  # before the fallback engine starts or the fp32 copy loads
            empty_cuda_cache()
            if checked.fp16 and plan.fp16_auto and force_fp16 is None:
                _LOGGER.warning("%s; reloading in fp32", checked.problem)
                return self.load(False)
            raise EngineUnavailable(upstream.PREFIX + checked.problem)
        scheduling = self._install_loop(model, info, plan, waking.scheduling if waking else None)
        free_memory: Optional[int] = None
        if cuda:
            try:
                free_memory = int(torch.cuda.mem_get_info()[0])
            except Exception:  # an old torch or a driver without it: concurrency stays at 1 (auto)
                free_memory = None
        if not settings.stream:
            streaming = "off"
        elif scheduling is None:
            streaming = "upstream loop"
        else:
            streaming = "own loop, early first chunk" if settings.early_first_chunk else "own loop"
        normalizer = "" if waking else text_normalizer(model)
        seconds = time.perf_counter() - started
        return LoadedModel(model, info, plan, scheduling, streaming, free_memory, trt, normalizer, seconds)

    def _construct(self, module: Any, info: upstream.ModelInfo, plan: LoadPlan) -> Any:
        """Upstream's class for this model directory, with the plan's switches (after the old model is released)."""
        kwargs: dict[str, Any] = {
            "load_trt": plan.load_trt,
            "fp16": plan.fp16,
            "trt_concurrent": self.settings.trt_concurrent,
        }
        if info.version != 3:
            kwargs["load_jit"] = plan.load_jit
        if info.version != 1:
            kwargs["load_vllm"] = plan.load_vllm
        self.release()
        try:
            return getattr(module, info.class_name)(str(info.path), **kwargs)
        except Exception as err:  # upstream raises ValueError, AssertionError, CUDA errors...
            raise EngineUnavailable(
                upstream.PREFIX + f"loading {info.class_name} from {info.path} failed: {type(err).__name__}: {err}"
            ) from None

    def _install_loop(
        self, model: Any, info: upstream.ModelInfo, plan: LoadPlan, previous: Optional[cosyvoice_stream.Streaming]
    ) -> Optional[cosyvoice_stream.Streaming]:
        """Our streaming loop on the model (a wake keeps its scheduler); None where upstream's loop streams."""
        flow_slots = self.settings.trt_concurrent if plan.load_trt else 1
        scheduling = previous or cosyvoice_stream.Streaming(
            self.settings.early_first_chunk,
            int(model.sample_rate),
            flow_slots,
            llm_batched=bool(plan.load_vllm),
            max_flow_batch=self.settings.flow_batch_limit(),
        )
        own_loop = cosyvoice_stream.install(model.model, scheduling)
        sessions.track(model.model)
        if own_loop:
            return scheduling
        if info.version != 1:  # CosyVoice 1 streams with upstream's loop by design
            _LOGGER.info(
                "CosyVoice %s lacks a part of the streaming loop this engine uses; upstream's own loop "
                "streams (100 ms polling, upstream's first chunk)",
                info.class_name,
            )
        install_hop_reset(model.model)
        return None

    def _self_check(self, model: Any, plan: LoadPlan) -> selfcheck.Result:
        """The self-check on the loaded model (cached LLM decoding; fp16 against fp32), unless switched off."""
        if not self.settings.self_check:
            result = selfcheck.Result("off (engines.cosyvoice.self_check: false)")
        else:
            device = getattr(getattr(model.model, "device", None), "type", plan.device)  # upstream's torch.device
            result = selfcheck.run(model.model, plan.fp16, plan.load_trt, device)
        self.self_check = result.summary
        if result.problem is None:
            _LOGGER.info("Self-check: %s", result.summary)
        return result


def cannot_start(settings: CosyVoiceSettings) -> Optional[str]:
    """Not set up, or the checkout or model directory is missing (checked on disk; nothing is imported)."""
    if settings.repo is None and settings.model_dir is None:
        return "not set up"
    try:
        upstream.check_checkout(settings.repo)
        upstream.inspect_model_dir(settings.model_dir)
    except EngineUnavailable as err:
        return str(err)
    return None


def concurrency(settings: CosyVoiceSettings, loaded: Optional[LoadedModel]) -> tuple[int, str]:
    """Requests in flight and how that was chosen: 1 with upstream's loop; else the setting, or `auto` from the GPU's
    free memory."""
    wanted = settings.concurrency
    if loaded is None or loaded.scheduling is None:
        if wanted not in ("auto", 1):
            _LOGGER.warning(
                "engines.cosyvoice.concurrency %s ignored: %s streams with upstream's own loop, one request at a time",
                wanted,
                loaded.info.class_name if loaded else "this model",
            )
        return 1, "1 (upstream's loop)"
    if wanted == "auto":
        n, why = auto_concurrency(loaded.plan.device, loaded.free_memory)
    else:
        n, why = int(wanted), "set"
    note = f"{n} ({why})"
    _LOGGER.info("Requests in flight at once: %s", note)
    return n, note


def text_normalizer(model: Any) -> str:
    """Which normalizer upstream's frontend picked (ttsfrd, else wetext, else none), logged once per load."""
    name = getattr(model.frontend, "text_frontend", None)
    if name is None:
        return "unknown"
    if name:
        _LOGGER.info("Text normalization: %s", name)
        return str(name)
    _LOGGER.warning(
        "No text normalizer (upstream uses ttsfrd, else wetext): numbers and symbols are read as written "
        '("$12.50" becomes "$twelve.fifty"); install one: pip install wetext'
    )
    return "none"


def install_hop_reset(inner: Any) -> None:
    """Upstream doubles `token_hop_len` on the shared model during a stream and never resets it (the third request
    waits ~4 s for its first chunk): reset it at every segment's `tts` call."""
    initial = getattr(inner, "token_hop_len", None)
    if initial is None:  # CosyVoice 1 keeps its hop length local
        return
    original = inner.tts

    def tts(*args: Any, **kwargs: Any) -> Any:
        inner.token_hop_len = initial
        return original(*args, **kwargs)

    inner.tts = tts
