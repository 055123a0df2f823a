"""The NVIDIA driver vs torch's CUDA build: the decision table with real driver and CUDA versions, and the lines
`health`, the engine's health facts and its start-up refusal show."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugins.cosyvoice.options import CosyVoiceSettings, plan_load
from wyoming_cosyvoice import gpu
from wyoming_cosyvoice.errors import EngineUnavailable
from wyoming_cosyvoice.gpu import GpuFacts, driver_fit

# (driver, torch.version.cuda, fits, words the line must hold): drivers as NVML reports them on real releases
# (535 and 550: common on RTX 20xx/30xx/40xx machines; 570: the R570 branch; 580.65.06: CUDA 13.0's GA driver).
TABLE = [
    ("580.65.06", "13.0", True, "runs torch's CUDA 13.0 (needs 580+)"),
    ("590.44.01", "13.0", True, "runs torch's CUDA 13.0"),
    ("570.172.08", "13.0", False, "--index-url https://download.pytorch.org/whl/cu128"),
    ("535.183.01", "13.0", False, "use the CUDA 12 line"),
    ("525.60.13", "13.0", False, "use the CUDA 12 line"),
    ("525.60.12", "13.0", False, "update the NVIDIA driver (535 or newer"),
    ("470.256.02", "13.0", False, "update the NVIDIA driver"),
    ("535.183.01", "12.8", True, "runs torch's CUDA 12.8 (needs 525.60.13+)"),
    ("525.60.13", "12.6", True, "runs torch's CUDA 12.6"),
    ("580.65.06", "12.8", True, "runs torch's CUDA 12.8"),
    ("525.60.11", "12.8", False, "too old for torch's CUDA 12.8 (needs 525.60.13+): update the NVIDIA driver"),
    ("470.256.02", "11.8", True, "runs torch's CUDA 11.8 (needs 450.80.2+)"),
    ("550.144.03", None, False, "torch has no CUDA build here (CPU only): pip install --force-reinstall"),
    ("550.144.03", "14.1", None, "no known minimum driver"),
    (None, "13.0", None, "no NVIDIA driver found"),
    (None, None, None, "no NVIDIA driver found"),
]


@pytest.mark.parametrize("driver, cuda, fits, words", TABLE)
def test_decision_table(driver, cuda, fits, words) -> None:
    fit = driver_fit(driver, cuda)
    assert fit.fits is fits and words in fit.line, fit
    assert "\n" not in fit.line
    if fits is False and cuda and cuda.startswith("13") and "CUDA 12 line" in fit.line:
        assert "update the driver to 580+" in fit.line  # both ways out, in one line


def test_inside_the_image_the_advice_is_the_build_argument() -> None:
    fit = driver_fit("535.183.01", "13.0", image_line="cu130")
    assert fit.fits is False
    assert "rebuild the image with --build-arg CUDA=cu128 (this one is CUDA=cu130)" in fit.line
    assert "pip install" not in fit.line
    assert "--gpus all" in driver_fit(None, "12.8", image_line="cu128").line
    cpu_image = driver_fit("550.144.03", None, image_line="cpu")
    assert cpu_image.line.endswith("rebuild the image with --build-arg CUDA=cu128")


def test_without_nvml_here_it_says_no_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """No nvidia-ml-py answer and no libnvidia-ml: the line is 'no NVIDIA driver found' whatever torch is."""

    monkeypatch.setattr(gpu, "gpu_facts", lambda index=0: GpuFacts(False, reason="nvidia-ml-py is not installed"))
    monkeypatch.setattr(gpu, "NVML_LIBRARY", "libnvidia-ml-not-here.so.1")  # ctypes really fails to open it
    monkeypatch.delenv("WYOMING_COSYVOICE_CUDA", raising=False)
    fit = gpu.driver_fit_here()
    assert fit.fits is None and fit.line.startswith("no NVIDIA driver found")
    # The engine's refusal to start without a GPU carries the same line (not a generic note).
    with pytest.raises(EngineUnavailable) as err:
        plan_load(CosyVoiceSettings(), 2, Path("/nonexistent"), False, None, None)
    assert "no CUDA GPU visible to torch: no NVIDIA driver found" in str(err.value)
    assert "require_gpu: false" in str(err.value) and "\n" not in str(err.value)


def test_driver_version_from_the_library_when_the_binding_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """libnvidia-ml read directly (ctypes) when nvidia-ml-py is absent: the version it writes is the one used."""

    class FakeNvml:
        def nvmlInit_v2(self) -> int:
            return 0

        def nvmlSystemGetDriverVersion(self, buffer: object, length: object) -> int:
            gpu.ctypes.memmove(buffer, b"535.183.01\0", 11)
            return 0

    monkeypatch.setattr(gpu, "gpu_facts", lambda index=0: GpuFacts(False, reason="nvidia-ml-py is not installed"))
    monkeypatch.setattr(gpu, "_open_nvml", FakeNvml)
    assert gpu.driver_version() == "535.183.01"
