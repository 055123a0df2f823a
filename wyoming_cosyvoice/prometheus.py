"""The Prometheus recorder (prometheus_client, an optional extra). On the request path it only adds to plain numbers
(every call comes from the event loop: no locks), a scrape turns them into metric families, reads the service's
gauges and adds prometheus_client's process collector; one registry per service."""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Iterable, Optional

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .audio import Playback
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
    bounded,
    gpu_samples,
    histogram_quantile,
    refusal_of,
    snapshot,
)

if TYPE_CHECKING:
    from .service import Service

_PREFIX = NAMESPACE + "_"
_clock = time.perf_counter


class Histogram:
    """Observations counted into fixed buckets (upper bounds inclusive, as Prometheus has them)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, float]]:
        """(upper bound, observations up to it), +Inf last."""
        total, rows = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            rows.append((bound, float(total)))
        return rows

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        """The histogram as Prometheus exposes it (_bucket, _count, _sum)."""
        buckets = [("+Inf" if bound == float("inf") else repr(bound), count) for bound, count in self.cumulative()]
        return HistogramMetricFamily(_PREFIX + name, documentation, buckets=buckets, sum_value=self.sum)


class _Record(RequestRecord):
    """One reply's timings, counted into `PrometheusMetrics` when it finishes."""

    __slots__ = (
        "_metrics", "_protocol", "_voice", "_opened", "_first", "_speak_started", "_engine_mark", "_busy",
        "_playback", "_error", "_fallback", "_done",
    )  # fmt: skip

    def __init__(self, metrics: "PrometheusMetrics", protocol: str, voice: str) -> None:
        self._metrics = metrics
        self._protocol = protocol
        self._voice = voice
        self._opened = time.perf_counter()
        self._first = 0.0
        self._speak_started = 0.0
        self._engine_mark = 0.0
        self._busy = 0.0
        self._playback = Playback()
        self._error = False
        self._fallback = False
        self._done = False

    def speaking(self) -> None:
        now = time.perf_counter()
        self._speak_started = now
        self._engine_mark = 0.0
        self._playback.rest(now)

    def engine_called(self) -> None:
        if not self._engine_mark:
            self._engine_mark = time.perf_counter()

    def engine_started(self) -> None:
        self._engine_mark = time.perf_counter()

    def written(self, seconds: float) -> None:
        now = _clock()
        if not self._first:
            self._first = now
            self._metrics.first_audio.observe(now - self._opened)
        self._playback.chunk(now, seconds)

    def spoken(self) -> None:
        if not self._speak_started:
            return
        now = time.perf_counter()
        self._busy += now - self._speak_started
        self._metrics.queue_wait.observe((self._engine_mark or now) - self._speak_started)
        self._speak_started = 0.0

    def refused(self, reason: str) -> None:
        self._error = True
        self._metrics.refused(reason)

    def failed(self, error: BaseException) -> None:
        self._error = True
        reason = refusal_of(error)
        if reason is not None:
            self._metrics.refused(reason)

    def degraded(self, reason: str) -> None:
        self._fallback = True
        self._metrics.fallback(reason)

    def finish(self, ok: bool) -> None:
        if self._done:
            return
        self._done = True
        outcome = "error" if self._error else "cancelled" if not ok else "degraded" if self._fallback else "ok"
        self._metrics.finished(
            (self._protocol, self._voice, outcome),
            time.perf_counter() - self._opened,
            self._busy,
            self._playback.total,
            self._playback.dry_seconds,
        )


class PrometheusMetrics(Metrics):
    """Counters and histograms under `wyoming_cosyvoice_`, the service's gauges, and the process collector."""

    enabled = True

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.first_audio = Histogram(FIRST_AUDIO_BUCKETS)
        self.request_seconds = Histogram(REQUEST_BUCKETS)
        self.rtf = Histogram(RTF_BUCKETS)
        self.queue_wait = Histogram(QUEUE_BUCKETS)
        self.audio_seconds = 0.0
        self.underruns = 0
        self.underrun_seconds = 0.0
        # Every known series exists from the start, so rate() and increase() see the first event.
        self.refusals: dict[str, int] = dict.fromkeys(REFUSALS, 0)
        self.fallbacks: dict[str, int] = {}
        self.preparations: dict[str, int] = dict.fromkeys(PREPARATION_OUTCOMES, 0)
        self._voices: set[str] = set()
        self._collector = _Collector(self)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self._collector)
        ProcessCollector(registry=self.registry)

    def request(self, protocol: str, voice: str) -> RequestRecord:
        if voice not in self._voices:
            if len(self._voices) >= MAX_VOICE_LABELS:
                voice = "other"
            else:
                self._voices.add(voice)
        return _Record(self, bounded(protocol, PROTOCOLS), voice)

    def finished(self, key: tuple[str, str, str], seconds: float, busy: float, audio: float, dry: float) -> None:
        """Count one reply (its record calls this once): labels, duration, synthesis time, audio, dry time."""
        self.requests[key] = self.requests.get(key, 0) + 1
        self.request_seconds.observe(seconds)
        if audio > 0:
            self.audio_seconds += audio
            self.rtf.observe(busy / audio)
        if dry > 0:
            self.underruns += 1
            self.underrun_seconds += dry

    def refused(self, reason: str) -> None:
        reason = bounded(reason, REFUSALS)
        self.refusals[reason] = self.refusals.get(reason, 0) + 1

    def fallback(self, reason: str) -> None:
        if reason not in self.fallbacks and len(self.fallbacks) >= MAX_REASONS:
            reason = "other"
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1

    def voice_prepared(self, outcome: str) -> None:
        outcome = bounded(outcome, PREPARATION_OUTCOMES)
        self.preparations[outcome] = self.preparations.get(outcome, 0) + 1

    def watch(self, service: "Service") -> None:
        self._collector.service = service

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def summary(self) -> dict[str, Any]:
        by_outcome = dict.fromkeys(OUTCOMES, 0)
        for (_protocol, _voice, outcome), count in self.requests.items():
            by_outcome[outcome] = by_outcome.get(outcome, 0) + count
        first = self.first_audio.cumulative()
        snap = self._collector.read()
        return {
            "requests": sum(by_outcome.values()),
            **by_outcome,
            "first_audio_p50_ms": _rounded(histogram_quantile(0.5, first) * 1000, 1),
            "first_audio_p95_ms": _rounded(histogram_quantile(0.95, first) * 1000, 1),
            "rtf_p50": _rounded(histogram_quantile(0.5, self.rtf.cumulative()), 3),
            "underruns": self.underruns,
            "underrun_seconds": round(self.underrun_seconds, 3),
            "refused": sum(self.refusals.values()),
            "fallbacks": sum(self.fallbacks.values()),
            "in_flight": snap.in_flight,
            "queued": snap.queued,
        }


class _Collector:
    """Turns the recorder's numbers and the service's gauges (in flight, queued, engines, voices, GPU) into metric
    families at each scrape."""

    def __init__(self, metrics: PrometheusMetrics) -> None:
        self.metrics = metrics
        self.service: Optional["Service"] = None
        self._gpu = True  # False once NVML said there is none (not asked again)

    def read(self) -> Snapshot:
        return snapshot(self.service) if self.service is not None else Snapshot()

    def collect(self) -> Iterable[Metric]:
        yield from self._recorded()
        snap = self.read()
        yield GaugeMetricFamily(_PREFIX + "in_flight", "Requests admitted and not finished", value=snap.in_flight)
        yield GaugeMetricFamily(_PREFIX + "queued", "Requests waiting for an engine worker slot", value=snap.queued)
        state = GaugeMetricFamily(
            _PREFIX + "engine_state", "1 for each engine's current state", labels=["engine", "state"]
        )
        info = GaugeMetricFamily(
            _PREFIX + "engine_info",
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
        voices = GaugeMetricFamily(_PREFIX + "voices", "Voices by state", labels=["state"])
        for name, count in snap.voices.items():
            voices.add_metric([name], count)
        yield voices
        degraded = CounterMetricFamily(
            _PREFIX + "degraded", "Requests degraded instead of refused, by kind (describe's counts)", labels=["kind"]
        )
        for kind, count in snap.degraded.items():
            degraded.add_metric([kind], count)
        yield degraded
        if self._gpu:
            samples = list(gpu_samples())
            self._gpu = bool(samples)
            for name, value in samples:
                yield GaugeMetricFamily(_PREFIX + name, "GPU (NVML): " + name.replace("_", " "), value=value)

    def _recorded(self) -> Iterable[Metric]:
        m = self.metrics
        requests = CounterMetricFamily(
            _PREFIX + "requests",
            "Audio replies by protocol, voice and outcome",
            labels=["protocol", "voice", "outcome"],
        )
        for key, count in m.requests.items():
            requests.add_metric(list(key), count)
        yield requests
        yield m.first_audio.family(
            "first_audio_seconds", "From the request reaching the service to its first audio chunk written"
        )
        yield m.request_seconds.family("request_seconds", "From the request reaching the service to its reply's end")
        yield m.rtf.family(
            "real_time_factor", "Synthesis time over audio time per reply (below 1: faster than real time)"
        )
        yield m.queue_wait.family("queue_wait_seconds", "From a piece of text being ready to the engine starting on it")
        yield CounterMetricFamily(_PREFIX + "audio_seconds", "Seconds of audio delivered", value=m.audio_seconds)
        yield CounterMetricFamily(
            _PREFIX + "underruns", "Replies whose playback (from the first chunk) would have run dry", value=m.underruns
        )
        yield CounterMetricFamily(
            _PREFIX + "underrun_seconds", "How long playback would have waited for audio", value=m.underrun_seconds
        )
        for name, doc, label, counts in (
            ("refused", "Requests or connections refused, by reason", "reason", m.refusals),
            ("fallback", "Replies served by a fallback, by reason", "reason", m.fallbacks),
            ("voice_preparations", "Voice preparations by outcome", "outcome", m.preparations),
        ):
            family = CounterMetricFamily(_PREFIX + name, doc, labels=[label])
            for value, count in counts.items():
                family.add_metric([value], count)
            yield family


def _rounded(value: float, digits: int) -> Optional[float]:
    return None if value != value else round(value, digits)  # NaN: no observations yet
