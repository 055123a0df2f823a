"""The service's metrics (Prometheus, docs/metrics.md): one recorder the service calls at each event of a request;
without prometheus_client, or with `metrics.enabled: false`, a recorder that does nothing.

Label values are bounded: protocols, outcomes and refusal reasons from fixed lists, voices from the catalog (at most
MAX_VOICE_LABELS, then "other"), never text a client sent. What is cheap to read at scrape time (requests in flight
and queued, engine state, voices, GPU) is read then, not counted on the request path.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Optional

from .errors import ServerBusy
from .gpu import gpu_facts

if TYPE_CHECKING:
    from .service import Service

_LOGGER = logging.getLogger(__name__)

NAMESPACE = "wyoming_cosyvoice"
"""Prefix of every metric name."""

INSTALL_HINT = "pip install 'wyoming-cosyvoice[metrics]'"

PROTOCOLS = ("wyoming", "http", "studio")
OUTCOMES = ("ok", "error", "cancelled", "degraded")
REFUSALS = ("busy", "engine_busy", "shutting_down", "connections", "not_allowed")
"""Why a request or connection was refused: admission limit, the engine's own admission, shutdown,
`limits.max_connections`, `limits.allowed_networks`."""
ENGINE_STATES = ("ready", "loading", "parking", "parked", "waking", "failed", "closed")
_STATE_ALIASES = {"created": "loading", "starting": "loading"}
"""Engines' own words for a state of ENGINE_STATES."""
VOICE_STATES = ("ok", "warning", "broken")
PREPARATION_OUTCOMES = ("ok", "broken")
MAX_VOICE_LABELS = 200
"""Distinct voice names used as label values; later ones count as "other" (a folder of thousands of voices)."""
MAX_REASONS = 20
"""Distinct fallback reasons; later ones count as "other"."""

FIRST_AUDIO_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
RTF_BUCKETS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


def bounded(value: str, allowed: tuple[str, ...]) -> str:
    """`value` when it is one of `allowed`, else "other" (a label value never comes from outside the lists)."""
    return value if value in allowed else "other"


class RequestRecord:
    """One audio reply, from `Service.open_reply` to `Reply.finish`: what the recorder needs of it. This base does
    nothing (metrics off)."""

    __slots__ = ()

    def speaking(self) -> None:
        """A piece of text starts (`Reply.speak`): the wait for the engine starts here."""

    def engine_called(self) -> None:
        """The engine was asked for the piece's audio (its slot wait, if it reports one, follows)."""

    def engine_started(self) -> None:
        """The engine began working on the piece (a worker slot was free): the queue wait ends."""

    def written(self, seconds: float) -> None:
        """A chunk of `seconds` of audio was handed to the client (its protocol wrote it)."""

    def spoken(self) -> None:
        """The piece ended (audio done, failed or cancelled)."""

    def refused(self, reason: str) -> None:
        """The piece was refused (`reason` from REFUSALS)."""

    def failed(self, error: BaseException) -> None:
        """The piece failed with `error` (an engine's ServerBusy counts as a refusal, "engine_busy")."""

    def degraded(self, reason: str) -> None:
        """The reply was served by a fallback (never-silent): counted in `fallback_total{reason}`, outcome degraded."""

    def finish(self, ok: bool) -> None:
        """The reply ended (`ok` False: cut off or failed); counted once."""


NO_RECORD = RequestRecord()


class Metrics:
    """The recorder: metrics off (prometheus_client missing, or `metrics.enabled: false`); every call does nothing."""

    enabled = False

    def request(self, protocol: str, voice: str) -> RequestRecord:
        """A new audio reply in `voice` over `protocol` (one of PROTOCOLS)."""
        return NO_RECORD

    def refused(self, reason: str) -> None:
        """A request or connection was refused before it reached a reply (`reason` from REFUSALS)."""

    def fallback(self, reason: str) -> None:
        """A request was served by a fallback instead of the engine it asked for (the never-silent path)."""

    def voice_prepared(self, outcome: str) -> None:
        """A voice preparation ended: "ok" or "broken"."""

    def watch(self, service: "Service") -> None:
        """Read in-flight, queued, engine and voice facts from `service` at each scrape."""

    def summary(self) -> dict[str, Any]:
        """The headline numbers since start, for `describe` and the studio (empty when off)."""
        return {}

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text format and its content type."""
        raise RuntimeError("metrics are off")


def create_metrics(enabled: bool = True) -> Metrics:
    """The recorder: Prometheus when enabled and prometheus_client is installed, else the one that does nothing."""
    if not enabled:
        return Metrics()
    try:
        from .prometheus import PrometheusMetrics
    except ImportError:
        _LOGGER.info("Metrics off: prometheus_client is not installed (%s)", INSTALL_HINT)
        return Metrics()
    return PrometheusMetrics()


def missing_dependency() -> Optional[str]:
    """One line saying what to install to serve /metrics (None: it can)."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return f"/metrics needs prometheus_client: {INSTALL_HINT}"
    return None


# ---------------------------------------------------------------------------- what a scrape reads


@dataclass(frozen=True)
class EngineFacts:
    """One running engine, as its health() says."""

    name: str
    state: str
    model: str = ""
    precision: str = ""
    device: str = ""


@dataclass(frozen=True)
class Snapshot:
    """What is read from the service at a scrape."""

    in_flight: int = 0
    queued: int = 0
    engines: tuple[EngineFacts, ...] = ()
    voices: dict[str, int] = field(default_factory=dict)
    degraded: dict[str, int] = field(default_factory=dict)


def snapshot(service: "Service") -> Snapshot:
    """In-flight and queued requests, engine states and voices, read from the running service (on its loop)."""
    engines = []
    queued = 0
    for name, engine in service.engines.running.items():
        try:
            health = engine.health()
        except Exception:  # health is informational; a failing one reads as failed
            health = {"state": "failed"}
        queued += int(getattr(engine, "queued", 0) or 0)
        state = str(health.get("state", "ready"))
        state = _STATE_ALIASES.get(state, state)
        engines.append(
            EngineFacts(
                name=name,
                state=state if state in ENGINE_STATES else "other",
                model=str(health.get("model", "")),
                precision=str(health.get("precision", "")),
                device=str(health.get("device", "")),
            )
        )
    for name in service.engines.failed:
        engines.append(EngineFacts(name=name, state="failed"))
    voices = dict.fromkeys(VOICE_STATES, 0)
    broken = service.catalog.broken
    references = service.preparer.references
    for profile in service.catalog.all_profiles:
        if profile.name in broken:
            voices["broken"] += 1
        elif profile.name in references and references[profile.name].warnings:
            voices["warning"] += 1
        else:
            voices["ok"] += 1
    return Snapshot(service.concurrency_limit.active, queued, tuple(engines), voices, service.degraded.counts())


GPU_METRICS = ("gpu_memory_used_bytes", "gpu_memory_total_bytes", "gpu_utilization_ratio")
"""Exported only where NVML answers (an NVIDIA GPU and nvidia-ml-py)."""


def gpu_samples() -> Iterator[tuple[str, float]]:
    """(metric, value) from NVML: memory used in bytes and utilization as a ratio; nothing without a GPU."""
    facts = gpu_facts()
    if not facts.available:
        return
    used, total, busy = GPU_METRICS
    yield used, float(facts.memory_used_mb) * 2**20
    yield total, float(facts.memory_total_mb) * 2**20
    if facts.utilization_percent is not None:
        yield busy, facts.utilization_percent / 100.0


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """The q-quantile (0..1) from cumulative (upper bound, count) buckets, as Prometheus' histogram_quantile()
    computes it (linear within a bucket); NaN without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower  # Prometheus answers the highest finite bound
            return lower + (upper - lower) * ((rank - below) / (count - below) if count > below else 0.0)
        lower, below = upper, count
    return lower


def refusal_of(error: BaseException) -> Optional[str]:
    """The refusal reason of an error raised while speaking (an engine's own admission), else None."""
    return "engine_busy" if isinstance(error, ServerBusy) else None
