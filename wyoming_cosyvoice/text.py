"""Sentence boundaries for streamed text: emit each sentence as soon as it is certainly complete."""

from __future__ import annotations

import re

# A Latin terminator only ends a sentence when whitespace follows ("3.5", "e.g." mid-word stay whole);
# CJK full-width terminators end one immediately. Newlines always end one.
_BOUNDARY = re.compile(r"(?<=[.!?…;:])([\"'”’)\]]*)\s+|(?<=[。！？；])|\n+")
_ABBREVIATIONS = frozenset("mr mrs ms dr prof sr jr st vs etc e.g i.e fig no approx dept est inc ltd co".split())


def _ends_with_abbreviation(sentence: str) -> bool:
    words = sentence.rstrip().rsplit(None, 1)
    if not words:
        return False
    last = words[-1].lower().rstrip(".")
    return last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha())


MAX_SENTENCE_CHARS = 1000
"""A "sentence" with no boundary for this long is split at its last space (bounds work per chunk: streamed text
arrives in tiny pieces, and rescanning an ever-growing buffer would cost quadratic time)."""

_TERMINATORS = ".!?…;:"
_CLOSERS = "\"'”’)]"


class SentenceSplitter:
    """Accumulates text chunks and returns complete sentences; `flush` returns the rest.

    Work per chunk is proportional to the chunk plus at most one unfinished sentence: only text that can hold a new
    boundary is scanned again.
    """

    def __init__(self) -> None:
        self._pending = ""  # the current sentence up to an abbreviation that did not end it
        self._rest = ""  # text after the last boundary
        self._scan = 0  # a new boundary cannot start before this index of _rest

    def feed(self, text: str) -> list[str]:
        """Add a chunk; return the sentences it completed (stripped, non-empty)."""
        rest = self._rest + text
        pending = self._pending
        sentences: list[str] = []
        start = 0
        for match in _BOUNDARY.finditer(rest, self._scan):
            end = match.end(1) if match.group(1) is not None else match.start()
            piece = rest[start:end]
            start = match.end()
            pending += piece
            if _ends_with_abbreviation(pending) and not match.group(0).startswith("\n"):
                pending += " "
                continue
            if pending.strip():
                sentences.append(pending.strip())
            pending = ""
        rest = rest[start:]
        while len(pending) + len(rest) > MAX_SENTENCE_CHARS:
            whole = pending + rest
            cut = whole.rfind(" ", 1, MAX_SENTENCE_CHARS)
            if cut <= 0:
                cut = MAX_SENTENCE_CHARS
            if whole[:cut].strip():
                sentences.append(whole[:cut].strip())
            pending, rest = "", whole[cut:]
        self._pending, self._rest = pending, rest
        # A boundary completed by later text starts right after a terminator and any closing quotes.
        stripped = rest.rstrip(_CLOSERS)
        self._scan = len(stripped) if stripped and stripped[-1] in _TERMINATORS else len(rest)
        return sentences

    def flush(self) -> str:
        """Return whatever text remains (the last, unterminated sentence) and reset."""
        rest = (self._pending + self._rest).strip()
        self._pending, self._rest, self._scan = "", "", 0
        return rest


def split_sentences(text: str) -> list[str]:
    """Split a whole text into sentences."""
    splitter = SentenceSplitter()
    sentences = splitter.feed(text)
    rest = splitter.flush()
    return sentences + ([rest] if rest else [])
