"""pixi.toml in step with pyproject.toml and the constraints: the web extra, the test tools' pins, the GPU pins and
the CUDA line (pixi cannot run here: conda-forge is not reachable, so the files are compared)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

if sys.version_info < (3, 11):
    pytest.skip("tomllib is Python 3.11+", allow_module_level=True)
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _spec(requirement: str) -> tuple[str, str]:
    name, spec = re.match(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*(.*)", requirement.split(";")[0]).groups()
    return name.lower().replace("_", "-"), spec.strip() or "*"


def test_pixi_features_match_the_extras() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pixi = tomllib.loads((ROOT / "pixi.toml").read_text())
    feature = pixi["feature"]
    assert dict(map(_spec, pyproject["web"])) == {"aiohttp": feature["web"]["dependencies"]["aiohttp"]}
    test = {**feature["test"]["dependencies"], **feature["test"]["pypi-dependencies"]}
    test = {k.lower().replace("_", "-"): v for k, v in test.items()}
    for name, spec in map(_spec, pyproject["test"]):
        if name in ("ruff", "mypy", "types-pyyaml", "aiohttp", "pytest", "pytest-asyncio", "hypothesis", "playwright"):
            assert test[name] == spec, name  # the lint gate's pins exactly; the rest with the same lower bounds
    gpu = dict(map(_spec, pyproject["gpu"]))
    cuda = feature["cuda"]["dependencies"]
    assert cuda["transformers"] == gpu["transformers"] and cuda["diffusers"] == gpu["diffusers"]
    assert cuda["pytorch-gpu"] == gpu["torch"] and cuda["torchaudio"] == gpu["torchaudio"]
    # The CUDA 12 line, as the image's default: conda's CUDA 12.8 and onnxruntime-gpu's last CUDA 12 release.
    assert feature["cuda"]["system-requirements"]["cuda"] == "12" and cuda["cuda-version"] == "12.8.*"
    ort = feature["cuda"]["target"]["linux-64"]["pypi-dependencies"]["onnxruntime-gpu"]
    assert f"onnxruntime-gpu{ort}\n" in (ROOT / "constraints" / "cuda12.txt").read_text()
    assert "ARG CUDA=cu128\n" in (ROOT / "Dockerfile.gpu").read_text()
    assert "web" in pixi["environments"]["cuda"]["features"]
