"""CosyVoice engine front: admission and synthesis on the model that loader.py loads, with voicebook.py's voices."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from typing import Any, AsyncIterator, Callable, Generator, Iterable, Iterator, Optional

import numpy as np

from wyoming_cosyvoice.audio import float_to_pcm16
from wyoming_cosyvoice.config import Section
from wyoming_cosyvoice.engine import PcmChunk, RequestCancelled, SynthesisOptions, ThreadedEngine
from wyoming_cosyvoice.errors import EngineError, ServerBusy, VoiceError
from wyoming_cosyvoice.voices import VoiceProfile

from . import health, parking, sessions, upstream
from . import stream as cosyvoice_stream
from .calls import inference
from .lifecycle import Keeper
from .loader import LoadedModel, Loader, cannot_start, concurrency, empty_cuda_cache
from .options import CosyVoiceSettings, LoadPlan
from .prompts import PromptCache, default_cache_dir
from .recipes import PreparedVoice, speakable, v1_language_tag
from .scheduler import real_time_overload
from .voicebook import VoiceBook
from .warmup import measure, warmup_profile

_LOGGER = logging.getLogger(__name__)


class CosyVoiceEngine(ThreadedEngine):
    """The official CosyVoice classes behind the engine interface: one loaded model, `concurrency` requests in flight
    (a worker thread each, plus upstream's LLM thread per call), their flow + vocoder passes scheduled so that every
    stream stays ahead of playback (`scheduler.py`)."""

    name = "cosyvoice"

    def __init__(self, settings: CosyVoiceSettings) -> None:
        super().__init__()
        self.settings = settings
        self.state = "created"
        """created, loading, ready, failed or closed."""
        self.model: Any = None
        self.info: Optional[upstream.ModelInfo] = None
        self.plan: Optional[LoadPlan] = None
        self.cache = PromptCache(settings.cache_dir or default_cache_dir())
        self.sample_rate = 24000
        self._model_lock = threading.Lock()  # upstream's own loop (CosyVoice 1): one call at a time
        self.voices = VoiceBook(self.cache)
        """The prepared voices (`voicebook.py`)."""
        self.streaming = ""
        """How chunks are streamed: own loop (CosyVoice 2/3), upstream loop, or off."""
        self.scheduling: Optional[cosyvoice_stream.Streaming] = None
        """The shared flow + vocoder scheduler and measured costs (our own loop only)."""
        self.concurrency_note = ""
        """How `concurrency` was chosen (health)."""
        self.warmup_report = ""
        self.text_normalizer = ""
        """Upstream's text normalizer: ttsfrd, wetext or none (numbers and symbols read as written)."""
        self.loader = Loader(settings, self.cache.directory, self._unload)
        """Loads the model: plan, TensorRT, self-check, streaming loop (`loader.py`)."""
        self.loaded: Optional[LoadedModel] = None
        """What the last load decided (the model itself is `model`: None while unloaded)."""
        self.lifecycle = Keeper(settings.keep_alive, settings.park, self._park_model, self._wake_model)
        """Parks the model after `keep_alive` idle seconds and wakes it for the next reply (`lifecycle.py`)."""
        reload = functools.partial(self._load, None, True)
        self.parker = parking.Parker(settings.park, lambda: self.model, self._unload, reload, self._trt)
        """The model work of a park and a wake (`parking.py`)."""

    # --- loading -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Check every piece and load the model on the worker thread (EngineUnavailable names what is missing)."""
        self.state = "loading"
        try:
            await self.run_in_worker(self._load, None, exclusive=True)
        except BaseException:
            self.state = "failed"
            raise
        n, self.concurrency_note = concurrency(self.settings, self.loaded)
        self.set_concurrency(n)
        if self.scheduling is not None:  # no batch larger than the streams there can be
            self.scheduling.limit_batch(self.concurrency)
        self.state = "ready"
        self.lifecycle.start()

    def cannot_start(self) -> Optional[str]:
        """Not set up, or the checkout or model directory is missing (checked on disk; nothing is imported)."""
        return cannot_start(self.settings)

    def _load(self, force_fp16: Optional[bool], waking: bool = False) -> None:
        """Load the model (`loader.py`); `waking`: again after an unload park (no self-check; the voices and measured
        costs stay)."""
        loaded = self.loader.load(force_fp16, self.loaded if waking else None)
        self.loaded, self.model, self.info, self.plan = loaded, loaded.model, loaded.info, loaded.plan
        self.scheduling, self.streaming = loaded.scheduling, loaded.streaming
        self.sample_rate = int(loaded.model.sample_rate)
        if waking:
            self.parker.restore(loaded.model.frontend)
        else:
            self.text_normalizer = loaded.text_normalizer
            self.voices.clear()
        _LOGGER.info("Loaded %s", loaded.summary())

    @property
    def self_check(self) -> str:
        """The self-check's summary at load (health, describe)."""
        return self.loader.self_check

    def _unload(self) -> None:
        if self.model is None:
            return
        self.model = None
        empty_cuda_cache()

    # --- voices ------------------------------------------------------------------------------------

    async def prepare(self, profiles: Iterable[VoiceProfile]) -> None:
        """Compute (or load from the disk cache) each profile's prompt features once; VoiceError for a bad one."""
        for profile in profiles:
            if profile.engine not in (None, self.name):
                continue
            try:
                async with self.lifecycle.request("a voice to prepare"):
                    await self.run_in_worker(self._voice, profile)
            except VoiceError as err:
                self.voices.failed(profile.name, str(err))
                raise

    async def forget(self, profile_names: Iterable[str]) -> None:
        """Drop these profiles' prepared voices and their `spk2info` entries (the disk cache stays: it is keyed by
        content and reused if the voice comes back); entries another profile still uses are kept."""
        names = list(profile_names)
        if self.model is None:
            self._drop(names)
        else:
            await self.run_in_worker(self._drop, names)  # the worker thread reads spk2info while synthesizing

    def _drop(self, names: list[str]) -> None:
        self.voices.forget(names, None if self.model is None else self.model.frontend.spk2info)

    def _voice(self, profile: VoiceProfile) -> PreparedVoice:
        """The prepared voice for `profile`, preparing it now on first use (worker thread)."""
        assert self.info is not None
        return self.voices.voice(self.model, self.info, profile)

    @property
    def _prepared(self) -> dict[tuple, PreparedVoice]:
        return self.voices.prepared

    @property
    def _signatures(self) -> dict[str, tuple]:
        return self.voices.signatures

    # --- synthesis ---------------------------------------------------------------------------------

    async def synthesize(self, text: str, profile: VoiceProfile, options: SynthesisOptions) -> AsyncIterator[PcmChunk]:
        """Wake the model if it is parked, admit (a free slot, or room in the queue, and room in the machine's
        speed), then stream the chunks."""
        if self.state != "ready":
            raise EngineError(f"cosyvoice engine is not ready (state: {self.state})")
        async with self.lifecycle.request():
            if self.model is None:
                raise EngineError(f"cosyvoice engine is not ready (state: {self.state})")
            self._refuse_without_room()
            async for chunk in super().synthesize(text, profile, options):
                yield chunk

    # --- parking (lifecycle.py decides when; this is the model work) -------------------------------

    def reply_opening(self) -> Callable[[], None]:
        """A reply is opening: a parked model starts waking now; it stays awake until the reply releases it."""
        return self.lifecycle.hold()

    async def park(self) -> str:
        """Park the model now (after the requests in flight); the state after."""
        return await self.lifecycle.park_now()

    async def wake(self) -> str:
        """Wake the model now (or wait for the wake in progress); the state after."""
        return await self.lifecycle.wake_now()

    async def _park_model(self, stop: threading.Event) -> bool:
        return await self.run_in_worker(self.parker.park, stop, exclusive=True)

    async def _wake_model(self) -> None:
        await self.run_in_worker(self.parker.wake, exclusive=True)

    def _trt(self) -> Optional[parking.TrtPlan]:
        return self.loaded.trt if self.loaded is not None else None

    def _refuse_without_room(self) -> None:
        why = self.room()
        if why is not None:
            raise ServerBusy(f"cosyvoice engine {why}")

    def room(self) -> Optional[str]:
        """Why one more request cannot start now (None: it can): every slot taken and the queue full, or one more
        stream would make the streams in flight fall behind real time (`keep_real_time`, from the measured costs).
        The service waits on it (Engine.room); a direct `synthesize` without room raises ServerBusy."""
        in_flight, queued = self.in_flight, self.queued
        if in_flight >= self.concurrency and queued >= self.settings.max_queue:
            return (
                f"busy: {in_flight} requests in flight, {queued} queued "
                f"(concurrency {self.concurrency}, max_queue {self.settings.max_queue})"
            )
        if self.settings.keep_real_time and self.scheduling is not None and in_flight < self.concurrency:
            scheduling = self.scheduling
            why = real_time_overload(
                in_flight,
                scheduling.costs.per_stream(),
                scheduling.llm_batched,
                scheduling.scheduler.slots,
                flow_marginal=scheduling.marginal(),
            )
            if why is not None:
                return f"at capacity: {why}"
        return None

    def heard_as(self, profile: VoiceProfile) -> str:
        """Cloned from the recording (or the model's built-in speaker)."""
        if profile.mode == "sft":
            return "the model's built-in speaker"
        return "cloned" if profile.mode != "instruct" else "cloned, with instructions"

    def request_abandoned(self, cancel: threading.Event) -> None:
        """A hung request's thread was given up: free the flow + vocoder pass it may hold for the others."""
        if self.scheduling is not None:
            self.scheduling.abandon(cancel)

    def render(
        self,
        text: str,
        profile: VoiceProfile,
        options: SynthesisOptions,
        emit: Callable[[bytes], None],
        cancel: threading.Event,
    ) -> None:
        """Emit each chunk; the generator is closed explicitly so upstream's per-call state is cleaned now."""
        chunks = self.generate(text, profile, options, cancel)
        try:
            for pcm in chunks:
                if cancel.is_set():
                    raise RequestCancelled()
                emit(pcm)
        finally:
            chunks.close()

    def generate(
        self, text: str, profile: VoiceProfile, options: SynthesisOptions, cancel: threading.Event
    ) -> Generator[bytes, None, None]:
        """16-bit PCM chunks at the model's rate, as upstream yields them."""
        for samples in self._outputs(text, profile, options.speed, cancel):
            yield float_to_pcm16(samples)

    def _outputs(
        self, text: str, profile: VoiceProfile, speed: float, cancel: Optional[threading.Event] = None
    ) -> Iterator[np.ndarray]:
        # One space for every run of white space: wetext (0.1.x) fails on a blank line (AssertionError) and joins
        # lines without a space ("on.\nAnything" -> "on.Anything"); upstream's sentence split ignores line breaks.
        text = " ".join(text.split())
        if not speakable(text):
            return
        voice = self._voice(profile)
        stream = self.settings.stream and speed == 1.0  # upstream ignores speed while streaming
        kwargs = {"stream": stream, "speed": 1.0 if stream else speed}
        scheduling = self.scheduling
        # Our loop keeps each call's state apart; upstream's own loop (CosyVoice 1) runs one call at a time.
        with self._model_lock if scheduling is None else contextlib.nullcontext():
            model = self.model
            request = None if scheduling is None else scheduling.begin(cancel or threading.Event(), self.still_working)
            v1_tag = v1_language_tag(profile) if self.info is not None and self.info.version == 1 else None
            outputs = inference(model, voice, text, v1_tag, kwargs)
            try:
                for output in outputs:
                    yield output["tts_speech"].detach().float().cpu().numpy().reshape(-1)
                    if cancel is not None and cancel.is_set():
                        return
            finally:
                outputs.close()
                sessions.reap(model.model)
                if request is not None and scheduling is not None:
                    scheduling.end(request)

    # --- warm-up, health, close --------------------------------------------------------------------

    async def warmup(self) -> None:
        """Synthesize `warmup_text` once; non-finite output reloads in fp32 (auto fp16) or is an error."""
        async with self.lifecycle.request("the warm-up"):
            await self.run_in_worker(self._warmup, True, exclusive=True)

    def _warmup(self, may_reload: bool) -> None:
        assert self.plan is not None
        profile = warmup_profile(self.voices.first_profile, self.cache.directory)
        run = measure(self._outputs(self.settings.warmup_text, profile, 1.0), self.sample_rate)
        if not run.finite:
            if self.plan.fp16 and self.plan.fp16_auto and may_reload:
                _LOGGER.warning("fp16 warm-up produced NaN/inf audio on this GPU; reloading in fp32")
                self._load(False)
                self._warmup(False)
                return
            self.state = "failed"
            if self.plan.fp16:
                raise EngineError(
                    upstream.PREFIX + "fp16 warm-up produced NaN/inf audio on this GPU; "
                    "set engines.cosyvoice.fp16: false"
                )
            raise EngineError(upstream.PREFIX + "warm-up produced NaN/inf audio (damaged model files?)")
        self.warmup_report = run.report
        _LOGGER.info("Warm-up: %.2f s of audio in %.2f s (%s)", run.audio_s, run.total_s, self.warmup_report)
        if self.scheduling is not None:  # what the cold warm-up measured holds only until a real call's figures
            self.scheduling.costs.provisional = True

    def health(self) -> dict[str, Any]:
        """Engine state, model, precision, prepared voices and GPU facts (NVML; cheap)."""
        return health.facts(self)

    async def close(self) -> None:
        """Release the model after the current job and stop the worker."""
        await self.lifecycle.close()
        if self.model is not None:
            try:
                await asyncio.wait_for(self.run_in_worker(self._unload, exclusive=True), 30)
            except (asyncio.TimeoutError, RuntimeError):
                pass
        self.state = "closed"
        await super().close()


def create_engine(section: Section) -> CosyVoiceEngine:
    """Factory: `engines.cosyvoice` settings -> engine (nothing heavy happens before start())."""
    return CosyVoiceEngine(section.parse(CosyVoiceSettings))
