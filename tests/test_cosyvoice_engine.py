"""CosyVoice engine against the stand-in checkout (real API, sine "model"): modes, hop reset, cancellation, cache."""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

from wyoming_cosyvoice.audio import pcm16_to_float  # noqa: E402
from wyoming_cosyvoice.engine import SynthesisOptions  # noqa: E402
from wyoming_cosyvoice.errors import EngineError, EngineTimeout, EngineUnavailable, ServerBusy, VoiceError  # noqa: E402
from wyoming_cosyvoice.voices import VoiceProfile  # noqa: E402
from wyoming_cosyvoice_plugins.cosyvoice import loader as cosyvoice_loader  # noqa: E402
from wyoming_cosyvoice_plugins.cosyvoice.engine import CosyVoiceEngine  # noqa: E402
from wyoming_cosyvoice_plugins.cosyvoice.options import CosyVoiceSettings, LoadPlan  # noqa: E402

from .cosyvoice_support import STANDIN_REPO, dominant_frequency, forget_cosyvoice, make_model_dir, write_prompt  # noqa: E402

LONG_TEXT = "This sentence is long enough to stream in several chunks from the stand-in model, one after another."


@pytest.fixture(autouse=True)
def fresh_import() -> Any:
    forget_cosyvoice()
    yield
    forget_cosyvoice()


def settings(tmp_path: Path, version: int = 2, speakers: tuple[str, ...] = (), **overrides: Any) -> CosyVoiceSettings:
    model = make_model_dir(tmp_path / f"model-v{version}", version, speakers=speakers, **overrides.pop("knobs", {}))
    values: dict[str, Any] = dict(repo=STANDIN_REPO, model_dir=model, cache_dir=tmp_path / "cache", require_gpu=False)
    values.update(overrides)
    return CosyVoiceSettings(**values)


async def started(cfg: CosyVoiceSettings, profiles: tuple[VoiceProfile, ...] = ()) -> CosyVoiceEngine:
    engine = CosyVoiceEngine(cfg)
    await engine.start()
    await engine.prepare(profiles)
    return engine


async def speak(engine: CosyVoiceEngine, text: str, profile: VoiceProfile, speed: float = 1.0) -> list[np.ndarray]:
    chunks = []
    stream = engine.synthesize(text, profile, SynthesisOptions(speed=speed))
    async for chunk in stream:
        assert chunk.rate == engine.sample_rate and chunk.width == 2 and chunk.channels == 1
        chunks.append(pcm16_to_float(chunk.audio))
    return chunks


def voice(prompt: Path, **fields: Any) -> VoiceProfile:
    return VoiceProfile(name=fields.pop("name", "tars"), reference_audio=prompt, **fields)


async def test_zero_shot_streams_in_the_prompts_voice(tmp_path: Path) -> None:
    prompt = write_prompt(tmp_path / "tars.wav", pitch=180.0, rate=44100, channels=2)  # 44.1 kHz stereo: resampled
    engine = await started(settings(tmp_path), (tars := voice(prompt, mode="zero_shot", transcript="Hi there."),))
    try:
        chunks = await speak(engine, LONG_TEXT, tars)
        assert engine.sample_rate == 24000
        assert len(chunks) >= 2, "streamed in several chunks"
        assert len(chunks[0]) == 24000, "first chunk = 25 tokens (prompt of exactly 75 tokens needs no pad)"
        audio = np.concatenate(chunks)
        assert abs(dominant_frequency(audio, 24000) - 180.0) < 3.0
        assert 0.45 < float(np.abs(audio).max()) <= 0.5 + 1e-3
    finally:
        await engine.close()


async def test_token_hop_len_growth_is_reset_per_request(tmp_path: Path) -> None:
    prompt = write_prompt(tmp_path / "p.wav")
    engine = await started(settings(tmp_path), (tars := voice(prompt),))
    try:
        firsts = [len((await speak(engine, LONG_TEXT, tars))[0]) for _ in range(3)]
        assert firsts == [firsts[0]] * 3 and firsts[0] == 24000
        # The stand-in reproduces upstream's bug: called directly, later calls' first chunks are 5x longer
        # (hop 100 instead of 25, plus the prompt pad that the larger hop brings).
        model = engine.model
        spk = next(iter(engine._prepared.values())).spk_id
        model.model.tts = type(model.model).tts.__get__(model.model)  # the original, without our reset
        model.model.token_hop_len = 25
        direct = [
            list(model.inference_cross_lingual(LONG_TEXT, "", zero_shot_spk_id=spk, stream=True))[0]["tts_speech"]
            for _ in range(3)
        ]
        assert [d.shape[1] for d in direct] == [24000, 120000, 120000]
    finally:
        await engine.close()


async def test_cancel_stops_generation_and_leaves_nothing_behind(tmp_path: Path, thread_errors: list[Any]) -> None:
    prompt = write_prompt(tmp_path / "p.wav")
    engine = await started(settings(tmp_path, knobs={"token_s": 0.004}), (tars := voice(prompt),))
    try:
        full = sum(len(c) for c in await speak(engine, LONG_TEXT, tars))
        stream = engine.synthesize(LONG_TEXT * 3, tars, SynthesisOptions())
        first = await asyncio.wait_for(stream.__anext__(), 20)
        await stream.aclose()  # the client left
        await asyncio.wait_for(engine.run_in_worker(lambda: None), 30)  # worker idle again
        assert len(first.audio) // 2 < full
        inner = engine.model.model
        assert inner.tts_speech_token_dict == {} and inner.llm_end_dict == {} and inner.hift_cache_dict == {}
        assert engine.in_flight == engine.queued == 0
        # The next request is served normally, with a fresh hop length.
        assert len((await speak(engine, LONG_TEXT, tars))[0]) == 24000
        assert thread_errors == [], "the abandoned call's LLM thread must not crash"
    finally:
        await engine.close()


async def test_prepared_voices_are_cached_on_disk(tmp_path: Path) -> None:
    prompt = write_prompt(tmp_path / "p.wav", pitch=220.0)
    cfg = settings(tmp_path)
    tars = voice(prompt, mode="zero_shot", transcript="Hello there.")
    engine = await started(cfg, (tars,))
    first = await speak(engine, "Cached voices sound the same.", tars)
    assert (engine.cache.hits, engine.cache.misses) == (0, 1)
    await engine.close()
    engine = await started(cfg, (tars,))  # a restart: loaded from disk
    try:
        assert (engine.cache.hits, engine.cache.misses) == (1, 0)
        again = await speak(engine, "Cached voices sound the same.", tars)
        assert np.array_equal(np.concatenate(first), np.concatenate(again))
        assert health_value(engine, "prompt_cache") == "1 hits/0 computed"
        # Another transcript is another prompt: computed, not served from the old entry.
        await engine.prepare([voice(prompt, name="other", mode="zero_shot", transcript="Something else.")])
        assert (engine.cache.hits, engine.cache.misses) == (1, 1)
        assert len(list((tmp_path / "cache" / "voices").glob("*.pt"))) == 2
    finally:
        await engine.close()


def health_value(engine: CosyVoiceEngine, key: str) -> Any:
    return engine.health()[key]


async def test_cache_is_keyed_by_model_identity(tmp_path: Path) -> None:
    prompt = write_prompt(tmp_path / "p.wav")
    cfg = settings(tmp_path)
    engine = await started(cfg, (tars := voice(prompt),))
    await engine.close()
    (cfg.model_dir / "flow.pt").write_bytes((cfg.model_dir / "flow.pt").read_bytes() + b"\0" * 16)  # new model files
    engine = await started(cfg, (tars,))
    try:
        assert (engine.cache.hits, engine.cache.misses) == (0, 1)
    finally:
        await engine.close()


@pytest.mark.parametrize("version", [2, 3])
async def test_modes(tmp_path: Path, version: int) -> None:
    prompt = write_prompt(tmp_path / "p.wav", pitch=160.0, rate=16000)
    profiles = (
        voice(prompt, name="zs", mode="zero_shot", transcript="Hello there."),
        voice(prompt, name="xl", mode="cross_lingual"),
        voice(prompt, name="ins", mode="instruct", instruct="Speak cheerfully."),
    )
    engine = await started(settings(tmp_path, version=version), profiles)
    try:
        tokens = {}
        for profile in profiles:
            audio = np.concatenate(await speak(engine, "One two three.", profile))
            assert abs(dominant_frequency(audio, 24000) - 160.0) < 3.0, profile.name
            prepared = engine._voice(profile)
            entry = engine.model.frontend.spk2info[prepared.spk_id]
            tokens[profile.name] = (prepared.method, entry["prompt_text"][0].tolist())
        assert tokens["zs"][0] == "zero_shot" and tokens["ins"][0] == "instruct2"
        assert tokens["ins"][1][-1] == 151646, "instruction ends with <|endofprompt|>"
        if version == 3:
            # CosyVoice 3 asserts <|endofprompt|> is in the prompt: the system prefix is added for every mode.
            assert 151646 in tokens["zs"][1] and tokens["xl"] == ("instruct2", tokens["xl"][1])
            assert 151646 in tokens["xl"][1]
        else:
            assert 151646 not in tokens["zs"][1] and tokens["xl"][0] == "cross_lingual"
    finally:
        await engine.close()


async def test_cosyvoice1_sft_and_instruct_at_22050(tmp_path: Path) -> None:
    cfg = settings(tmp_path, version=1, speakers=("英文女", "中文男"))
    profiles = (
        VoiceProfile(name="sft", mode="sft", speaker="中文男"),
        VoiceProfile(name="ins", mode="instruct", speaker="英文女", instruct="Calm."),
        VoiceProfile(name="bad", mode="sft", speaker="nobody"),
    )
    engine = await started(cfg, profiles[:2])
    try:
        with pytest.raises(VoiceError, match="voice 'bad': mode sft needs `speaker`"):
            await engine.prepare(profiles[2:])
        assert engine.sample_rate == 22050
        audio = np.concatenate(await speak(engine, LONG_TEXT, profiles[0]))
        assert abs(dominant_frequency(audio, 22050) - 250.0) < 3.0
        audio = np.concatenate(await speak(engine, "Short one.", profiles[1]))
        assert abs(dominant_frequency(audio, 22050) - 200.0) < 3.0
        assert engine.health()["voices_failed"] == "bad"
        with pytest.raises(
            VoiceError, match=r"voice 'bad': mode sft needs `speaker` set to a built-in speaker \(英文女, 中文男\)"
        ):
            await speak(engine, "Hello.", profiles[2])
    finally:
        await engine.close()


async def test_voice_errors_are_one_line(tmp_path: Path) -> None:
    prompt = write_prompt(tmp_path / "p.wav")
    engine = await started(settings(tmp_path))
    cases = [
        (VoiceProfile(name="a", mode="zero_shot", reference_audio=prompt), "mode zero_shot needs the transcript"),
        (VoiceProfile(name="b", mode="cross_lingual"), "voice 'b': mode cross_lingual needs reference_audio"),
        (VoiceProfile(name="c", mode="instruct", reference_audio=prompt), "mode instruct needs `instruct` text"),
        (VoiceProfile(name="d", mode="sft", speaker="x"), "none: this model has no built-in speakers"),
        (
            voice(write_prompt(tmp_path / "8k.wav", rate=8000), name="e"),
            "sample rate 8000 Hz is below the minimum of 16000 Hz",
        ),
        (
            voice(
                write_prompt(tmp_path / "long.wav", seconds=31.0, rate=16000),
                name="f",
                mode="zero_shot",
                transcript="Too long for a transcript.",
            ),
            "31.0 s of sound is longer than 30 s",
        ),
        (voice(tmp_path / "none.wav", name="g"), "file not found"),
    ]
    try:
        for profile, expected in cases:
            with pytest.raises(VoiceError) as err:
                await speak(engine, "Hello.", profile)
            assert expected in str(err.value) and "\n" not in str(err.value)
    finally:
        await engine.close()


async def test_text_traps_and_speed(tmp_path: Path) -> None:
    prompt = write_prompt(tmp_path / "p.wav")
    engine = await started(settings(tmp_path), (tars := voice(prompt),))
    try:
        for text in ("", "   \n ", "...!?", "。，"):
            assert await speak(engine, text, tars) == [], repr(text)
        normal = np.concatenate(await speak(engine, "Speed test sentence.", tars))
        fast = await speak(engine, "Speed test sentence.", tars, speed=2.0)
        assert len(fast) == 1, "speed != 1 is synthesized whole (upstream ignores speed while streaming)"
        assert abs(len(fast[0]) - len(normal) / 2) <= 2
    finally:
        await engine.close()


async def test_queue_bound(tmp_path: Path) -> None:
    """`concurrency` requests in flight, `max_queue` waiting for a slot, the next one refused."""
    prompt = write_prompt(tmp_path / "p.wav")
    cfg = settings(tmp_path, max_queue=1, concurrency=1, knobs={"token_s": 0.02})
    engine = await started(cfg, (tars := voice(prompt),))
    try:
        first = engine.synthesize(LONG_TEXT * 3, tars, SynthesisOptions())
        await asyncio.wait_for(first.__anext__(), 20)
        assert (engine.in_flight, engine.queued) == (1, 0)
        second = asyncio.ensure_future(speak(engine, "Me too.", tars))
        for _ in range(200):
            if engine.queued == 1:
                break
            await asyncio.sleep(0.01)
        assert (engine.in_flight, engine.queued) == (1, 1)
        assert (engine.health()["in_flight"], engine.health()["queued"]) == (1, 1)
        with pytest.raises(ServerBusy, match=r"cosyvoice engine busy: 1 requests in flight, 1 queued \(concurrency 1"):
            await speak(engine, "And me.", tars)
        await first.aclose()
        assert len(await asyncio.wait_for(second, 30)) >= 1, "the queued request is served once the slot is free"
    finally:
        await engine.close()


async def test_upstream_logging_and_progress_bars_are_silenced(tmp_path: Path, capfd: Any) -> None:
    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    root = logging.getLogger()
    saved = list(root.handlers), root.level
    ours = Collect()
    for handler in saved[0]:
        root.removeHandler(handler)
    root.addHandler(ours)  # as the CLI configures logging: one handler, INFO
    root.setLevel(logging.INFO)
    try:
        engine = await started(settings(tmp_path), (tars := voice(write_prompt(tmp_path / "p.wav")),))
        assert root.level == logging.INFO and root.handlers == [ours], "upstream's basicConfig(DEBUG) was undone"
        await speak(engine, "Quiet please.", tars)
        logging.warning("a root-logger warning, as upstream logs them")
        await engine.close()
    finally:
        root.removeHandler(ours)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    messages = [(r.name, r.levelno, r.getMessage()) for r in ours.records]
    assert any(name.endswith("cosyvoice.engine") and "Loaded CosyVoice2" in text for name, _, text in messages)
    assert not [m for m in messages if m[0] == "root" and m[1] < logging.WARNING], "upstream per-chunk INFO dropped"
    assert ("root", logging.WARNING, "a root-logger warning, as upstream logs them") in messages
    err = capfd.readouterr().err
    assert "[progress]" not in err and "it/s]" not in err  # stand-in bar, or the real tqdm when installed


async def test_warmup_checks_output_is_finite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # fp16 NaN output needs a GPU; the stand-in simulates it when the class is asked for fp16.
    real_plan = cosyvoice_loader.plan_load
    forced: dict[str, Any] = {}

    def gpu_plan(*args: Any, **kwargs: Any) -> LoadPlan:
        real_plan(*args, **kwargs)  # the real checks still run
        return LoadPlan("cuda", True, forced["auto"], False, False, False, ("pretend GPU",))

    monkeypatch.setattr(cosyvoice_loader, "plan_load", gpu_plan)
    forced["auto"] = True
    engine = await started(settings(tmp_path, knobs={"nonfinite_if_fp16": True}))
    try:
        await engine.warmup()  # NaN in fp16 -> reloaded in fp32
        assert engine.health()["precision"] == "fp32" and engine.state == "ready"
    finally:
        await engine.close()
    forced["auto"] = False
    engine = await started(settings(tmp_path, knobs={"nonfinite_if_fp16": True}))
    try:
        with pytest.raises(
            EngineError, match="fp16 warm-up produced NaN/inf audio on this GPU; set engines.cosyvoice.fp16: false"
        ):
            await engine.warmup()
    finally:
        await engine.close()


async def test_start_errors(tmp_path: Path) -> None:
    cases: list[tuple[CosyVoiceSettings, str]] = [
        (settings(tmp_path, require_gpu=True), "no CUDA GPU visible to torch"),
        (settings(tmp_path, repo=tmp_path / "nope"), "CosyVoice checkout"),
        (settings(tmp_path, model_dir=None), "engines.cosyvoice.model_dir is not set"),
    ]
    broken = tmp_path / "broken"
    (broken / "cosyvoice" / "cli").mkdir(parents=True)
    (broken / "third_party" / "Matcha-TTS" / "matcha").mkdir(parents=True)
    (broken / "cosyvoice" / "__init__.py").write_text("")
    (broken / "cosyvoice" / "cli" / "__init__.py").write_text("")
    (broken / "cosyvoice" / "cli" / "cosyvoice.py").write_text("import hyperpyyaml_not_installed\n")
    cases.append((settings(tmp_path, repo=broken), "missing Python package 'hyperpyyaml_not_installed'"))
    # What to install is named exactly, also where the import name is not the pip name.
    failures = {
        "raise ModuleNotFoundError(\"No module named 'whisper'\", name='whisper')": (
            "missing Python package 'whisper' (pip install 'openai-whisper')"
        ),
        "raise ModuleNotFoundError(\"No module named 'x_transformers'\", name='x_transformers')": (
            "missing Python package 'x_transformers' (pip install 'x-transformers')"
        ),
        "raise ImportError(\"cannot import name 'Qwen2ForCausalLM'\", name='transformers')": (
            "does not fit: pip install 'transformers>=4.51.3,<4.53')"
        ),
        "raise OSError('Could not load this library: torchaudio/lib/libtorchaudio.so')": ("torchaudio"),
    }
    for n, (code, expected) in enumerate(failures.items()):
        checkout = tmp_path / f"broken{n}"
        shutil.copytree(broken, checkout)
        (checkout / "cosyvoice" / "cli" / "cosyvoice.py").write_text(code + "\n")
        cases.append((settings(tmp_path, repo=checkout), expected))
    for cfg, expected in cases:
        forget_cosyvoice()
        engine = CosyVoiceEngine(cfg)
        with pytest.raises(EngineUnavailable) as err:
            await engine.start()
        assert expected in str(err.value) and "\n" not in str(err.value)
        assert engine.state == "failed"
        await engine.close()


async def test_forget_drops_spk2info_entries_but_keeps_shared_ones_and_the_disk_cache(tmp_path: Path) -> None:
    low, high = write_prompt(tmp_path / "low.wav", pitch=150.0), write_prompt(tmp_path / "high.wav", pitch=260.0)
    a, b = voice(low, name="a"), voice(high, name="b")
    twin = voice(low, name="twin", speed=1.5)  # same prompt as `a`: the same speaker entry
    engine = await started(settings(tmp_path), (a, b, twin))
    try:
        spk2info = engine.model.frontend.spk2info
        ids = {p.name: engine._voice(p).spk_id for p in (a, b, twin)}
        assert ids["a"] == ids["twin"] != ids["b"] and {ids["a"], ids["b"]} <= set(spk2info)
        cached = sorted((tmp_path / "cache" / "voices").glob("*.pt"))
        assert len(cached) == 2 and health_value(engine, "voices_prepared") == 3

        threads: list[str] = []
        drop = engine._drop
        engine._drop = lambda names: (threads.append(threading.current_thread().name), drop(names))[1]  # type: ignore[method-assign]
        await engine.forget(["b"])
        assert ids["b"] not in spk2info and ids["a"] in spk2info
        assert threads and threads[0].startswith("cosyvoice-worker")  # on the thread that owns the model
        await engine.forget(["a"])
        assert ids["a"] in spk2info, "still used by twin"
        await engine.forget(["twin", "never-prepared"])
        assert ids["a"] not in spk2info and not any(k.startswith("wcv-") for k in spk2info)
        assert engine._prepared == {} and health_value(engine, "voices_prepared") == 0
        assert sorted((tmp_path / "cache" / "voices").glob("*.pt")) == cached  # kept: keyed by content

        # The voice comes back: prepared from the disk cache, and it speaks in its own voice again.
        await engine.prepare([b])
        assert (engine.cache.hits, engine.cache.misses) == (1, 2)
        assert ids["b"] in spk2info
        audio = np.concatenate(await speak(engine, LONG_TEXT, b))
        assert abs(dominant_frequency(audio, 24000) - 260.0) < 3.0
    finally:
        await engine.close()


async def test_a_missing_text_normalizer_is_a_warning_that_says_what_to_install(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The stand-in's frontend has no normalizer, as upstream's when neither ttsfrd nor wetext is installed.
    with caplog.at_level(logging.INFO, logger="wyoming_cosyvoice_plugins.cosyvoice.engine"):
        engine = await started(settings(tmp_path))
    try:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("No text normalizer" in w and "pip install wetext" in w for w in warnings), warnings
        assert health_value(engine, "text_normalizer") == "none"
    finally:
        await engine.close()


async def test_a_hung_pass_is_given_up_and_the_others_get_the_flow(tmp_path: Path, thread_errors: list[Any]) -> None:
    """A request whose flow + vocoder pass hangs (holding the shared flow) times out and its thread is replaced;
    the flow is free again for the request waiting behind it, which was not timed out while it waited."""
    prompt = write_prompt(tmp_path / "p.wav")
    cfg = settings(tmp_path, concurrency=2, keep_real_time=False)
    engine = await started(cfg, (tars := voice(prompt),))
    try:
        inner = engine.model.model
        token2wav, entered, release = inner.token2wav, threading.Event(), threading.Event()

        def wedged(*args: Any, **kwargs: Any) -> Any:
            if not entered.is_set():  # the first pass after this was installed hangs (a wedged CUDA call)
                entered.set()
                release.wait(60)
            return token2wav(*args, **kwargs)

        inner.token2wav = wedged
        options = SynthesisOptions(timeout=1.5)

        async def run() -> list[bytes]:
            return [chunk.audio async for chunk in engine.synthesize(LONG_TEXT, tars, options)]

        hung = asyncio.ensure_future(run())
        await asyncio.wait_for(asyncio.to_thread(entered.wait, 30), 40)
        waiting = asyncio.ensure_future(run())
        with pytest.raises(EngineTimeout, match="produced no audio for 1.5 s"):
            await asyncio.wait_for(hung, 30)
        audio = b"".join(await asyncio.wait_for(waiting, 30))
        assert len(audio) // 2 == len(np.concatenate(await speak(engine, LONG_TEXT, tars))), "the whole reply"
        assert engine.restarts == 1 and engine.scheduling.scheduler.open_streams == 0
    finally:
        release.set()
        await engine.close()
    assert thread_errors == []


@pytest.mark.parametrize("keep_real_time", [True, False])
async def test_admission_refuses_a_stream_the_machine_cannot_keep_ahead(tmp_path: Path, keep_real_time: bool) -> None:
    prompt = write_prompt(tmp_path / "p.wav")
    cfg = settings(tmp_path, concurrency=4, keep_real_time=keep_real_time, knobs={"token_s": 0.02})
    engine = await started(cfg, (tars := voice(prompt),))
    try:
        # As measured on a slow machine: 0.5 s of LLM and 0.3 s of flow + vocoder per second of audio per stream.
        costs = engine.scheduling.costs
        costs.llm_s_per_token, costs.flow_per_audio_s = 0.02, 0.3
        assert engine.health()["stream_cost"] == "llm 0.50 + flow 0.30 s per s"
        first = engine.synthesize(LONG_TEXT * 3, tars, SynthesisOptions())
        await asyncio.wait_for(first.__anext__(), 20)
        if keep_real_time:
            with pytest.raises(ServerBusy, match=r"cosyvoice engine at capacity: 1 streams in flight need 80% .*160%"):
                await speak(engine, "Me too.", tars)
        else:
            assert len(await asyncio.wait_for(speak(engine, "Me too.", tars), 30)) >= 1
        await first.aclose()
        costs.llm_s_per_token, costs.flow_per_audio_s = 0.002, 0.03  # a faster machine: two fit
        first = engine.synthesize(LONG_TEXT * 3, tars, SynthesisOptions())
        await asyncio.wait_for(first.__anext__(), 20)
        assert len(await asyncio.wait_for(speak(engine, "Me too.", tars), 30)) >= 1
        await first.aclose()
    finally:
        await engine.close()
