"""The model work of parking and waking (worker thread): weights to (pinned) host memory and back, TensorRT
engines dropped and rebuilt from their plans, prepared voices kept on the host while the model is unloaded."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

_LOGGER = logging.getLogger(__name__)

PARTS = ("llm", "flow", "hift")
"""The parts of upstream's inner model that hold the weights (language model, flow decoder, vocoder)."""


@dataclass(frozen=True)
class TrtPlan:
    """What upstream's `load_trt` needs to rebuild the flow decoder's TensorRT engine from its cached plan."""

    plan: Path
    onnx: Path
    concurrent: int
    fp16: bool


def _tensors(module: Any) -> list[Any]:
    """Parameters and buffers, each once (tied weights are one tensor)."""
    seen: dict[int, Any] = {}
    for tensor in list(module.parameters()) + list(module.buffers()):
        seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def to_host(inner: Any, trt: Optional[TrtPlan], stop: threading.Event) -> bool:
    """Move the weights of `inner`'s parts to host memory (pinned on CUDA, so the wake copies at full speed) and
    drop the TensorRT engine; stops between parts when `stop` is set. False when it stopped before the first part
    (nothing changed); on the CPU the weights are already in host memory and the park changes nothing but the state."""
    import torch

    if stop.is_set():
        return False
    cuda = torch.cuda.is_available()
    if trt is not None:
        inner.flow.decoder.estimator = None  # the engine and its contexts hold GPU memory; the plan is on disk
    for name in PARTS:
        if stop.is_set():
            break
        for tensor in _tensors(getattr(inner, name)):
            if tensor.device.type == "cpu":
                continue
            host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=cuda)
            host.copy_(tensor.data, non_blocking=cuda)
            tensor.data = host
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return True


def to_device(inner: Any, trt: Optional[TrtPlan]) -> None:
    """Copy the parked weights back to the model's device and rebuild the TensorRT engine from its plan."""
    import torch

    device = inner.device
    for name in PARTS:
        for tensor in _tensors(getattr(inner, name)):
            if tensor.device != device:
                tensor.data = tensor.data.to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    if trt is not None and getattr(inner.flow.decoder, "estimator", None) is None:
        inner.load_trt(str(trt.plan), str(trt.onnx), trt.concurrent, trt.fp16)


def voices_to_host(spk2info: dict, keys: list[str]) -> dict[str, Any]:
    """Copies on the host of the prepared voices `keys` (so an unloaded model's voices come back as they were)."""
    return {key: _moved(spk2info[key], "cpu") for key in keys if key in spk2info}


def voices_back(spk2info: dict, kept: dict[str, Any], device: Any) -> None:
    """Put kept voices back into a (re)loaded model's speaker table, on its device."""
    for key, entry in kept.items():
        spk2info[key] = _moved(entry, device)


def _moved(entry: Any, device: Any) -> Any:
    if isinstance(entry, dict):
        return {k: _moved(v, device) for k, v in entry.items()}
    to = getattr(entry, "to", None)
    return to(device) if to is not None else entry


def empty_cuda_cache() -> None:
    """Return the CUDA caching allocator's free blocks to the driver (nothing without torch or CUDA)."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def release_memory() -> None:
    """After the model is dropped: collect its reference cycles, return the CUDA cache and the C heap's free pages."""
    gc.collect()
    empty_cuda_cache()
    _malloc_trim()


def _malloc_trim() -> None:
    """glibc keeps freed small blocks in its heap; malloc_trim hands them back to the system (no-op elsewhere)."""
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


class Parker:
    """The model work of a park and a wake, on the engine's worker thread (lifecycle.py decides when): `host` moves
    the weights to host memory and back; `unload` keeps the prepared voices on the host, drops the model and loads
    it again."""

    def __init__(
        self,
        mode: str,
        model: Callable[[], Any],
        unload: Callable[[], None],
        reload: Callable[[], None],
        trt: Callable[[], Optional[TrtPlan]],
    ) -> None:
        self.mode = mode
        self._model, self._unload, self._reload, self._trt = model, unload, reload, trt
        self._kept: dict[str, Any] = {}  # prepared voices of an unloaded model, on the host

    def park(self, stop: threading.Event) -> bool:
        """Park the model unless `stop` is set first; whether it was parked."""
        model = self._model()
        if model is None or stop.is_set():
            return False
        if self.mode == "host":
            return to_host(model.model, self._trt(), stop)
        spk2info = model.frontend.spk2info
        self._kept = voices_to_host(spk2info, [k for k in spk2info if k.startswith("wcv-")])
        del spk2info, model
        if stop.is_set():  # a request came while the voices were copied: keep the model
            self._kept = {}
            return False
        self._unload()
        release_memory()
        return True

    def wake(self) -> None:
        """Load the unloaded model again (its voices come back through `restore`), or move the weights back."""
        model = self._model()
        if model is None:
            self._reload()
        else:
            to_device(model.model, self._trt())

    def restore(self, frontend: Any) -> None:
        """The reloaded model's frontend gets the voices kept at the park."""
        voices_back(frontend.spk2info, self._kept, getattr(frontend, "device", "cpu"))
        self._kept = {}
