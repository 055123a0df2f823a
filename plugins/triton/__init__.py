"""The Triton engine: fronts upstream's CosyVoice deployment on NVIDIA Triton Inference Server (gRPC, streaming).

Modules: `settings` (`engines.triton`, pure), `contract` (upstream's model inputs/outputs, request building),
`endpoint` (one server: channel, health probe, streamed request), `references` (voice profiles -> 16 kHz reference),
`engine` (balancing, retries, health). The core never imports this package; tritonclient and grpc are imported
only when the engine is created.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from wyoming_cosyvoice.config import Section
from wyoming_cosyvoice.errors import EngineUnavailable
from wyoming_cosyvoice.hookspecs import Register, hookimpl

from .settings import TritonSettings

_LOGGER = logging.getLogger(__name__)

PARKING_KEYS = ("keep_alive", "park")
"""The CosyVoice engine's parking keys: accepted in `engines.triton` and ignored (Triton has its own model control)."""


def without_parking_keys(section: Section) -> Section:
    """The section minus `keep_alive` / `park`, saying once (per engine created) that Triton ignores them."""
    present = [key for key in PARKING_KEYS if key in section.data]
    if not present:
        return section
    _LOGGER.warning(
        "%s: %s ignored: the Triton engine does not park its model; Triton Inference Server has its own model "
        "control (its model-control-mode and repository API: load/unload)",
        section.key,
        " and ".join(present),
    )
    return dataclasses.replace(section, data={k: v for k, v in section.data.items() if k not in PARKING_KEYS})


def create_engine(section: Section) -> Any:
    """Factory: `engines.triton` settings -> engine; bad settings are a ConfigError, a missing client library
    EngineUnavailable (nothing connects before start())."""
    settings = without_parking_keys(section).parse(TritonSettings)
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
