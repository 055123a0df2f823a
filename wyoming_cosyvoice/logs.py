"""Rate-limited log lines: a flood of the same warning (a hostile client, an overload) stays readable."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

BURST = 10
"""Lines logged per key and interval before the rest are only counted."""

INTERVAL = 60.0
"""Seconds after which a key may log `BURST` lines again."""

MAX_KEYS = 256
"""Keys remembered at once (the oldest is forgotten first), so varied keys cannot grow memory."""


class LogThrottle:
    """Logs at most `burst` lines per key every `interval` seconds; the first line of a key's next interval says how
    many similar lines were suppressed before it ("... (and 37 similar lines suppressed before this one)")."""

    def __init__(
        self, burst: int = BURST, interval: float = INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._keys: dict[str, list[float]] = {}  # key -> [window start, lines logged, lines suppressed]

    def log(self, logger: logging.Logger, level: int, key: str, msg: str, *args: Any) -> bool:
        """Log `msg % args` unless `key` has used up its lines for this interval; True when it was logged."""
        now = self._clock()
        state = self._keys.pop(key, None)  # re-inserted below: the dict stays in least-recently-used order
        suppressed = 0
        if state is None or now - state[0] >= self.interval:
            suppressed = int(state[2]) if state is not None else 0
            state = [now, 0, 0]
        self._keys[key] = state
        while len(self._keys) > MAX_KEYS:
            del self._keys[next(iter(self._keys))]
        if state[1] >= self.burst:
            state[2] += 1
            return False
        state[1] += 1
        if suppressed:
            msg += " (and %d similar lines suppressed before this one)"
            args = (*args, suppressed)
        logger.log(level, msg, *args)
        return True

    def warning(self, logger: logging.Logger, key: str, msg: str, *args: Any) -> bool:
        """`log` at WARNING level."""
        return self.log(logger, logging.WARNING, key, msg, *args)
