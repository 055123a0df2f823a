"""The Prometheus recorder (prometheus_client, an optional extra): counters and histograms on the request path, the
rest read from the service at each scrape; its own registry per service."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .metrics import (
    ENGINE_STATES,
    FIRST_AUDIO_BUCKETS,
    MAX_REASONS,
    MAX_VOICE_LABELS,
    NAMESPACE,
    OUTCOMES,
    PREPARATION_OUTCOMES,
    PROTOCOLS,
    QUEUE_BUCKETS,
    REFUSALS,
    REQUEST_BUCKETS,
    RTF_BUCKETS,
    Metrics,
    RequestRecord,
    Snapshot,
    Timings,
    _bounded,
    gpu_samples,
    histogram_quantile,
    refusal_of,
    snapshot,
)

if TYPE_CHECKING:
    from .service import Service


class _Record(RequestRecord):
    """One reply's timings, recorded into `PrometheusMetrics` when it finishes."""

    __slots__ = ("_metrics", "_protocol", "_voice", "_t", "_done")

    def __init__(self, metrics: "PrometheusMetrics", protocol: str, voice: str) -> None:
        self._metrics = metrics
        self._protocol = protocol
        self._voice = voice
        self._t = Timings()
        self._done = False

    def speaking(self) -> None:
        now = time.perf_counter()
        t = self._t
        t.speak_started = now
        t.engine_mark = 0.0
        t.playback.rest(now)

    def engine_called(self) -> None:
        if not self._t.engine_mark:
            self._t.engine_mark = time.perf_counter()

    def engine_started(self) -> None:
        self._t.engine_mark = time.perf_counter()

    def written(self, seconds: float) -> None:
        now = time.perf_counter()
        t = self._t
        if not t.first:
            t.first = now
            self._metrics.first_audio.observe(now - t.opened)
        t.playback.chunk(now, seconds)
        t.audio += seconds

    def spoken(self) -> None:
        t = self._t
        if not t.speak_started:
            return
        now = time.perf_counter()
        t.busy += now - t.speak_started
        self._metrics.queue_wait.observe((t.engine_mark or now) - t.speak_started)
        t.speak_started = 0.0

    def refused(self, reason: str) -> None:
        self._t.error = True
        self._metrics.refused(reason)

    def failed(self, error: BaseException) -> None:
        self._t.error = True
        reason = refusal_of(error)
        if reason is not None:
            self._metrics.refused(reason)

    def degraded(self, reason: str) -> None:
        self._t.fallback = True
        self._metrics.fallback(reason)

    def finish(self, ok: bool) -> None:
        if self._done:
            return
        self._done = True
        self._metrics.finished(self._protocol, self._voice, self._t, ok)


class PrometheusMetrics(Metrics):
    """Counters and histograms under `wyoming_cosyvoice_`, plus the process collector (RSS, open fds)."""

    enabled = True

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, ns = self.registry, NAMESPACE
        self.requests = Counter(
            "requests",
            "Audio replies by protocol, voice and outcome",
            ["protocol", "voice", "outcome"],
            namespace=ns,
            registry=r,
        )
        self.first_audio = Histogram(
            "first_audio_seconds",
            "From the request reaching the service to its first audio chunk written",
            namespace=ns,
            registry=r,
            buckets=FIRST_AUDIO_BUCKETS,
        )
        self.request_seconds = Histogram(
            "request_seconds",
            "From the request reaching the service to the end of its reply",
            namespace=ns,
            registry=r,
            buckets=REQUEST_BUCKETS,
        )
        self.rtf = Histogram(
            "real_time_factor",
            "Synthesis time over audio time per reply (below 1: faster than real time)",
            namespace=ns,
            registry=r,
            buckets=RTF_BUCKETS,
        )
        self.queue_wait = Histogram(
            "queue_wait_seconds",
            "From a piece of text being ready to the engine starting on it",
            namespace=ns,
            registry=r,
            buckets=QUEUE_BUCKETS,
        )
        self.audio_seconds = Counter("audio_seconds", "Seconds of audio delivered", namespace=ns, registry=r)
        self.underruns = Counter(
            "underruns",
            "Replies whose playback (started at the first chunk) would have run dry",
            namespace=ns,
            registry=r,
        )
        self.underrun_seconds = Counter(
            "underrun_seconds", "How long playback would have waited for audio, in all", namespace=ns, registry=r
        )
        self.refusals = Counter(
            "refused", "Requests or connections refused, by reason", ["reason"], namespace=ns, registry=r
        )
        self.fallbacks = Counter(
            "fallback", "Requests served by a fallback, by reason", ["reason"], namespace=ns, registry=r
        )
        self.preparations = Counter(
            "voice_preparations", "Voice preparations by outcome", ["outcome"], namespace=ns, registry=r
        )
        for reason in REFUSALS:  # every series exists from the start, so rate() and increase() see the first one
            self.refusals.labels(reason)
        for outcome in PREPARATION_OUTCOMES:
            self.preparations.labels(outcome)
        ProcessCollector(registry=r)
        self._voices: set[str] = set()
        self._fallback_reasons: set[str] = set()
        self._children: dict[tuple[str, str, str], Any] = {}
        self._collector = _ServiceCollector()
        r.register(self._collector)

    def request(self, protocol: str, voice: str) -> RequestRecord:
        if voice not in self._voices:
            if len(self._voices) >= MAX_VOICE_LABELS:
                voice = "other"
            else:
                self._voices.add(voice)
        return _Record(self, _bounded(protocol, PROTOCOLS), voice)

    def finished(self, protocol: str, voice: str, t: Timings, ok: bool) -> None:
        """Count one reply (called by its record, once)."""
        key = (protocol, voice, t.outcome(ok))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(*key)
        child.inc()
        self.request_seconds.observe(time.perf_counter() - t.opened)
        if t.audio > 0:
            self.audio_seconds.inc(t.audio)
            self.rtf.observe(t.busy / t.audio)
        dry = t.playback.dry_seconds
        if dry > 0:
            self.underruns.inc()
            self.underrun_seconds.inc(dry)

    def refused(self, reason: str) -> None:
        self.refusals.labels(_bounded(reason, REFUSALS)).inc()

    def fallback(self, reason: str) -> None:
        if reason not in self._fallback_reasons:
            if len(self._fallback_reasons) >= MAX_REASONS:
                reason = "other"
            else:
                self._fallback_reasons.add(reason)
        self.fallbacks.labels(reason).inc()

    def voice_prepared(self, outcome: str) -> None:
        self.preparations.labels(_bounded(outcome, PREPARATION_OUTCOMES)).inc()

    def watch(self, service: "Service") -> None:
        self._collector.service = service

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def summary(self) -> dict[str, Any]:
        by_outcome = dict.fromkeys(OUTCOMES, 0.0)
        for metric in self.requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    by_outcome[sample.labels["outcome"]] += sample.value
        first = _buckets(self.first_audio)
        rtf = _buckets(self.rtf)
        snap = self._collector.read()
        return {
            "requests": int(sum(by_outcome.values())),
            **{k: int(v) for k, v in by_outcome.items()},
            "first_audio_p50_ms": _ms(histogram_quantile(0.5, first)),
            "first_audio_p95_ms": _ms(histogram_quantile(0.95, first)),
            "rtf_p50": _round(histogram_quantile(0.5, rtf), 3),
            "underruns": int(_value(self.underruns)),
            "underrun_seconds": _round(_value(self.underrun_seconds), 3),
            "refused": int(
                sum(s.value for m in self.refusals.collect() for s in m.samples if s.name.endswith("_total"))
            ),
            "fallbacks": int(
                sum(s.value for m in self.fallbacks.collect() for s in m.samples if s.name.endswith("_total"))
            ),
            "in_flight": snap.in_flight,
            "queued": snap.queued,
        }


class _ServiceCollector:
    """The gauges read from the service at each scrape: in flight, queued, engines, voices, GPU."""

    def __init__(self) -> None:
        self.service: Optional["Service"] = None
        self._gpu = True  # False once NVML said there is none (not asked again)

    def read(self) -> Snapshot:
        return snapshot(self.service) if self.service is not None else Snapshot()

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        snap = self.read()
        ns = NAMESPACE + "_"
        yield _gauge(ns + "in_flight", "Requests admitted and not finished", snap.in_flight)
        yield _gauge(ns + "queued", "Requests waiting for an engine worker slot", snap.queued)
        state = GaugeMetricFamily(ns + "engine_state", "1 for each engine's current state", labels=["engine", "state"])
        info = GaugeMetricFamily(
            ns + "engine_info",
            "The engines' model, precision and device",
            labels=["engine", "model", "precision", "device"],
        )
        for engine in snap.engines:
            for name in (*ENGINE_STATES, "other"):
                if name != "other" or engine.state == "other":
                    state.add_metric([engine.name, name], 1.0 if engine.state == name else 0.0)
            info.add_metric([engine.name, engine.model, engine.precision, engine.device], 1.0)
        yield state
        yield info
        voices = GaugeMetricFamily(ns + "voices", "Voices by state", labels=["state"])
        for name, count in snap.voices.items():
            voices.add_metric([name], count)
        yield voices
        if self._gpu:
            samples = list(gpu_samples())
            if not samples:
                self._gpu = False
            for name, value in samples:
                yield _gauge(ns + name, name.replace("_", " "), value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _buckets(histogram: Histogram) -> list[tuple[float, float]]:
    return [
        (float(s.labels["le"]), s.value) for m in histogram.collect() for s in m.samples if s.name.endswith("_bucket")
    ]


def _value(counter: Counter) -> float:
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


def _ms(seconds: float) -> Optional[float]:
    return None if math.isnan(seconds) else round(seconds * 1000.0, 1)


def _round(value: float, digits: int) -> Optional[float]:
    return None if math.isnan(value) else round(value, digits)
