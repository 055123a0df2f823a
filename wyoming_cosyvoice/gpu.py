"""GPU facts via NVML (`nvidia-ml-py`, imported lazily); no GPU or no NVML is a normal state, not an error."""

from __future__ import annotations

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
