"""Concurrent requests on one model (`run_benchmarks.py --gpu --gpu-levels 1 2 4 8`): N requests at once through our
engine against N threads calling upstream's own `inference_zero_shot(stream=True)` on one upstream model.

Per request: time to first audio, total time, audio made, and how far playback that starts at the first chunk would
have run dry (`stall`: for some chunk, its arrival minus the first chunk's arrival exceeds the audio before it; > 0
means the listener hears a gap: "fell behind real time"). Ours can also refuse a request (ServerBusy: every slot and
the queue taken, or the measured costs say one more stream would make the others fall behind); upstream never
refuses. The two paths alternate per level (which one goes first alternates too), in one process, so load from other
jobs hits both alike. On a CPU run it with OMP_WAIT_POLICY=PASSIVE (run_benchmarks.py --gpu sets it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from wyoming_cosyvoice.engine import Engine, SynthesisOptions
from wyoming_cosyvoice.errors import ServerBusy
from wyoming_cosyvoice.voices import VoiceProfile


@dataclasses.dataclass
class Outcome:
    """One request of a concurrent batch."""

    first_ms: float = 0.0
    total_ms: float = 0.0
    audio_s: float = 0.0
    stall_s: float = 0.0
    chunks: int = 0
    end: str = "done"
    """done, refused (ServerBusy) or the error's class name."""

    @property
    def rtf(self) -> float:
        """Total time / audio."""
        return self.total_ms / 1000.0 / self.audio_s if self.audio_s > 0 else float("nan")


class Timeline:
    """Chunk arrivals of one request: first audio and how far playback from the first chunk would run dry."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first: Optional[float] = None
        self.audio = 0.0
        self.stall = 0.0
        self.chunks = 0

    def chunk(self, seconds: float) -> None:
        """A chunk of `seconds` of audio arrived now."""
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.stall = max(self.stall, now - self.first - self.audio)
        self.audio += seconds
        self.chunks += 1

    def outcome(self, end: str = "done") -> Outcome:
        """The request's figures."""
        finished = time.perf_counter()
        first = (self.first - self.started) * 1000.0 if self.first is not None else 0.0
        total = (finished - self.started) * 1000.0
        return Outcome(first, total, self.audio, self.stall, self.chunks, end)


async def ours_once(engine: Engine, profile: VoiceProfile, text: str) -> Outcome:
    """One request through our engine (in process), timed per chunk."""
    line = Timeline()
    chunks = engine.synthesize(text, profile, SynthesisOptions())
    try:
        async for chunk in chunks:
            line.chunk(chunk.seconds)
    except ServerBusy:
        return line.outcome("refused")
    except Exception as err:  # a failure is a row of the table, not the end of the run
        return line.outcome(type(err).__name__)
    finally:
        await chunks.aclose()
    return line.outcome()


def upstream_once(model: Any, text: str, prompt_text: str, prompt_wav: Path) -> Outcome:
    """One upstream `inference_zero_shot(stream=True)` call (on the calling thread), timed per chunk."""
    line = Timeline()
    try:
        for out in model.inference_zero_shot(text, prompt_text, str(prompt_wav), stream=True):
            line.chunk(int(out["tts_speech"].shape[1]) / model.sample_rate)
    except Exception as err:
        return line.outcome(type(err).__name__)
    return line.outcome()


async def ours_batch(engine: Engine, profile: VoiceProfile, text: str, n: int) -> tuple[list[Outcome], float]:
    """`n` requests at once through our engine; their outcomes and the batch's wall time."""
    started = time.perf_counter()
    outcomes = await asyncio.gather(*(ours_once(engine, profile, text) for _ in range(n)))
    return list(outcomes), time.perf_counter() - started


async def upstream_batch(
    model: Any, text: str, prompt_text: str, prompt_wav: Path, n: int
) -> tuple[list[Outcome], float]:
    """`n` threads calling upstream at once (released together); their outcomes and the batch's wall time."""
    gate = threading.Barrier(n)

    def call() -> Outcome:
        gate.wait()
        return upstream_once(model, text, prompt_text, prompt_wav)

    started = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        outcomes = await asyncio.gather(*(asyncio.wrap_future(pool.submit(call)) for _ in range(n)))
    return list(outcomes), time.perf_counter() - started


def summarize(outcomes: list[Outcome], wall_s: float) -> dict[str, Any]:
    """A level's figures for one path: requests, refused, failed, first audio (median, worst), fell behind, RTF."""
    served = [o for o in outcomes if o.end == "done"]
    firsts = sorted(o.first_ms for o in served)
    return {
        "requests": len(outcomes),
        "refused": sum(1 for o in outcomes if o.end == "refused"),
        "failed": sum(1 for o in outcomes if o.end not in ("done", "refused")),
        "first_median_ms": statistics.median(firsts) if firsts else float("nan"),
        "first_worst_ms": firsts[-1] if firsts else float("nan"),
        "behind": sum(1 for o in served if o.stall_s > 0),
        "max_stall_ms": max((o.stall_s for o in served), default=0.0) * 1000.0,
        "rtf_median": statistics.median(o.rtf for o in served) if served else float("nan"),
        "x_real_time": sum(o.audio_s for o in served) / wall_s if wall_s > 0 else float("nan"),
        "audio_median_s": statistics.median(o.audio_s for o in served) if served else 0.0,
    }


async def concurrency_sweep(
    engine: Engine,
    profile: VoiceProfile,
    upstream: Any,
    prompt_text: str,
    text: str,
    levels: list[int],
    rounds: int = 2,
    batching: bool = False,
) -> list[dict[str, Any]]:
    """Per level: `rounds` batches of N requests per path, alternated; the pooled figures per path and ratios.
    `batching`: a third path, ours with batched flow passes off (the same loaded engine, its batch bound set to 1
    for that path only), so batched and unbatched passes are compared in one run."""
    assert profile.reference_audio is not None
    scheduler = getattr(getattr(engine, "scheduling", None), "scheduler", None)
    if batching and scheduler is None:
        raise SystemExit("--gpu-batch-compare needs the CosyVoice engine with its own streaming loop")
    bound = scheduler.max_batch if scheduler is not None else 1
    paths = ["ours", "upstream"] + (["ours_unbatched"] if batching else [])
    rows = []
    for level in levels:
        pooled: dict[str, list[Outcome]] = {k: [] for k in paths}
        walls: dict[str, float] = {k: 0.0 for k in paths}
        for r in range(rounds):
            shift = (r + level) % len(paths)
            for which in paths[shift:] + paths[:shift]:
                if which == "upstream":
                    outcomes, wall = await upstream_batch(upstream, text, prompt_text, profile.reference_audio, level)
                else:
                    if scheduler is not None:
                        scheduler.max_batch = 1 if which == "ours_unbatched" else bound
                    outcomes, wall = await ours_batch(engine, profile, text, level)
                    if scheduler is not None:
                        scheduler.max_batch = bound
                pooled[which] += outcomes
                walls[which] += wall
        summaries = {k: summarize(pooled[k], walls[k]) for k in paths}
        ours, theirs = summaries["ours"], summaries["upstream"]
        row = {
            "level": level,
            "rounds": rounds,
            **summaries,
            "first_median_ratio": _ratio(theirs["first_median_ms"], ours["first_median_ms"]),
            "first_worst_ratio": _ratio(theirs["first_worst_ms"], ours["first_worst_ms"]),
            "rtf_ratio": _ratio(theirs["rtf_median"], ours["rtf_median"]),
            "runs": {k: [dataclasses.asdict(o) for o in v] for k, v in pooled.items()},
        }
        if batching:
            row["batched_flow"] = engine.health().get("batched_flow")
        rows.append(row)
        for k in paths:
            a = summaries[k]
            print(
                f"  {level} at once, {k}: first audio median/worst {a['first_median_ms']:.0f}/"
                f"{a['first_worst_ms']:.0f} ms; behind {a['behind']}; refused {a['refused']}; failed {a['failed']}; "
                f"RTF {a['rtf_median']:.3f}; x real time {a['x_real_time']:.2f}",
                flush=True,
            )
    return rows


def batching_markdown(rows: list[dict[str, Any]]) -> str:
    """Batched flow passes against unbatched ones and upstream's threads, one row per level and path."""
    lines = [
        "| at once | path | requests | first audio median (ms) | worst (ms) | fell behind | refused | failed | "
        "RTF median | audio x real time |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"ours": "ours, batched flow", "ours_unbatched": "ours, unbatched", "upstream": "upstream threads"}
    for row in rows:
        for key in ("ours", "ours_unbatched", "upstream"):
            a = row.get(key)
            if a is None:
                continue
            lines.append(
                f"| {row['level']} | {names[key]} | {a['requests']} | {a['first_median_ms']:.0f} | "
                f"{a['first_worst_ms']:.0f} | {a['behind']} | {a['refused']} | {a['failed']} | {a['rtf_median']:.3f} | "
                f"{a['x_real_time']:.2f} |"
            )
    return "\n".join(lines)


def concurrency_markdown(rows: list[dict[str, Any]]) -> str:
    """The table for docs/benchmarks.md (ratios: upstream / ours, > 1 = ours better)."""
    lines = [
        "| at once | requests (each path) | first audio median, ours / upstream (ms) | ratio | worst, ours / upstream "
        "(ms) | ratio | fell behind, ours / upstream | max stall, ours / upstream (ms) | refused, ours | failed, "
        "ours / upstream | RTF median, ours / upstream | x real time, ours / upstream |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        a, b = row["ours"], row["upstream"]
        lines.append(
            f"| {row['level']} | {a['requests']} | {a['first_median_ms']:.0f} / {b['first_median_ms']:.0f} | "
            f"{row['first_median_ratio']:.2f} | {a['first_worst_ms']:.0f} / {b['first_worst_ms']:.0f} | "
            f"{row['first_worst_ratio']:.2f} | {a['behind']} / {b['behind']} | {a['max_stall_ms']:.0f} / "
            f"{b['max_stall_ms']:.0f} | {a['refused']} | {a['failed']} / {b['failed']} | {a['rtf_median']:.3f} / "
            f"{b['rtf_median']:.3f} | {a['x_real_time']:.2f} / {b['x_real_time']:.2f} |"
        )
    return "\n".join(lines)


def _ratio(upstream: float, ours: float) -> float:
    return upstream / ours if ours and ours == ours else float("nan")
