"""Upstream's per-call state: which entries a request's calls left behind, and cleaning them up.

Upstream keeps each call's state in dictionaries on the model object, keyed by a uuid made inside the call (the
token list, whether its LLM ended, the vocoder's cache...). A generator closed early leaves its entries behind (and
its LLM thread running). With several requests in flight, "the entries that appeared during my request" are not
only mine: each entry notes the thread that made it, and a request cleans up after its own calls only.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

_LOGGER = logging.getLogger(__name__)

SESSION_DICTS = ("tts_speech_token_dict", "llm_end_dict", "mel_overlap_dict", "flow_cache_dict", "hift_cache_dict")
"""Upstream's per-call dictionaries (CosyVoice 1 has all five, CosyVoice 2/3 the first two and the last)."""


class Sessions(dict):
    """One of upstream's per-call dictionaries, noting which thread made each entry (a call's entries are made on
    the thread that runs it), so a request cleans up after its own calls only, whatever the others do."""

    def __init__(self, entries: dict) -> None:
        super().__init__(entries)
        self.owners: dict[Any, int] = {}

    def __setitem__(self, key: Any, value: Any) -> None:
        if key not in self:
            self.owners[key] = threading.get_ident()
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self.owners.pop(key, None)
        super().__delitem__(key)

    def pop(self, key: Any, *default: Any) -> Any:
        self.owners.pop(key, None)
        return super().pop(key, *default)

    def mine(self) -> set[Any]:
        """Entries made on this thread."""
        me = threading.get_ident()
        return {key for key, owner in list(self.owners.items()) if owner == me and key in self}


def track(inner: Any) -> None:
    """Make upstream's per-call dictionaries on `inner` note which thread made each entry."""
    for attr in SESSION_DICTS:
        table = getattr(inner, attr, None)
        if isinstance(table, dict) and not isinstance(table, Sessions):
            setattr(inner, attr, Sessions(table))


def session_keys(inner: Any) -> set[str]:
    """Entries of upstream's per-call dictionaries (every call's)."""
    keys: set[str] = set()
    for attr in SESSION_DICTS:
        keys.update(getattr(inner, attr, None) or {})
    return keys


def own_keys(inner: Any) -> set[str]:
    """Entries of upstream's per-call dictionaries made on this thread and still there."""
    keys: set[str] = set()
    for attr in SESSION_DICTS:
        table = getattr(inner, attr, None)
        if isinstance(table, Sessions):
            keys.update(table.mine())
    return keys


def reap(inner: Any, timeout: float = 120.0) -> None:
    """A generator closed early leaves its per-call entries (and a running LLM thread) behind: wait for the LLM
    thread to finish, then drop the entries, so abandoned requests neither leak nor crash that thread."""
    leaked = own_keys(inner)
    if not leaked:
        return
    ends = getattr(inner, "llm_end_dict", {})
    deadline = time.monotonic() + timeout
    while any(ends.get(key) is False for key in leaked) and time.monotonic() < deadline:
        time.sleep(0.01)
    with inner.lock:
        for attr in SESSION_DICTS:
            table = getattr(inner, attr, None)
            if table is not None:
                for key in leaked:
                    table.pop(key, None)
    _LOGGER.debug("Cleaned %d abandoned CosyVoice session(s)", len(leaked))
