"""The Triton engine: fronts upstream's CosyVoice deployment on NVIDIA Triton Inference Server (gRPC, streaming).

Modules: `settings` (`engines.triton`, pure), `contract` (upstream's model inputs/outputs, request building),
`endpoint` (one server: channel, health probe, streamed request), `references` (voice profiles -> 16 kHz reference),
`engine` (balancing, retries, health). The core never imports this package; tritonclient and grpc are imported
only when the engine is created.
"""

from __future__ import annotations

from typing import Any

from wyoming_cosyvoice.config import Section
from wyoming_cosyvoice.errors import EngineUnavailable
from wyoming_cosyvoice.hookspecs import Register, hookimpl

from .settings import TritonSettings


def create_engine(section: Section) -> Any:
    """Factory: `engines.triton` settings -> engine; bad settings are a ConfigError, a missing client library
    EngineUnavailable (nothing connects before start())."""
    settings = section.parse(TritonSettings)
    try:
        from .engine import create_engine as create
    except ImportError as err:
        raise EngineUnavailable(
            f"triton engine: {err.name or 'tritonclient'} is not installed (pip install -e '.[triton]')"
        ) from None
    return create(settings)


@hookimpl
def register_engines(register: Register) -> None:
    """Register the Triton Inference Server engine."""
    register("triton", create_engine)
