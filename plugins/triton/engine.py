"""The Triton engine: streams upstream's CosyVoice model from one or more Triton Inference Servers over gRPC.

Requests go to the ready endpoint with the fewest requests running (then the fewest served). An endpoint that
refuses or breaks is taken out of rotation; a background probe (server live/ready, model ready) brings it back. A
request that fails before its first audio is retried once on another endpoint; one that fails after audio has
been sent ends with an EngineError (the client gets an `error` event). Everything runs on the event loop (grpc.aio).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any, AsyncIterator, Iterable, Optional

from wyoming_cosyvoice.audio import float_to_pcm16
from wyoming_cosyvoice.engine import Engine, PcmChunk, SynthesisOptions
from wyoming_cosyvoice.errors import EngineError, EngineUnavailable
from wyoming_cosyvoice.voices import VoiceProfile

from .contract import build_request
from .endpoint import Endpoint, EndpointFailure
from .references import CACHES_PROMPT_BY_TEXT, PreparedVoice, prepare_voice, signature
from .settings import TritonSettings

_LOGGER = logging.getLogger(__name__)

PREFIX = "triton engine: "


class TritonEngine(Engine):
    """Upstream's CosyVoice Triton deployment behind the engine interface."""

    name = "triton"

    def __init__(self, settings: TritonSettings) -> None:
        self.settings = settings
        self.sample_rate = settings.sample_rate
        self.state = "created"
        """created, starting, ready, failed or closed."""
        self.endpoints = [
            Endpoint(url, target, settings.model, settings.connect_timeout_s, settings.cancel_requests)
            for url, target in settings.targets()
        ]
        self.retries = 0
        """Requests that failed before audio on one endpoint and were sent to another."""
        self._prepared: dict[tuple, PreparedVoice] = {}
        self._signatures: dict[str, tuple] = {}  # profile name -> signature it was prepared under
        self._monitor: Optional[asyncio.Task[None]] = None
        self._warned: set[tuple[str, str]] = set()

    # --- start, probing, close ---------------------------------------------------------------------

    async def start(self) -> None:
        """Probe every endpoint; wait (up to start_timeout_s) until one is ready, else EngineUnavailable."""
        self.state = "starting"
        deadline = time.monotonic() + self.settings.start_timeout_s
        told = False
        while True:
            await self._probe_all()
            if any(e.state == "ready" for e in self.endpoints):
                break
            if all(e.permanent for e in self.endpoints) or time.monotonic() >= deadline:
                self.state = "failed"
                await self._close_channels()
                problems = "; ".join(f"{e.url}: {e.problem}" for e in self.endpoints)
                raise EngineUnavailable(PREFIX + f"no endpoint is ready for model {self.settings.model!r} ({problems})")
            if not told:
                told = True
                _LOGGER.info(
                    "Waiting up to %g s for a Triton endpoint to be ready (%s)",
                    self.settings.start_timeout_s,
                    "; ".join(f"{e.url}: {e.problem}" for e in self.endpoints),
                )
            await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        self.state = "ready"
        self._monitor = asyncio.create_task(self._watch(), name="triton endpoint probe")
        _LOGGER.info(
            "Triton engine: model %s on %d of %d endpoints (%s), %d Hz",
            self.settings.model,
            sum(e.state == "ready" for e in self.endpoints),
            len(self.endpoints),
            "; ".join(e.summary() for e in self.endpoints),
            self.sample_rate,
        )

    async def _probe_all(self) -> None:
        await asyncio.gather(*(e.probe() for e in self.endpoints))

    async def _watch(self) -> None:
        """Probe every endpoint every probe_interval_s: a failed one comes back when it is ready again."""
        while True:
            await asyncio.sleep(self.settings.probe_interval_s)
            try:
                await self._probe_all()
            except Exception:  # a probe bug must not end the probing
                _LOGGER.exception("Triton endpoint probe failed")

    async def _close_channels(self) -> None:
        for endpoint in self.endpoints:
            with contextlib.suppress(Exception):
                await endpoint.close()

    async def close(self) -> None:
        """Stop probing and close the channels (running requests are cancelled)."""
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        await self._close_channels()
        self.state = "closed"

    # --- voices ------------------------------------------------------------------------------------

    async def prepare(self, profiles: Iterable[VoiceProfile]) -> None:
        """Prepare each profile's reference once (off the event loop); VoiceError for one this engine cannot use."""
        for profile in profiles:
            if profile.engine in (None, self.name):
                await self._voice(profile)

    async def _voice(self, profile: VoiceProfile) -> PreparedVoice:
        key = signature(profile)
        voice = self._prepared.get(key)
        if voice is None:
            voice = await asyncio.to_thread(prepare_voice, profile, self.settings.model)
            self._prepared[key] = voice
            _LOGGER.info(
                "Voice %s prepared for Triton (%s, %.1f s reference at 16 kHz)",
                profile.name,
                profile.mode,
                voice.seconds,
            )
        self._signatures[profile.name] = key
        self._check_shared_prompt(profile.name, voice)
        return voice

    def _check_shared_prompt(self, name: str, voice: PreparedVoice) -> None:
        """Warn (once per pair) when upstream's model would mix up two voices that send the same reference text."""
        if self.settings.model not in CACHES_PROMPT_BY_TEXT or voice.reference is None:
            return
        for other, key in self._signatures.items():
            prepared = self._prepared.get(key)
            if other == name or prepared is None or prepared.reference_text != voice.reference_text:
                continue
            if prepared.reference is not None and (other, name) not in self._warned:
                self._warned.add((other, name))
                self._warned.add((name, other))
                _LOGGER.warning(
                    "Voices %r and %r send the same reference text (%r) to %s, whose Triton model caches the prompt "
                    "by that text: both speak with whichever voice it saw first. Give each voice its transcript "
                    "(mode zero_shot) or serve only one of them through Triton.",
                    other,
                    name,
                    voice.reference_text,
                    self.settings.model,
                )

    async def forget(self, profile_names: Iterable[str]) -> None:
        """Drop the prepared references of these profiles (unless another profile uses the same one)."""
        for name in profile_names:
            key = self._signatures.pop(name, None)
            if key is not None and key not in self._signatures.values():
                self._prepared.pop(key, None)

    # --- synthesis ---------------------------------------------------------------------------------

    def _pick(self, tried: list[Endpoint]) -> Optional[Endpoint]:
        """The ready endpoint with the fewest running requests (then the fewest served, then config order); when
        none is ready, a down one whose problem may have passed (it fails fast if not)."""
        usable = [e for e in self.endpoints if e not in tried and e.contract is not None]
        ready = [e for e in usable if e.state == "ready"]
        candidates = ready or [e for e in usable if not e.permanent]
        if not candidates:
            return None
        return min(candidates, key=lambda e: (e.outstanding, e.served))  # a draining request is outstanding too

    async def synthesize(self, text: str, profile: VoiceProfile, options: SynthesisOptions) -> AsyncIterator[PcmChunk]:
        """Stream the model's audio; retried once on another endpoint when an endpoint fails before audio."""
        text = text.strip()
        if not any(ch.isalnum() for ch in text):  # upstream's model fails on empty text; nothing to say
            return
        if self.state != "ready":
            raise EngineError(PREFIX + f"not ready (state: {self.state})")
        voice = await self._voice(profile)
        first_timeout = self._bounded(self.settings.first_audio_timeout_s, options)
        chunk_timeout = self._bounded(self.settings.chunk_timeout_s, options)
        tried: list[Endpoint] = []
        problems: list[str] = []
        while len(tried) < 2:
            endpoint = self._pick(tried)
            if endpoint is None:
                break
            if tried:
                self.retries += 1
                _LOGGER.warning(
                    "Request %s got no audio (%s); retrying on %s",
                    options.request_id or "?",
                    problems[-1],
                    endpoint.url,
                )
            tried.append(endpoint)
            assert endpoint.contract is not None
            request = build_request(
                self.settings.model,
                endpoint.contract,
                text,
                voice.reference,
                voice.reference_text,
                f"{options.request_id or 'wcv'}-{uuid.uuid4().hex[:12]}",  # upstream keys per-request state on it
            )
            started = False
            endpoint.outstanding += 1
            stream = endpoint.stream(request, first_timeout, chunk_timeout)
            try:
                async with contextlib.aclosing(stream):
                    async for wave in stream:
                        if not started:
                            started = True
                            endpoint.served += 1
                            if endpoint.state == "down":
                                endpoint.mark_ready()
                        yield PcmChunk(float_to_pcm16(wave), self.sample_rate, self.sample_width, self.channels)
                return
            except EndpointFailure as err:
                endpoint.failed += 1
                if err.unhealthy:  # refused, broke or stalled: out of rotation until a probe finds it ready again
                    endpoint.mark_down(str(err))
                if started:
                    raise EngineError(PREFIX + f"{endpoint.url} failed after audio had started: {err}") from None
                problems.append(f"{endpoint.url}: {err}")
            finally:
                endpoint.outstanding -= 1
        if not problems:
            states = "; ".join(f"{e.url}: {e.problem or e.state}" for e in self.endpoints)
            raise EngineError(PREFIX + f"no endpoint is ready ({states})")
        raise EngineError(PREFIX + "no audio: " + "; ".join(problems))

    @staticmethod
    def _bounded(seconds: float, options: SynthesisOptions) -> float:
        """The engine's own timeout, never longer than the server's `limits.engine_timeout_s`."""
        return min(seconds, options.timeout) if options.timeout else seconds

    # --- health ------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """State, model and each endpoint's state, running and served requests (cheap; no I/O)."""
        ready = sum(e.state == "ready" for e in self.endpoints)
        facts: dict[str, Any] = {
            "engine": self.name,
            "state": self.state,
            "sample_rate": self.sample_rate,
            "model": self.settings.model,
            "endpoints": f"{ready}/{len(self.endpoints)} ready",
        }
        for index, endpoint in enumerate(self.endpoints, 1):
            facts[f"endpoint{index}"] = endpoint.summary()
        facts["voices_prepared"] = len(self._signatures)
        if self.retries:
            facts["retried"] = self.retries
        return facts


def create_engine(settings: TritonSettings) -> TritonEngine:
    """The engine for validated settings (nothing connects before start())."""
    return TritonEngine(settings)
