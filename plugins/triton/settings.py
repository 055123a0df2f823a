"""`engines.triton` settings: the Triton endpoints, the model name, the output rate and the timeouts (pure)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional, Union

CANCEL_SAFE_VERSION = (2, 53)
"""First Triton release (24.12) with the gRPC frontend's cancellation fixes (triton-inference-server/server#7840)."""

DEFAULT_GRPC_PORT = 8001
"""Triton's default gRPC port (upstream's CosyVoice 3 script moves it to 18001)."""

_ENDPOINT = re.compile(r"grpc://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::(?P<port>[0-9]{1,5}))?/?")
_MODEL = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def parse_endpoint(url: str) -> str:
    """`grpc://host:port` -> `host:port` (the gRPC target); ValueError with a one-line reason otherwise."""
    text = url.strip()
    if text.startswith(("http://", "https://")):
        raise ValueError(
            f"{url!r}: Triton streams only over gRPC; use grpc://host:port with its gRPC port "
            f"(default {DEFAULT_GRPC_PORT}), not its HTTP port"
        )
    match = _ENDPOINT.fullmatch(text)
    if match is None:
        raise ValueError(f"{url!r} is not grpc://host:port")
    port = int(match["port"] or DEFAULT_GRPC_PORT)
    if not 0 < port < 65536:
        raise ValueError(f"{url!r}: port {port} is out of range")
    return f"{match['host']}:{port}"


@dataclass(frozen=True)
class TritonSettings:
    """`engines.triton` settings."""

    endpoints: tuple[str, ...] = ()
    """Triton servers running upstream's CosyVoice deployment: grpc://host:port (gRPC port, default 8001)."""

    model: str = "cosyvoice2"
    """Model name in Triton's repository: cosyvoice2 (upstream's run.sh) or cosyvoice3 (run_cosyvoice3.sh)."""

    sample_rate: int = 24000
    """Rate of the model's `waveform` output (upstream's CosyVoice 2 and 3: 24000)."""

    connect_timeout_s: float = 3.0
    """Connecting to an endpoint, and each health probe (server live/ready, model ready)."""

    first_audio_timeout_s: float = 30.0
    """From sending a request to its first audio; longer fails the request (retried once on another endpoint)."""

    chunk_timeout_s: float = 30.0
    """Between two responses of one request once audio flows; longer ends the request with an error."""

    probe_interval_s: float = 5.0
    """How often every endpoint's health is probed (a failed endpoint is re-admitted when it is ready again)."""

    start_timeout_s: float = 60.0
    """At startup, how long to wait for at least one endpoint to become ready (Triton loads models for minutes)."""

    cancel_requests: Union[bool, Literal["auto"]] = "auto"
    """When a client leaves: true cancels the Triton request; false reads it to its end and drops the audio; auto
    cancels on Triton >= 2.53 (24.12) only, because older servers can crash when a stream is cancelled while the
    model is sending (tritonserver 2.51 did here)."""

    def validate(self) -> Optional[tuple[str, str]]:
        """Check the endpoint URLs, the model name and the ranges."""
        if not self.endpoints:
            return ("endpoints", "at least one Triton endpoint is needed (grpc://host:port)")
        seen: dict[str, int] = {}
        for index, url in enumerate(self.endpoints):
            try:
                target = parse_endpoint(url)
            except ValueError as err:
                return (f"endpoints[{index}]", str(err))
            if target in seen:
                return (f"endpoints[{index}]", f"{url!r} is listed twice (also endpoints[{seen[target]}])")
            seen[target] = index
        if not _MODEL.fullmatch(self.model):
            return ("model", f"{self.model!r} is not a Triton model name")
        if not 8000 <= self.sample_rate <= 192000:
            return ("sample_rate", "must be between 8000 and 192000")
        for name in ("connect_timeout_s", "first_audio_timeout_s", "chunk_timeout_s", "probe_interval_s"):
            if not getattr(self, name) > 0:
                return (name, "must be above 0")
        if self.start_timeout_s < 0:
            return ("start_timeout_s", "must be 0 or more")
        return None

    def targets(self) -> list[tuple[str, str]]:
        """(url as configured, gRPC target) per endpoint, in configuration order."""
        return [(url, parse_endpoint(url)) for url in self.endpoints]
