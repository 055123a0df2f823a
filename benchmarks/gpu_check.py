"""`script/gpu-check`: validate a GPU host in one command, without network. Builds a CosyVoice2-0.5B-size model with
random weights on the spot, then per variant (fp32, fp16, fp16 + TensorRT when importable) one process that loads our
engine and upstream's model once and compares them (benchmarks/gpu_compare.py): first audio and RTF per request,
N requests at once, VRAM used. Writes report.json and report.md to --out. `--cpu-smoke` runs the same code path on
the CPU with the tiny model (CI runs it: tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the quiet green forest."
VOICE = "prompt"


def default_repo() -> Optional[Path]:
    """The CosyVoice checkout: $COSYVOICE_REPO, else the copy in $WHEELHOUSE (script/wheelhouse), else None."""
    for candidate in (os.environ.get("COSYVOICE_REPO"), os.environ.get("WHEELHOUSE")):
        if candidate:
            path = Path(candidate)
            path = path / "CosyVoice" if (path / "CosyVoice").is_dir() else path
            if (path / "cosyvoice" / "cli" / "cosyvoice.py").is_file():
                return path
    return None


def write_config(folder: Path, repo: Path, model: Path, variant: str, gpu: bool) -> Path:
    """server.yaml + voices.yaml for one variant: our engine with that precision, the project's own recording."""
    folder.mkdir(parents=True, exist_ok=True)
    transcript = (ROOT / "asset" / "wyoming-cosyvoice-en-us.txt").read_text().strip()
    cosyvoice = {
        "repo": str(repo),
        "model_dir": str(model),
        "fp16": variant != "fp32",
        "load_trt": variant == "fp16-trt",
        "require_gpu": gpu,
        "max_queue": 64,
        "cache_dir": str(folder / "cache"),
    }
    config = {
        "engine": {"name": "cosyvoice", "fallback": None},
        "engines": {"cosyvoice": cosyvoice},
        "voice_providers": {"yaml": {"path": "voices.yaml"}},
    }
    voices = {
        "default": VOICE,
        "voices": [
            {
                "name": VOICE,
                "languages": ["en-US"],
                "mode": "zero_shot",
                "reference_audio": str(ROOT / "asset" / "wyoming-cosyvoice-en-us.wav"),
                "transcript": transcript,
            }
        ],
    }
    (folder / "server.yaml").write_text(json.dumps(config, indent=2))  # JSON is YAML
    (folder / "voices.yaml").write_text(json.dumps(voices, indent=2))
    return folder / "server.yaml"


def memory() -> dict[str, Any]:
    """VRAM (torch's peak in this process, NVML's device total in use) and this process's peak RSS."""
    import torch

    from wyoming_cosyvoice.gpu import gpu_facts

    facts: dict[str, Any] = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}
    if torch.cuda.is_available():
        facts["vram_peak_allocated_mb"] = torch.cuda.max_memory_allocated() // 2**20
        facts["vram_peak_reserved_mb"] = torch.cuda.max_memory_reserved() // 2**20
        nvml = gpu_facts()
        if nvml.available:
            facts["vram_device_used_mb"] = nvml.memory_used_mb
            facts["vram_device_total_mb"] = nvml.memory_total_mb
    return facts


def run_variant(args: argparse.Namespace) -> int:
    """One variant in this process (the parent starts one process per variant, so VRAM peaks do not mix)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_compare import gpu_compare  # benchmarks/gpu_compare.py

    started = time.perf_counter()
    result = asyncio.run(gpu_compare(args.config, VOICE, args.tokens, args.requests, TEXT, 1, args.levels, args.rounds))
    result["memory"] = memory()
    result["wall_s"] = time.perf_counter() - started
    args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


def variants(gpu: bool, precisions: list[str]) -> list[str]:
    """The variants to run: the precisions asked for, plus fp16 with TensorRT when TensorRT imports (GPU only)."""
    import importlib.util

    chosen = list(precisions)
    if gpu and "fp16" in chosen and importlib.util.find_spec("tensorrt") is not None:
        chosen.append("fp16-trt")
    return chosen


def build_model(repo: Path, out: Path, size: str, log: Path) -> float:
    """The random-weight model, built with upstream's own classes (tests/tiny_cosyvoice.py); seconds taken."""
    started = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.call(
            [sys.executable, "-m", "tests.tiny_cosyvoice", "--repo", str(repo), "--out", str(out), "--size", size],
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    if code:
        raise SystemExit(f"gpu-check: building the {size} model failed (exit {code}; see {log})")
    return time.perf_counter() - started


def machine_facts() -> dict[str, Any]:
    """Driver, GPU and torch facts, and whether the driver fits torch's CUDA (the same line `health` prints)."""
    import platform

    import torch

    from wyoming_cosyvoice.gpu import driver_fit_here, gpu_facts

    nvml = gpu_facts()
    return {
        **nvml.as_dict(),
        "cuda_fit": driver_fit_here(nvml).line,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def summary_row(variant: str, result: dict[str, Any]) -> dict[str, Any]:
    """The figures the table shows for one variant (medians over the requests)."""
    ours, theirs = result.get("ours_direct", {}), result.get("upstream", {})
    row: dict[str, Any] = {
        "variant": variant,
        "ours_first_ms": ours.get("ttfa_median_ms"),
        "upstream_first_ms": theirs.get("ttfa_median_ms"),
        "ours_rtf": ours.get("rtf_median"),
        "upstream_rtf": theirs.get("rtf_median"),
        "per_request": [
            {k: r[k] for k in ("request", "ours_first_ms", "upstream_first_ms", "ours_rtf", "upstream_rtf")}
            for r in result.get("per_request", [])
        ],
        "concurrent": [
            {
                "n": level["level"],
                "ours_first_ms": level["ours"]["first_median_ms"],
                "upstream_first_ms": level["upstream"]["first_median_ms"],
                "ours_rtf": level["ours"]["rtf_median"],
                "upstream_rtf": level["upstream"]["rtf_median"],
                "ours_refused": level["ours"]["refused"],
                "ours_behind": level["ours"]["behind"],
                "upstream_behind": level["upstream"]["behind"],
            }
            for level in result.get("concurrency", [])
        ],
        **result.get("memory", {}),
        "ours_audio_s": ours.get("audio_median_s"),
        "upstream_audio_s": theirs.get("audio_median_s"),
        "llm_calls_tokens": result.get("facts", {}).get("llm_calls_tokens"),
        "engine": result.get("facts", {}).get("engine", {}),
        "engine_ready_s": result.get("facts", {}).get("engine_ready_s"),
        "wall_s": result.get("wall_s"),
    }
    return row


def _ms(value: Any) -> str:
    return "-" if value is None or value != value else f"{value:.0f}"


def _rtf(value: Any) -> str:
    return "-" if value is None or value != value else f"{value:.3f}"


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: facts, one row per variant and request, one per variant and N at once."""
    facts = report["machine"]
    lines = [
        f"# gpu-check {'(CPU smoke run, tiny model: code path only, no GPU figures)' if report['cpu_smoke'] else ''}",
        "",
        f"- GPU: {facts.get('gpu')} ({facts.get('gpu_memory', facts.get('gpu_note', ''))})",
        f"- driver: {facts['cuda_fit']}",
        f"- torch {facts['torch']} (CUDA {facts['torch_cuda']}), Python {facts['python']}, {facts['cpus']} CPUs",
        f"- model: {report['model']['size']} random weights, built in {report['model']['build_s']:.0f} s; "
        f"{report['tokens']} speech tokens per call; text: {report['text']!r}",
        "",
        "| variant | request | first audio ours (ms) | upstream (ms) | RTF ours | RTF upstream |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["variants"]:
        for r in row["per_request"]:
            lines.append(
                f"| {row['variant']} | {r['request']} | {_ms(r['ours_first_ms'])} | {_ms(r['upstream_first_ms'])} | "
                f"{_rtf(r['ours_rtf'])} | {_rtf(r['upstream_rtf'])} |"
            )
    lines += [
        "",
        "| variant | N at once | first audio ours (ms) | upstream (ms) | RTF ours | RTF upstream | ours refused | "
        "behind real time ours / upstream |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["variants"]:
        for c in row["concurrent"]:
            lines.append(
                f"| {row['variant']} | {c['n']} | {_ms(c['ours_first_ms'])} | {_ms(c['upstream_first_ms'])} | "
                f"{_rtf(c['ours_rtf'])} | {_rtf(c['upstream_rtf'])} | {c['ours_refused']} | "
                f"{c['ours_behind']} / {c['upstream_behind']} |"
            )
    lines += ["", "| variant | VRAM peak (torch, MiB) | VRAM device in use (MiB) | peak RSS (MiB) | wall (s) |"]
    lines.append("|---|---:|---:|---:|---:|")
    for row in report["variants"]:
        lines.append(
            f"| {row['variant']} | {row.get('vram_peak_allocated_mb', '-')} | {row.get('vram_device_used_mb', '-')} | "
            f"{row.get('peak_rss_mb', '-')} | {row['wall_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def run_check(args: argparse.Namespace) -> int:
    """Build the model, run each variant in its own process, write report.json and report.md."""
    import torch

    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    facts = machine_facts()
    print(f"gpu-check: {facts.get('gpu')}; {facts['cuda_fit']}; torch {facts['torch']}", flush=True)
    gpu = bool(torch.cuda.is_available())
    if not gpu and not args.cpu_smoke:
        print(f"gpu-check: no CUDA GPU visible to torch ({facts['cuda_fit']}); --cpu-smoke runs on the CPU")
        return 2
    repo = args.repo or default_repo()
    if repo is None:
        print("gpu-check: no CosyVoice checkout: --repo DIR, $COSYVOICE_REPO, or $WHEELHOUSE from script/wheelhouse")
        return 2
    size = "tiny" if args.cpu_smoke else args.size
    work = out / "work"
    model = args.model or work / f"cosyvoice2-{size}-random"
    build_s = 0.0
    if args.model is None:
        print(f"gpu-check: building a {size} CosyVoice2 model with random weights in {model}", flush=True)
        build_s = build_model(repo, model, size, out / "build.log")
    report: dict[str, Any] = {
        "cpu_smoke": args.cpu_smoke,
        "machine": facts,
        "model": {"path": str(model), "size": size, "build_s": build_s},
        "tokens": args.tokens,
        "requests": args.requests,
        "levels": args.levels,
        "text": TEXT,
        "variants": [],
        "failed": [],
    }
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), "HF_HUB_OFFLINE": "1"}
    for variant in variants(gpu, args.precisions):
        config = write_config(work / variant, repo, model, variant, gpu)
        result_path, log = work / variant / "result.json", out / f"{variant}.log"
        command = [sys.executable, str(Path(__file__).resolve()), "--variant", "--config", str(config)]
        command += ["--json", str(result_path), "--tokens", str(args.tokens), "--requests", str(args.requests)]
        command += ["--rounds", str(args.rounds), "--levels", *map(str, args.levels)]
        print(f"gpu-check: {variant} (log: {log})", flush=True)
        with log.open("w") as handle:
            code = subprocess.call(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
        if code or not result_path.is_file():
            report["failed"].append({"variant": variant, "exit": code, "log": str(log)})
            print(f"gpu-check: {variant} failed (exit {code}); see {log}", flush=True)
            continue
        report["variants"].append(summary_row(variant, json.loads(result_path.read_text())))
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown(report))
    print((out / "report.md").read_text())
    print(f"gpu-check: wrote {out / 'report.json'} and {out / 'report.md'}")
    return 1 if report["failed"] else 0


def main() -> int:
    """Parse flags; the parent run, or one variant in a child process (--variant)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for report.json, report.md and the logs")
    parser.add_argument("--cpu-smoke", action="store_true", help="the same path on the CPU with the tiny model")
    parser.add_argument("--repo", type=Path, help="CosyVoice checkout (default: $COSYVOICE_REPO or $WHEELHOUSE)")
    parser.add_argument("--model", type=Path, help="use this model directory instead of building one")
    parser.add_argument("--size", default="0.5b", choices=("0.5b", "tiny"), help="model size to build on a GPU")
    parser.add_argument("--precisions", nargs="+", default=None, choices=("fp32", "fp16"), help="default fp32 fp16")
    parser.add_argument("--tokens", type=int, default=None, help="speech tokens per call (GPU 100; smoke 20)")
    parser.add_argument("--requests", type=int, default=None, help="sequential requests per path (GPU 5; smoke 1)")
    parser.add_argument("--levels", type=int, nargs="+", default=None, help="N at once (GPU 1 4 8; smoke 1 2)")
    parser.add_argument("--rounds", type=int, default=1, help="batches per level and path")
    parser.add_argument("--variant", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    smoke = args.cpu_smoke
    args.precisions = args.precisions or (["fp32"] if smoke else ["fp32", "fp16"])
    args.tokens = args.tokens if args.tokens is not None else (20 if smoke else 100)
    args.requests = args.requests if args.requests is not None else (1 if smoke else 5)
    args.levels = args.levels or ([1, 2] if smoke else [1, 4, 8])
    if args.variant:
        return run_variant(args)
    if args.out is None:
        parser.error("--out is required")
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
