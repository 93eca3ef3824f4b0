"""Sentence boundaries, so that no masked span runs from one sentence into the next.

Why: a span such as "D.C. He" (an abbreviation that ends a sentence, then the next sentence's first word) is no
knowledge entity, and a search agent cannot recover it. The boundaries come from pysbd, a rule-based segmenter
(pure Python, English and Chinese rules, abbreviations, initials, decimals and quotations handled), with two
adjustments:

* pysbd ends a sentence after a multi-period abbreviation followed by a sentence starter only for U.S./U.K./E.U.
  ("in the U.S. He ..."); we apply that rule to every such abbreviation ("Washington, D.C. He ...").
* a boundary counts only where a sentence really ends: after . ! ? … (or their CJK forms), possibly followed by
  closing quotes or brackets, or at a line break. pysbd's list-item splits ("1) foo 2) bar") are not kept.

Speed: pysbd takes ~1.3 ms for a Wikipedia paragraph, some 25 times the offline extractor's own cost. Most spans
cannot cross a boundary (they contain no sentence-ending mark), so :func:`crosses_sentence` segments a passage only
when a span might, and at most once per passage (the result is cached by text).
"""

from __future__ import annotations

import re
from bisect import bisect_right
from functools import lru_cache

TERMINALS = ".!?\u2026\u3002\uff0e\uff01\uff1f\uff61"  # . ! ? … 。 ． ！ ？ ｡
CLOSERS = "\"')]}\u00bb\u201d\u2019\u300d\u300f\uff09\u3011\u300b\u3009"  # " ' ) ] } » ” ’ 」 』 ） 】 》 〉
_LINE_BREAKS = "\n\r"
# Sentence starters after which pysbd ends a sentence at "U.S." (pysbd's English SENTENCE_STARTERS).
_STARTERS = (
    "A Being Did For He How However I In It Millions More She That The There They We What When Where Who Why"
).split()
_ABBREVIATION_THEN_STARTER = re.compile(rf"\b(?:[A-Z]\.){{2,}}\s+(?=(?:{'|'.join(_STARTERS)})\s)")
# A full stop ends a sentence only before a space ("3.5", "U.S" and "e.g" don't); other marks end one anywhere.
_MAY_END = re.compile(f"[{re.escape(TERMINALS.replace('.', '') + _LINE_BREAKS)}]|\\.[{re.escape(CLOSERS)}]*\\s")


@lru_cache(maxsize=4)
def _segmenter(language: str):
    import pysbd

    return pysbd.Segmenter(language=language, clean=False)


@lru_cache(maxsize=256)
def sentence_starts(text: str) -> tuple[int, ...]:
    """Offsets where the second, third, ... sentence of ``text`` starts (at its first non-space character)."""
    from masksearch_rl.ramp.extractors import detect_language  # (extractors imports this module)

    language = "zh" if detect_language(text) == "zh" else "en"
    # The processor's sentences, placed with str.find: pysbd's own char spans compile a regex per sentence, a third
    # of its time. (pysbd is pinned below 0.4; its last release is from 2021.)
    starts, cursor = set(), 0
    for sentence in _segmenter(language).processor(text).process():
        index = text.find(sentence, cursor)
        if index >= 0:
            starts.add(index)
            cursor = index + len(sentence)
    starts.update(match.end() for match in _ABBREVIATION_THEN_STARTER.finditer(text))
    return tuple(sorted(start for start in starts if 0 < start < len(text) and _ends_sentence(text, start)))


def _ends_sentence(text: str, start: int) -> bool:
    """Whether the text before ``start`` ends a sentence: a line break, or a terminal mark, then closing quotes or
    brackets, then spaces (a full stop needs the space: "3.5" and "U.S" are no sentence ends)."""
    index = start
    while index > 0 and text[index - 1].isspace():
        index -= 1
        if text[index] in _LINE_BREAKS:
            return True
    spaced = index < start
    while index > 0 and text[index - 1] in CLOSERS:
        index -= 1
    return index > 0 and text[index - 1] in TERMINALS and (spaced or text[index - 1] != ".")


def may_cross(span: str) -> bool:
    """Cheap test, true for every span (stripped of spaces) that crosses a boundary: a sentence-ending mark or a line
    break before its last character, or a first character that closes a quotation or bracket (the sentence's end
    just before it). The tests check it against :func:`sentence_starts` on random text."""
    return bool(span) and (span[0] in CLOSERS or bool(_MAY_END.search(span, 0, len(span) - 1)))


def crosses_sentence(text: str, start: int, end: int) -> bool:
    """True when ``text[start:end]`` runs over a sentence boundary (one inside it, not at its edges)."""
    if not may_cross(text[start:end]):
        return False
    starts = sentence_starts(text)
    index = bisect_right(starts, start)
    return index < len(starts) and starts[index] < end
