"""Sentence boundaries for streamed text: emit each sentence as soon as it is certainly complete."""

from __future__ import annotations

import re

# A Latin terminator only ends a sentence when whitespace follows ("3.5", "e.g." mid-word stay whole);
# CJK full-width terminators end one immediately. Newlines always end one.
_BOUNDARY = re.compile(r"(?<=[.!?…;:])([\"'”’)\]]*)\s+|(?<=[。！？；])|\n+")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e fig no approx dept est inc ltd co".split()
)


def _ends_with_abbreviation(sentence: str) -> bool:
    words = sentence.rstrip().rsplit(None, 1)
    if not words:
        return False
    last = words[-1].lower().rstrip(".")
    return last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha())


class SentenceSplitter:
    """Accumulates text chunks and returns complete sentences; `flush` returns the rest."""

    def __init__(self) -> None:
        self._buffer = ""

    def feed(self, text: str) -> list[str]:
        """Add a chunk; return the sentences it completed (stripped, non-empty)."""
        self._buffer += text
        sentences: list[str] = []
        start = 0
        pending = ""
        for match in _BOUNDARY.finditer(self._buffer):
            end = match.end(1) if match.group(1) is not None else match.start()
            piece = self._buffer[start:end]
            start = match.end()
            pending += piece
            if _ends_with_abbreviation(pending) and not match.group(0).startswith("\n"):
                pending += " "
                continue
            if pending.strip():
                sentences.append(pending.strip())
            pending = ""
        self._buffer = pending + self._buffer[start:]
        return sentences

    def flush(self) -> str:
        """Return whatever text remains (the last, unterminated sentence) and reset."""
        rest, self._buffer = self._buffer.strip(), ""
        return rest


def split_sentences(text: str) -> list[str]:
    """Split a whole text into sentences."""
    splitter = SentenceSplitter()
    sentences = splitter.feed(text)
    rest = splitter.flush()
    return sentences + ([rest] if rest else [])
