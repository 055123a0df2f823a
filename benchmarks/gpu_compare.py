"""GPU part of run_benchmarks.py (`--gpu`): our CosyVoice engine with prepared voices against upstream CosyVoice's
own `inference_zero_shot(stream=True)` loop, on the same GPU, the same model directory and the same text.

Both paths run the same upstream LLM class, patched here to emit exactly `tokens` speech tokens per text segment
(random weights rarely stop on their own; a fixed count makes both do equal work). Upstream's model object is
loaded once and reused for every request, as a server built on it would do (so its hop-length growth between
calls is part of what is measured), after one non-streaming warm-up call (kernels primed; the hop untouched, as
upstream grows it only while streaming). Figures are reported per request index (request 1, 2, 3...), ours and
upstream's alternated (which goes first alternates too), because upstream's first chunk changes from its second
streaming request on. Needs torch, the CosyVoice checkout (`engines.cosyvoice.repo`) and a model
(`engines.cosyvoice.model_dir`; random weights are fine for timing). Upstream's model is built with the class and
load options (fp16, TensorRT, JIT, vLLM) that our engine chose on this GPU, so both run the same configuration.
On a CPU, run it with OMP_WAIT_POLICY=PASSIVE (run_benchmarks.py --gpu sets it): with OpenMP's default
spin-waiting the LLM thread and the flow thread inflate each other's CPU time 4-6x on a busy machine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from wyoming_cosyvoice.bench import BenchSettings, percentile, run_bench
from wyoming_cosyvoice.config import Config, load_config
from wyoming_cosyvoice.engine import Engine, SynthesisOptions
from wyoming_cosyvoice.plugins import Plugins
from wyoming_cosyvoice.routing import Engines
from wyoming_cosyvoice.server import Server, build_catalog
from wyoming_cosyvoice.service import Service
from wyoming_cosyvoice.voices import VoiceProfile

COSYVOICE3_PROMPT_PREFIX = "You are a helpful assistant.<|endofprompt|>"


class ForcedTokens:
    """Patches upstream's Qwen2LM (CosyVoice 2 and 3) so every LLM call yields exactly `count` speech tokens."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.calls: list[int] = []
        """Tokens actually yielded per LLM call (checked after the run)."""

    def install(self) -> None:
        """Replace `Qwen2LM.inference_wrapper` (used by `inference`; min_len = max_len = count) and keep its
        sampler off every stop token until then; 0 = leave the model alone."""
        if not self.count:
            return
        try:
            from cosyvoice.llm import llm as llm_module
        except ImportError as err:
            raise SystemExit(
                f"--gpu-tokens needs upstream's cosyvoice.llm.llm ({err}); --gpu-tokens 0 skips it"
            ) from None

        original: Callable[..., Any] = llm_module.Qwen2LM.inference_wrapper
        forced = self

        def inference_wrapper(self: Any, lm_input: Any, sampling: int, min_len: int, max_len: int, uuid: str) -> Any:
            produced = 0
            for token in original(self, lm_input, sampling, forced.count, forced.count, uuid):
                produced += 1
                yield token
            forced.calls.append(produced)

        llm_module.Qwen2LM.inference_wrapper = inference_wrapper

        # `min_len` only masks the end-of-speech token; random weights can still draw one of the other stop tokens
        # (CosyVoice 2 has 3, CosyVoice 3 has 200) and end the call early. Mask them all while the minimum holds.
        sampling_ids: Callable[..., Any] = llm_module.Qwen2LM.sampling_ids

        def no_stop_sampling_ids(
            self: Any, weighted_scores: Any, decoded_tokens: Any, sampling: int, ignore_eos: bool = True
        ) -> Any:
            if ignore_eos:
                stops = [t for t in getattr(self, "stop_token_ids", []) if t < weighted_scores.shape[-1]]
                weighted_scores[stops] = -float("inf")
            return sampling_ids(self, weighted_scores, decoded_tokens, sampling, ignore_eos)

        llm_module.Qwen2LM.sampling_ids = no_stop_sampling_ids


def _setting_path(config: Config, data: dict[str, Any], key: str) -> Path:
    value = data.get(key)
    if not value:
        raise SystemExit(f"--gpu needs engines.cosyvoice.{key} in {config.source}")
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else config.base_dir / path


def _soundfile_load_wav(wav: Any, target_sr: int, min_sr: int = 16000) -> Any:
    """upstream's load_wav through soundfile (torchaudio >= 2.9 needs torchcodec for `load`); same tensor out."""
    import soundfile
    import torch
    import torchaudio

    data, rate = soundfile.read(wav, dtype="float32", always_2d=True)
    speech = torch.from_numpy(data.mean(axis=1)).unsqueeze(0)
    if rate != target_sr:
        assert rate >= min_sr, f"wav sample rate {rate} must be at least {min_sr}"
        speech = torchaudio.functional.resample(speech, rate, target_sr)
    return speech


def load_upstream(
    engine: Engine, repo: Path, model_dir: Path, data: dict[str, Any], prompt_wav: Path
) -> tuple[Any, str]:
    """Upstream's model with the class and load options our engine chose (fp16, TensorRT, ...), and a note."""
    for path in (repo, repo / "third_party" / "Matcha-TTS"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    from cosyvoice.cli import cosyvoice as cli
    from cosyvoice.cli import frontend
    from cosyvoice.utils import file_utils

    notes = []
    try:
        file_utils.load_wav(str(prompt_wav), 16000)
    except Exception as err:  # torchaudio without a working `load` backend: swap in the same loader via soundfile
        file_utils.load_wav = frontend.load_wav = _soundfile_load_wav
        notes.append(f"load_wav via soundfile ({type(err).__name__} from torchaudio.load)")
    info, plan = getattr(engine, "info", None), getattr(engine, "plan", None)
    if info is not None and plan is not None:  # the cosyvoice engine's model facts and load plan
        kwargs: dict[str, Any] = {
            "load_trt": plan.load_trt,
            "fp16": plan.fp16,
            "trt_concurrent": int(data.get("trt_concurrent", 1)),
        }
        if info.version != 3:
            kwargs["load_jit"] = plan.load_jit
        if info.version != 1:
            kwargs["load_vllm"] = plan.load_vllm
        notes.append(f"upstream {info.class_name}({', '.join(f'{k}={v}' for k, v in kwargs.items())})")
        return getattr(cli, info.class_name)(str(info.path), **kwargs), "; ".join(notes)
    fp16 = data.get("fp16") is True
    notes.append(f"upstream AutoModel(fp16={fp16})")
    return cli.AutoModel(model_dir=str(model_dir), fp16=fp16), "; ".join(notes)


@dataclasses.dataclass
class Timing:
    """One request: first audio, total time, audio made, and the first chunk's audio."""

    first_ms: float
    total_ms: float
    audio_s: float
    first_chunk_s: float
    chunks: int

    @property
    def rtf(self) -> float:
        """Real-time factor: total time / audio."""
        return self.total_ms / 1000.0 / self.audio_s if self.audio_s > 0 else float("nan")

    def row(self) -> tuple[float, float, float]:
        """(first audio ms, total ms, audio s), as the tuple functions return."""
        return self.first_ms, self.total_ms, self.audio_s


def timed_upstream(model: Any, text: str, prompt_text: str, prompt_wav: Path, stream: bool = True) -> Timing:
    """One upstream `inference_zero_shot` call, timed."""
    started = time.perf_counter()
    first = 0.0
    samples, first_samples, chunks = 0, 0, 0
    for out in model.inference_zero_shot(text, prompt_text, str(prompt_wav), stream=stream):
        count = int(out["tts_speech"].shape[1])
        if not first:
            first, first_samples = time.perf_counter(), count
        samples += count
        chunks += 1
    end = time.perf_counter()
    rate = model.sample_rate
    return Timing((first - started) * 1000.0, (end - started) * 1000.0, samples / rate, first_samples / rate, chunks)


def time_upstream(model: Any, text: str, prompt_text: str, prompt_wav: Path) -> tuple[float, float, float]:
    """(first audio ms, total ms, audio s) of one upstream streaming call."""
    return timed_upstream(model, text, prompt_text, prompt_wav).row()


async def timed_ours(engine: Engine, profile: VoiceProfile, text: str) -> Timing:
    """One call of our engine, in process, timed."""
    started = time.perf_counter()
    first = 0.0
    audio, first_audio, count = 0.0, 0.0, 0
    chunks = engine.synthesize(text, profile, SynthesisOptions())
    try:
        async for chunk in chunks:
            if not first:
                first, first_audio = time.perf_counter(), chunk.seconds
            audio += chunk.seconds
            count += 1
    finally:
        await chunks.aclose()
    end = time.perf_counter()
    return Timing((first - started) * 1000.0, (end - started) * 1000.0, audio, first_audio, count)


async def time_ours(engine: Engine, profile: VoiceProfile, text: str) -> tuple[float, float, float]:
    """(first audio ms, total ms, audio s) of one call of our engine, in process."""
    return (await timed_ours(engine, profile, text)).row()


def per_request(ours: list[list[Timing]], theirs: list[list[Timing]]) -> list[dict[str, Any]]:
    """Request index -> both paths' medians over the repeats and the ratios (upstream / ours: > 1 = ours faster)."""
    rows = []
    for i in range(min(len(run) for run in ours + theirs)):
        a = [run[i] for run in ours]
        b = [run[i] for run in theirs]
        first_a, first_b = statistics.median(t.first_ms for t in a), statistics.median(t.first_ms for t in b)
        rtf_a, rtf_b = statistics.median(t.rtf for t in a), statistics.median(t.rtf for t in b)
        ratios = sorted(y.first_ms / x.first_ms for x, y in zip(a, b, strict=False) if x.first_ms)
        rows.append(
            {
                "request": i + 1,
                "samples": len(a),
                "ours_first_ms": first_a,
                "upstream_first_ms": first_b,
                "first_ratio": first_b / first_a if first_a else float("nan"),
                "first_ratio_range": [ratios[0], ratios[-1]] if ratios else [],
                "ours_rtf": rtf_a,
                "upstream_rtf": rtf_b,
                "rtf_ratio": rtf_b / rtf_a if rtf_a else float("nan"),
                "ours_first_chunk_s": statistics.median(t.first_chunk_s for t in a),
                "upstream_first_chunk_s": statistics.median(t.first_chunk_s for t in b),
                "ours_chunks": statistics.median(t.chunks for t in a),
                "upstream_chunks": statistics.median(t.chunks for t in b),
                "ours_audio_s": statistics.median(t.audio_s for t in a),
                "upstream_audio_s": statistics.median(t.audio_s for t in b),
            }
        )
    return rows


def per_request_markdown(rows: list[dict[str, Any]]) -> str:
    """The per-request table (medians over the repeats; the range of the per-pair first-audio ratio)."""
    lines = [
        "| request | runs | first audio, ours (ms) | first audio, upstream (ms) | upstream / ours (range) | RTF, ours "
        "| RTF, upstream | upstream / ours | first chunk, ours / upstream (s of audio) | chunks, ours / upstream |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        low, high = r["first_ratio_range"] or [float("nan")] * 2
        lines.append(
            f"| {r['request']} | {r['samples']} | {r['ours_first_ms']:.0f} | {r['upstream_first_ms']:.0f} | "
            f"{r['first_ratio']:.2f} ({low:.2f}-{high:.2f}) | {r['ours_rtf']:.3f} | {r['upstream_rtf']:.3f} | "
            f"{r['rtf_ratio']:.2f} | {r['ours_first_chunk_s']:.2f} / {r['upstream_first_chunk_s']:.2f} | "
            f"{r['ours_chunks']:g} / {r['upstream_chunks']:g} |"
        )
    return "\n".join(lines)


def _stats(rows: list[tuple[float, float, float]]) -> dict[str, Any]:
    ttfa = sorted(r[0] for r in rows)
    return {
        "requests": len(rows),
        "ttfa_median_ms": percentile(ttfa, 50),
        "ttfa_p90_ms": percentile(ttfa, 90),
        "ttfa_max_ms": ttfa[-1],
        "total_median_ms": statistics.median(r[1] for r in rows),
        "audio_median_s": statistics.median(r[2] for r in rows),
        "rtf_median": statistics.median(r[1] / 1000.0 / r[2] for r in rows if r[2] > 0),
    }


def gpu_facts() -> dict[str, Any]:
    """GPU model, driver, torch and CUDA versions."""
    import torch

    facts: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
    }
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    try:
        facts["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return facts


async def gpu_compare(
    config_path: Path,
    voice: Optional[str],
    tokens: int,
    requests: int,
    text: str,
    repeats: int = 1,
    levels: Sequence[int] = (),
    rounds: int = 2,
    batching: bool = False,
) -> dict[str, Any]:
    """Load both paths, warm both up, alternate requests (ours and upstream, the first of the pair alternating),
    print and return the per-request table and the summary. `repeats` > 1 loads upstream's model afresh (a new
    server built on it) and runs the requests again, so each request index gets that many samples (`requests` 0
    skips this part). `levels`: then N requests at once per path for each N, `rounds` batches each
    (benchmarks/concurrency.py), on the last upstream model loaded."""
    config = load_config(config_path)
    plugins = Plugins(config.server.plugins_dir)
    catalog = build_catalog(config, plugins)
    profile = catalog.resolve(voice, None)
    if profile.reference_audio is None or not profile.transcript:
        raise SystemExit(f"--gpu needs a voice with reference_audio and transcript (voice {profile.name!r} has not)")
    # Both paths clone the same way: zero-shot from the recording and its transcript.
    profile = dataclasses.replace(profile, mode="zero_shot")
    section = config.section("engines", "cosyvoice")
    data = dict(section.data)
    repo, model_dir = _setting_path(config, data, "repo"), _setting_path(config, data, "model_dir")

    print(
        f"GPU: our cosyvoice engine vs upstream inference_zero_shot(stream=True), {tokens} tokens per call:", flush=True
    )
    started = time.perf_counter()
    engine: Engine = plugins.factory("engines", "cosyvoice")(section)
    await engine.start()
    await engine.prepare([profile])
    ready_s = time.perf_counter() - started
    forced = ForcedTokens(tokens)
    forced.install()  # after start(): the engine put the checkout on the import path
    await engine.warmup()
    prompt_text = profile.transcript
    if (model_dir / "cosyvoice3.yaml").exists() and "<|endofprompt|>" not in prompt_text:
        prompt_text = COSYVOICE3_PROMPT_PREFIX + prompt_text

    ours_runs: list[list[Timing]] = []
    theirs_runs: list[list[Timing]] = []
    warmups: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    upstream: Any = None
    note = ""
    for run in range(repeats if requests else 0):
        upstream = None  # a fresh model object: upstream's hop state starts as loaded
        upstream, note = await asyncio.to_thread(load_upstream, engine, repo, model_dir, data, profile.reference_audio)
        # Upstream's warm-up: not streaming, so its hop length stays as loaded (ours warmed up in engine.warmup()).
        warm = await asyncio.to_thread(timed_upstream, upstream, text, prompt_text, profile.reference_audio, False)
        warmups.append(dataclasses.asdict(warm))
        print(f"  run {run + 1}: upstream loaded, warm-up (not streaming) {warm.total_ms:.0f} ms", flush=True)
        ours: list[Timing] = []
        theirs: list[Timing] = []
        for i in range(requests):
            pair: list[Any] = [None, None]
            for which in (0, 1) if (run + i) % 2 == 0 else (1, 0):
                if which == 0:
                    pair[0] = await timed_ours(engine, profile, text)
                else:
                    pair[1] = await asyncio.to_thread(
                        timed_upstream, upstream, text, prompt_text, profile.reference_audio
                    )
            a, b = pair
            ours.append(a)
            theirs.append(b)
            print(
                f"  request {i + 1}: first audio ours {a.first_ms:.0f} ms ({a.first_chunk_s:.2f} s chunk), upstream "
                f"{b.first_ms:.0f} ms ({b.first_chunk_s:.2f} s chunk); RTF ours {a.rtf:.3f}, upstream {b.rtf:.3f}",
                flush=True,
            )
        ours_runs.append(ours)
        theirs_runs.append(theirs)
    levels_rows: list[dict[str, Any]] = []
    if levels:
        from concurrency import batching_markdown, concurrency_markdown, concurrency_sweep  # benchmarks/concurrency.py

        if upstream is None:
            upstream, note = await asyncio.to_thread(
                load_upstream, engine, repo, model_dir, data, profile.reference_audio
            )
            await asyncio.to_thread(timed_upstream, upstream, text, prompt_text, profile.reference_audio, False)
        print(f"Concurrent requests on one model, {rounds} rounds per level (ours, upstream alternated):", flush=True)
        levels_rows = await concurrency_sweep(
            engine, profile, upstream, prompt_text, text, list(levels), rounds, batching
        )
        print("\n## Concurrent requests, ours vs upstream's own API from as many threads\n")
        print(batching_markdown(levels_rows) if batching else concurrency_markdown(levels_rows))

    def facts() -> dict:
        return {
            **gpu_facts(),
            "model_dir": str(model_dir),
            "engine_settings": data,
            "engine": engine.health(),
            "tokens_per_call": tokens,
            "llm_calls_tokens": sorted(set(forced.calls)),
            "adaptation": note,
            "engine_ready_s": ready_s,
            "voice": profile.name,
            "loadavg": [load_before, os.getloadavg()],
        }

    if not requests:
        return {"facts": facts(), "concurrency": levels_rows}

    # Ours through the server, as Home Assistant reaches it (same engine object, loopback, one client).
    service = Service(Engines(engine), catalog, max_concurrent=4)
    server = Server(service, "tcp://127.0.0.1:0")
    await server.start()
    try:
        served = await run_bench(
            BenchSettings(
                uri=f"tcp://127.0.0.1:{server.port}",
                text=text,
                voice=profile.name,
                requests=requests * repeats,
                warmup=1,
                timeout=600,
            )
        )
    finally:
        await server.shutdown(grace=5.0)
    summary = served.summary()
    result = {
        "facts": {**facts(), "upstream_warmups": warmups, "repeats": repeats},
        "per_request": per_request(ours_runs, theirs_runs),
        "concurrency": levels_rows,
        "runs": {
            "ours": [[dataclasses.asdict(t) for t in run] for run in ours_runs],
            "upstream": [[dataclasses.asdict(t) for t in run] for run in theirs_runs],
        },
        "ours_direct": _stats([t.row() for run in ours_runs for t in run]),
        "upstream": _stats([t.row() for run in theirs_runs for t in run]),
        "ours_server": {
            "requests": summary["requests"],
            "failed": summary["failed"],
            "ttfa_median_ms": summary["ttfa_ms"]["median"],
            "ttfa_p90_ms": summary["ttfa_ms"]["p90"],
            "rtf_median": summary["rtf"]["median"],
            "audio_median_s": summary["audio_s"]["median"],
        },
    }
    print("\n## CosyVoice engine vs upstream streaming loop, per request\n")
    print(per_request_markdown(result["per_request"]))
    print("\n## Summary\n")
    print("| path | requests | first audio median (ms) | p90 | max | total median (ms) | audio (s) | RTF median |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, key in (("ours (engine, prepared voice)", "ours_direct"), ("upstream inference_zero_shot", "upstream")):
        r = result[key]
        print(
            f"| {label} | {r['requests']} | {r['ttfa_median_ms']:.0f} | {r['ttfa_p90_ms']:.0f} | "
            f"{r['ttfa_max_ms']:.0f} | {r['total_median_ms']:.0f} | {r['audio_median_s']:.2f} | "
            f"{r['rtf_median']:.3f} |"
        )
    r = result["ours_server"]
    print(
        f"| ours through the server | {r['requests']} | {r['ttfa_median_ms']:.0f} | {r['ttfa_p90_ms']:.0f} | | | "
        f"{r['audio_median_s']:.2f} | {r['rtf_median']:.3f} |"
    )
    print(f"\nfacts: {result['facts']}")
    return result
