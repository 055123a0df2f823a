"""Sentence boundaries for streamed text: emit each sentence as soon as it is certainly complete.

A stream's first piece may end earlier, at its first clause boundary (`first_clause_words`), so that speech starts
before a long first sentence has been typed out; every later piece is a whole sentence.
"""

from __future__ import annotations

import re
import unicodedata

# A Latin terminator only ends a sentence when whitespace follows ("3.5", "e.g." mid-word stay whole);
# CJK full-width terminators end one immediately. Newlines always end one.
_BOUNDARY = re.compile(r"(?<=[.!?…;:])([\"'”’)\]]*)\s+|(?<=[。！？；])|\n+")
_ABBREVIATIONS = frozenset("mr mrs ms dr prof sr jr st vs etc e.g i.e fig no approx dept est inc ltd co".split())
_DOTTED = re.compile(r"(?:[^\W\d_]\.)+[^\W\d_]")  # single letters joined by periods: "z.B.", "d.h.", "U.S."


def _ends_with_abbreviation(sentence: str) -> bool:
    words = sentence.rstrip().rsplit(None, 1)
    if not words:
        return False
    last = words[-1].lower().rstrip(".")
    return last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()) or _DOTTED.fullmatch(last) is not None


MAX_SENTENCE_CHARS = 1000
"""A "sentence" with no boundary for this long is split at its last space (bounds work per chunk: streamed text
arrives in tiny pieces, and rescanning an ever-growing buffer would cost quadratic time)."""

_TERMINATORS = ".!?…;:"
_CLOSERS = "\"'”’)]"

DEFAULT_FIRST_CLAUSE_WORDS = 5
"""Default of `server.first_clause_words`: words a stream's first piece needs before it may end at a clause."""


def _combining_marks() -> str:
    """The combining marks of the Basic Multilingual Plane (Unicode category M) as character-class ranges.

    `\\w` leaves them out, so a word ending in one (Hindi "लूँगी", a decomposed Latin "alle\\u0301") would end no
    clause and count as several words. CJK, Hangul, surrogates and private use hold none and are not looked at.
    """
    ranges: list[tuple[int, int]] = []
    for low, high in ((0x0300, 0x4E00), (0xA000, 0xAC00), (0xF900, 0x10000)):
        for code in range(low, high):
            if unicodedata.category(chr(code)).startswith("M"):
                if ranges and ranges[-1][1] == code - 1:
                    ranges[-1] = (ranges[-1][0], code)
                else:
                    ranges.append((code, code))
    return "".join(f"\\u{a:04x}-\\u{b:04x}" for a, b in ranges)


_MARKS = _combining_marks()
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # kana and Han: one syllable, one "word" each
_LETTER = rf"(?:[^\W_{_CJK}]|[{_MARKS}])"  # a letter or digit of a word (not CJK), or a mark on one
# A Latin word may hold inner apostrophes, periods, commas and hyphens ("don't", "e.g", "1,000", "3.5", "well-known").
_WORD = re.compile(rf"[{_CJK}]|{_LETTER}+(?:['’.,\-]{_LETTER}+)*")
_CLAUSE_CLOSERS = "\"'”’)\\]}»」』）》〉】"
# A clause ends at a mark right after a word (a letter or digit, then perhaps closing quotes or brackets) and only
# once the next character has arrived: white space after a Latin comma, semicolon or colon ("3,5", "1,000" and
# "e.g.," never end one), a spaced dash after a letter ("3 - 5" is a range), any character but a closer after a CJK
# mark. The match ends where the clause does (after its mark and closers).
_CLAUSE = re.compile(
    rf"(?<=[^\W_]|[{_MARKS}])[{_CLAUSE_CLOSERS}]*[,;:][{_CLAUSE_CLOSERS}]*(?=\s)"
    rf"|(?<=[^\W\d_]|[{_MARKS}])[{_CLAUSE_CLOSERS}]*[ \t]+(?:--|[-–—])(?=\s)"
    rf"|(?<=[^\W_]|[{_MARKS}])[{_CLAUSE_CLOSERS}]*[，、；：][{_CLAUSE_CLOSERS}]*(?=[^{_CLAUSE_CLOSERS}])"
)


def count_words(text: str) -> int:
    """Words in `text` for the first-clause rule: white-space separated words, and each CJK character (kana, Han)."""
    return len(_WORD.findall(text))


def first_clause_end(text: str, min_words: int) -> int:
    """End index of the first clause of `text` with at least `min_words` words, or 0 when none has ended yet."""
    if min_words <= 0:
        return 0
    words, start = 0, 0
    for match in _CLAUSE.finditer(text):
        # Marks need white space or a CJK mark next to them, so no word spans two segments.
        words += count_words(text[start : match.start()])
        start = match.start()
        if words >= min_words:
            return match.end()
    return 0


class SentenceSplitter:
    """Accumulates text chunks and returns complete sentences; `flush` returns the rest.

    With `first_clause_words` > 0 the first piece returned ends at the first clause boundary (comma, semicolon,
    colon, spaced dash, and the CJK marks `，、；：`) after at least that many words, when one comes before the first
    sentence's end; the pieces are the same however the text is cut into chunks.

    Work per chunk is proportional to the chunk plus at most one unfinished sentence: only text that can hold a new
    boundary is scanned again.
    """

    def __init__(self, first_clause_words: int = 0) -> None:
        self.first_clause_words = first_clause_words
        self._pending = ""  # the current sentence up to an abbreviation that did not end it
        self._rest = ""  # text after the last boundary
        self._scan = 0  # a new boundary cannot start before this index of _rest
        self._first = True  # no piece returned yet

    def feed(self, text: str) -> list[str]:
        """Add a chunk; return the pieces it completed (stripped, non-empty)."""
        sentences = self._feed_sentences(text)
        if not self._first or self.first_clause_words <= 0:
            return sentences
        if sentences:
            self._first = False
            head = sentences[0]
            cut = first_clause_end(head + " ", self.first_clause_words)
            if cut and head[cut:].strip():
                sentences[0:1] = [head[:cut].strip(), head[cut:].strip()]
            return sentences
        unfinished = self._pending + self._rest
        cut = first_clause_end(unfinished, self.first_clause_words)
        if not cut:
            return []
        self._first = False
        self._drop(cut)
        return [unfinished[:cut].strip()]

    def _drop(self, count: int) -> None:
        """Remove the first `count` characters of the unfinished sentence (a clause returned early)."""
        taken = min(count, len(self._pending))
        self._pending = self._pending[taken:]
        count -= taken
        self._rest = self._rest[count:]
        self._scan = max(0, self._scan - count)

    def _feed_sentences(self, text: str) -> list[str]:
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
        self._pending, self._rest, self._scan, self._first = "", "", 0, True
        return rest


def split_sentences(text: str) -> list[str]:
    """Split a whole text into sentences."""
    splitter = SentenceSplitter()
    sentences = splitter.feed(text)
    rest = splitter.flush()
    return sentences + ([rest] if rest else [])
