"""`script/gpu-check --cpu-smoke`: the GPU host check's whole path (our engine vs upstream's streaming API on one
loaded random-weight CosyVoice2, sequential and N at once, report.json + report.md) run on the CPU, as CI can."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

from .realcode import cosyvoice_repo, tiny_cosyvoice2  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_smoke_writes_a_sane_report(tmp_path: Path, cosyvoice_repo: Path, tiny_cosyvoice2: Path) -> None:  # noqa: F811
    out = tmp_path / "out"
    # The session's tiny model (built with the same tests/tiny_cosyvoice.py the script runs) saves a second build.
    command = [str(ROOT / "script" / "gpu-check"), "--cpu-smoke", "--out", str(out), "--model", str(tiny_cosyvoice2)]
    env = {**os.environ, "COSYVOICE_REPO": str(cosyvoice_repo), "PYTHON": os.environ.get("PYTHON", "")}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["cpu_smoke"] is True and report["failed"] == []
    assert report["machine"]["cuda_fit"] and report["machine"]["torch"]
    (variant,) = report["variants"]
    assert variant["variant"] == "fp32"
    assert variant["llm_calls_tokens"] == [report["tokens"]]  # both paths made exactly the forced token count
    assert variant["engine"]["engine"] == "cosyvoice" and variant["engine"]["precision"] == "fp32"
    for key in ("ours_first_ms", "upstream_first_ms", "ours_rtf", "upstream_rtf"):
        assert math.isfinite(variant[key]) and variant[key] > 0, (key, variant[key])
    # The same text and token count: both paths made the same audio length (a tiny model's 24 kHz noise).
    assert variant["ours_audio_s"] > 0 and math.isclose(
        variant["ours_audio_s"], variant["upstream_audio_s"], rel_tol=0.2
    )
    assert [c["n"] for c in variant["concurrent"]] == report["levels"] == [1, 2]
    for level in variant["concurrent"]:
        assert level["ours_refused"] == 0 and level["ours_first_ms"] > 0 and level["upstream_first_ms"] > 0
    assert variant["peak_rss_mb"] > 0 and variant["wall_s"] > 0
    table = (out / "report.md").read_text()
    assert "CPU smoke run" in table and "| fp32 | 1 |" in table and "| fp32 | 2 |" in table
