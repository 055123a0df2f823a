"""GPU facts via NVML (`nvidia-ml-py`, imported lazily); no GPU or no NVML is a normal state, not an error."""

from __future__ import annotations

import ctypes
import importlib
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Optional

_NVML_LOCK = threading.Lock()
_NVML_STATE: dict[str, Any] = {"initialized": False, "error": None}


@dataclass(frozen=True)
class GpuFacts:
    """What NVML says about one GPU (or why it said nothing)."""

    available: bool
    """True when NVML answered and reported at least one GPU."""

    name: str = ""
    """Marketing name, e.g. "NVIDIA GeForce RTX 2070"."""

    index: int = 0
    """NVML device index."""

    memory_used_mb: int = 0
    """Memory in use on the device (all processes), MiB."""

    memory_total_mb: int = 0
    """Total device memory, MiB."""

    utilization_percent: Optional[int] = None
    """GPU busy percentage over NVML's last sample period."""

    compute_capability: Optional[tuple[int, int]] = None
    """CUDA compute capability (major, minor), e.g. (7, 5) for Turing."""

    driver_version: str = ""
    """NVIDIA driver version."""

    cuda_driver_version: str = ""
    """Highest CUDA version the driver supports, e.g. "12.4"."""

    reason: str = ""
    """Why no GPU facts are available (empty when available)."""

    def as_dict(self) -> dict[str, Any]:
        """Flat key/values for logs, `info` and the health command."""
        if not self.available:
            return {"gpu": "none", "gpu_note": self.reason}
        facts: dict[str, Any] = {
            "gpu": self.name,
            "gpu_memory": f"{self.memory_used_mb}/{self.memory_total_mb} MiB",
            "driver": self.driver_version,
            "cuda_driver": self.cuda_driver_version,
        }
        if self.compute_capability:
            facts["compute_capability"] = "%d.%d" % self.compute_capability
        if self.utilization_percent is not None:
            facts["gpu_utilization"] = f"{self.utilization_percent}%"
        return facts


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _init_nvml() -> Any:
    """The `pynvml` module with NVML initialized once per process, or raise with the reason."""
    import pynvml  # from nvidia-ml-py

    with _NVML_LOCK:
        if not _NVML_STATE["initialized"]:
            pynvml.nvmlInit()
            _NVML_STATE["initialized"] = True
    return pynvml


def gpu_facts(index: int = 0) -> GpuFacts:
    """Facts about GPU `index`; never raises (a machine without an NVIDIA GPU gets `available=False`)."""
    try:
        nvml = _init_nvml()
    except ImportError:
        return GpuFacts(False, reason="nvidia-ml-py is not installed")
    except Exception as err:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return GpuFacts(False, reason=f"NVML unavailable: {err}")
    try:
        if nvml.nvmlDeviceGetCount() <= index:
            return GpuFacts(False, reason="no NVIDIA GPU found")
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        try:
            utilization: Optional[int] = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # not supported on some (virtualized, MIG) devices
            utilization = None
        try:
            capability: Optional[tuple[int, int]] = tuple(nvml.nvmlDeviceGetCudaComputeCapability(handle))
        except Exception:
            capability = None
        cuda = int(nvml.nvmlSystemGetCudaDriverVersion())
        return GpuFacts(
            True,
            name=_text(nvml.nvmlDeviceGetName(handle)),
            index=index,
            memory_used_mb=int(memory.used) // 2**20,
            memory_total_mb=int(memory.total) // 2**20,
            utilization_percent=utilization,
            compute_capability=capability,
            driver_version=_text(nvml.nvmlSystemGetDriverVersion()),
            cuda_driver_version=f"{cuda // 1000}.{cuda % 1000 // 10}",
        )
    except Exception as err:  # a GPU that disappears or errors must not break health reporting
        return GpuFacts(False, reason=f"NVML query failed: {err}")


# ---------------------------------------------------------------------------- driver vs torch's CUDA

MIN_DRIVER = {13: (580, 0, 0), 12: (525, 60, 13), 11: (450, 80, 2)}
"""Oldest Linux driver per CUDA major version that runs every minor release of it (NVIDIA's table "CUDA Toolkit and
Minimum Required Driver Version for CUDA Minor Version Compatibility"); PyTorch's wheels carry their own CUDA runtime,
so only this bound matters."""

CUDA12_LINE = "cu128"
"""The CUDA 12 line offered (PyTorch's own index; the image's default): runs on drivers 525.60.13+."""

CUDA12_PIP = (
    "pip install --force-reinstall 'torch==2.11.*' 'torchaudio==2.11.*' "
    f"--index-url https://download.pytorch.org/whl/{CUDA12_LINE}"
)


@dataclass(frozen=True)
class DriverFit:
    """Whether the NVIDIA driver runs the CUDA build of torch, in one line."""

    fits: Optional[bool]
    """True/False; None when there is nothing to judge (no driver, or a CUDA version with no known minimum)."""

    line: str
    """One line for logs, `health` and `describe`; names the CUDA line or image argument to use when it does not fit."""


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.strip().split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _use_cuda12(image_line: str) -> str:
    if image_line:  # inside the Docker image: its build argument is the switch
        return f"rebuild the image with --build-arg CUDA={CUDA12_LINE} (this one is CUDA={image_line})"
    return f"use the CUDA 12 line: {CUDA12_PIP}"


def driver_fit(driver: Optional[str], torch_cuda: Optional[str], image_line: str = "") -> DriverFit:
    """Judge driver `driver` (e.g. "535.183.01"; None: none found) against torch built for CUDA `torch_cuda`
    (e.g. "13.0"; None: a CPU build or no torch). `image_line`: the image's CUDA build argument ("" outside one)."""
    if not driver:
        where = " (NVML did not answer)"
        if image_line:  # in the image the driver comes from the host, through the NVIDIA Container Toolkit
            where = ": run the container with --gpus all (NVIDIA Container Toolkit)"
        return DriverFit(None, "no NVIDIA driver found" + where)
    have = _version_tuple(driver)
    if not torch_cuda:
        fix = f"rebuild the image with --build-arg CUDA={CUDA12_LINE}" if image_line else CUDA12_PIP
        return DriverFit(False, f"NVIDIA driver {driver}, but torch has no CUDA build here (CPU only): {fix}")
    major = _version_tuple(torch_cuda)[:1]
    need = MIN_DRIVER.get(major[0]) if major else None
    if need is None:
        return DriverFit(None, f"NVIDIA driver {driver}; torch built for CUDA {torch_cuda} (no known minimum driver)")
    need_text = ".".join(str(n) for n in need).removesuffix(".0.0")
    if have >= need:
        return DriverFit(True, f"NVIDIA driver {driver} runs torch's CUDA {torch_cuda} (needs {need_text}+)")
    head = f"NVIDIA driver {driver} is too old for torch's CUDA {torch_cuda} (needs {need_text}+): "
    if major[0] >= 13 and have >= MIN_DRIVER[12]:
        return DriverFit(False, head + _use_cuda12(image_line) + ", or update the driver to 580+")
    return DriverFit(False, head + "update the NVIDIA driver (535 or newer; 580+ for CUDA 13)")


NVML_LIBRARY = "libnvidia-ml.so.1"
"""NVML's shared library, installed with the driver (the NVIDIA Container Toolkit mounts it into containers)."""


def _open_nvml() -> Any:
    return ctypes.CDLL(NVML_LIBRARY)


def _nvml_driver_ctypes() -> Optional[str]:
    """The driver version straight from libnvidia-ml (when nvidia-ml-py is not installed); None without a driver."""
    try:
        nvml = _open_nvml()
    except OSError:
        return None
    buffer = ctypes.create_string_buffer(96)
    with _NVML_LOCK:
        if nvml.nvmlInit_v2() != 0:
            return None
        ok = nvml.nvmlSystemGetDriverVersion(buffer, ctypes.c_uint(len(buffer))) == 0
    return buffer.value.decode() if ok else None


def driver_version(facts: Optional[GpuFacts] = None) -> Optional[str]:
    """The NVIDIA driver's version (NVML through nvidia-ml-py, else libnvidia-ml directly); None when there is none."""
    facts = facts if facts is not None else gpu_facts()
    if facts.driver_version:
        return facts.driver_version
    try:
        return _nvml_driver_ctypes()
    except (OSError, AttributeError):
        return None


def torch_cuda_version() -> Optional[str]:
    """The CUDA version torch was built for ("13.0"), None for a CPU build or without torch (imported when present)."""
    module = sys.modules.get("torch")
    if module is None:
        try:
            module = importlib.import_module("torch")
        except ImportError:
            return None
    version = getattr(module, "version", None)
    return getattr(version, "cuda", None) or None


def driver_fit_here(facts: Optional[GpuFacts] = None) -> DriverFit:
    """`driver_fit` for this machine and this process's torch (the image sets WYOMING_COSYVOICE_CUDA)."""
    return driver_fit(driver_version(facts), torch_cuda_version(), os.environ.get("WYOMING_COSYVOICE_CUDA", ""))


def process_memory_mb(index: int = 0, pid: Optional[int] = None) -> Optional[int]:
    """GPU memory (MiB) that process `pid` (default: this one) holds on GPU `index`, as NVML counts it (its CUDA
    context included); None without NVML or a GPU, or when NVML does not report per-process memory."""
    import os

    pid = os.getpid() if pid is None else pid
    try:
        nvml = _init_nvml()
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:  # no nvidia-ml-py, no driver, no such GPU, or not supported (some containers, MIG)
        return None
    used = [p.usedGpuMemory for p in processes if p.pid == pid and p.usedGpuMemory is not None]
    return sum(int(u) for u in used) // 2**20 if used else 0
