"""Salient-span extraction: which spans of a passage are worth masking.

Two extractors sit behind one small :class:`SpanExtractor` protocol:

* :class:`OfflineExtractor` needs no model or key: regex rules for dates, years, numbers, capitalised names and
  quoted titles, plus the passage's own ``entities`` annotations (the synthetic world writes them). It is the
  default in tests and the quickstart, and fast enough to run over a whole Wikipedia dump on a laptop.
* :class:`LLMExtractor` asks any OpenAI-compatible endpoint for knowledge entities (the paper's approach), parses
  the reply as JSON (never eval) and reports replies that don't parse instead of crashing.

Extractors only *propose* spans; :func:`masksearch_rl.ramp.masking.validate_candidates` decides which proposals
are usable (they occur exactly once, on word boundaries, within one sentence, not at the passage start).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from masksearch_rl.corpus.passage import Passage
from masksearch_rl.ramp.sentences import crosses_sentence, sentence_starts

if TYPE_CHECKING:
    from masksearch_rl.llm import LLMClient


@dataclass(frozen=True)
class Span:
    """A proposed span: its text as written in the passage and a coarse type (for statistics and weighting)."""

    text: str
    type: str


@dataclass
class Extraction:
    """What an extractor proposes for one passage; ``parse_error`` is set when the extractor's output was unusable."""

    spans: list[Span] = field(default_factory=list)
    parse_error: str | None = None


class SpanExtractor(Protocol):
    """Anything that proposes spans for a passage. Async because the LLM extractor waits on the network.
    ``text`` overrides the passage text (the pipeline may have put the title in front)."""

    name: str

    async def extract(self, passage: Passage, text: str | None = None) -> Extraction: ...


# --------------------------------------------------------------------------------------------------------------
# Language detection (picks the LLM prompt and the mask-weighting unit)

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]")


def is_cjk(char: str) -> bool:
    return bool(_CJK.match(char))


def detect_language(text: str) -> str:
    """``"zh"`` when CJK characters make up a fifth or more of the non-space characters, else ``"en"``."""
    sample = text[:2000]
    if sample.isascii():
        return "en"
    letters = len("".join(sample.split()))
    if letters == 0:
        return "en"
    return "zh" if len(_CJK.findall(sample)) / letters >= 0.2 else "en"


# --------------------------------------------------------------------------------------------------------------
# Offline extractor

_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"

# Speed note: Python's re scans fastest when a pattern's first element is a plain character class (it then skips
# ahead to candidate characters in C), so the patterns below start with one, and "not preceded by a word
# character" is checked in Python (_starts_word) instead of with a leading lookbehind. ASCII [0-9] on purpose.
_MONTH_HINT = re.compile(_MONTHS)
_DATE = re.compile(
    rf"(?:[0-9]{{1,2}}\s)?(?:{_MONTHS})(?:\s[0-9]{{1,2}}(?:st|nd|rd|th)?)?(?:,?\s[0-9]{{3,4}})?(?![\w])"
)  # 27 February 1980 | February 27, 1980 | February 1980 (checked to contain a digit)
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}(?![\w])")
_YEAR = re.compile(r"[12][0-9]{3}s?(?![\w])(?:\s?(?:BC|BCE|AD|CE)(?![\w]))?")
# Plain numbers with optional thousands separators, decimals and a percent sign; not parts of longer tokens.
_NUMBER = re.compile(r"[0-9][0-9]*(?:,[0-9]{3})*(?:\.[0-9]+)?%?(?![\w%])")
# Quoted titles: the quote opens after a space or bracket and closes before a non-word character ('"a"s, "b"'
# yields only "b"); the inside starts with a capital or digit and doesn't end like a sentence (quotations do).
_QUOTED = re.compile(
    r"\"([A-Z0-9\u00c0-\u00de][^\"\n]{0,78}[\w)!?])\"(?![\w])"
    r"|\u201c([A-Z0-9\u00c0-\u00de][^\u201d\n]{0,78}[\w)!?])\u201d"
)
_UPPER = "A-Z\u00c0-\u00d6\u00d8-\u00de"
_CAP_WORD = rf"[{_UPPER}](?:\.(?:[A-Z]\.)+|[\w'\u2019-]*)"  # "Paris", "O'Neill", "Jean-Paul", "U.S."
_INITIAL = r"[A-Z]\."  # "Charles E. Merriam"
_ENDS_WITH_INITIAL = re.compile(r"\s[A-Z]\.$")
_CONNECTOR = r"(?:of|the|for|de|del|della|der|den|di|da|du|des|la|le|van|von|y|bin|al)"
_NAME = re.compile(rf"{_CAP_WORD}(?:(?:\s+{_CONNECTOR}|\s+{_INITIAL})*\s+[{_UPPER}](?:\.(?:[A-Z]\.)+|[\w'\u2019-]*))*")
_CONNECTOR_WORD = re.compile(_CONNECTOR)
_POSSESSIVE = re.compile(r"['\u2019]s?$")
_CONTINUES_WORD = set("'\u2019-.,_")

# Capitalised words that start sentences or clauses rather than names; stripped from the front of a name match.
_NOT_NAMES = frozenset(
    """A An The This That These Those It Its He She His Her They Their There Here We Our You Your I In On At By For
    From To With As After Before During Since Until While When Where Which Who Whose What Although Though However
    But And Or Nor So Yet If Then Thus Also Both Each Every Many Most Some Such Other Another One Two Three Four
    Five Six Seven Eight Nine Ten First Second Third Later Early Unlike Despite Following According Between Among
    Under Over Upon Into About Around Through Throughout Within Without Because Once Only Not No All Several
    Monday Tuesday Wednesday Thursday Friday Saturday Sunday BC BCE AD CE""".split()
) | frozenset(_MONTHS.split("|"))

_MAX_QUOTED_WORDS = 8


def _starts_word(text: str, start: int) -> bool:
    """True when ``text[start]`` begins a token: the character before is not a letter, digit or joiner."""
    if start == 0:
        return True
    before = text[start - 1]
    return not (before.isalnum() or before in _CONTINUES_WORD)


class OfflineExtractor:
    """Regex rules plus passage annotations; deterministic, no key, thousands of passages per second per core."""

    name = "offline"

    def __init__(self, use_annotations: bool = True):
        self.use_annotations = use_annotations

    async def extract(self, passage: Passage, text: str | None = None) -> Extraction:
        return self.extract_sync(passage, text)

    def extract_sync(self, passage: Passage, text: str | None = None) -> Extraction:
        """Propose spans of ``text`` (defaults to the passage text). Earlier rules win when two propose the same
        string: annotations, then dates, quoted titles, names, years, numbers."""
        text = passage.text if text is None else text
        seen: set[str] = set()
        spans: list[Span] = []

        def add(candidate: str, kind: str) -> None:
            candidate = candidate.strip()
            if candidate and candidate not in seen:
                seen.add(candidate)
                spans.append(Span(candidate, kind))

        if self.use_annotations:
            for entity in passage.entities or ():
                if isinstance(entity, dict) and isinstance(entity.get("text"), str):
                    add(entity["text"], str(entity.get("type") or "annotation"))
        if _MONTH_HINT.search(text):
            for match in _DATE.finditer(text):
                if _starts_word(text, match.start()) and any(c.isdigit() for c in match.group(0)):
                    add(match.group(0), "date")
        for match in _ISO_DATE.finditer(text):
            if _starts_word(text, match.start()):
                add(match.group(0), "date")
        for match in _QUOTED.finditer(text):
            inner = match.group(1) or match.group(2)
            start = match.start()
            opens = match.group(2) or (_starts_word(text, start) and text[start - 1 : start] != '"')
            inner_start = match.start(1) if match.group(1) else match.start(2)
            if (
                opens
                and len(inner.split()) <= _MAX_QUOTED_WORDS
                and not crosses_sentence(text, inner_start, inner_start + len(inner))
            ):
                add(inner, "title")
        for name in _names(text):
            add(name, "name")
        for match in _YEAR.finditer(text):
            if _starts_word(text, match.start()) and (match.group(0)[0] == "1" or match.group(0)[1] == "0"):
                add(match.group(0), "year")  # 1000-2099
        for match in _NUMBER.finditer(text):
            if _starts_word(text, match.start()):
                add(match.group(0), "number")
        return Extraction(spans)


def _names(text: str) -> list[str]:
    """Capitalised names, as written in the text. A match that runs over a sentence end ("D.C. He") is cut there;
    leading function words ("The", "In", ...) are dropped; a single word counts only when it does not start a
    sentence (it may be capitalised just because of its position)."""
    names = []
    for match in _NAME.finditer(text):
        start, end = match.span()
        if start and not _starts_word(text, start):
            continue
        pieces = _sentence_pieces(text, start, end) if crosses_sentence(text, start, end) else [(start, end)]
        for piece_start, piece_end in pieces:
            if piece_end < end and _ENDS_WITH_INITIAL.search(text, piece_start, piece_end):
                piece_end -= 1  # "World War I." before a new sentence: the period ends the sentence
            name = _clean_name(text, piece_start, piece_end)
            if name:
                names.append(name)
    return names


def _sentence_pieces(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """``text[start:end]`` cut at the sentence starts inside it, each piece without its trailing spaces."""
    cuts = [start, *(b for b in sentence_starts(text) if start < b < end), end]
    return [(a, a + len(text[a:b].rstrip())) for a, b in zip(cuts, cuts[1:])]


def _clean_name(text: str, start: int, end: int) -> str | None:
    """The name in ``text[start:end]`` (one name-regex match, or the part of one inside a sentence), or None."""
    words = text[start:end].split()
    if not words:
        return None
    if words[0] in _NOT_NAMES:
        while words and (words[0] in _NOT_NAMES or _CONNECTOR_WORD.fullmatch(words[0])):
            start = text.index(words[1], start + len(words[0])) if len(words) > 1 else end
            words.pop(0)
        if not words:
            return None
    last = words[-1]
    if last[-1] in "'\u2019s-":
        trimmed = _POSSESSIVE.sub("", last).rstrip("-")
        end -= len(last) - len(trimmed)
    if end - start < 2 or (len(words) == 1 and _sentence_initial(text, start)):
        return None
    return text[start:end]


def _sentence_initial(text: str, start: int) -> bool:
    index = start - 1
    while index >= 0 and text[index].isspace():
        index -= 1
    return index < 0 or text[index] in ".!?:;\n\"'(\u201c"


# --------------------------------------------------------------------------------------------------------------
# LLM extractor

_PROMPT_EN = """List the knowledge entities in the passage below: names of people, places, organisations, creative \
works and events, dates, numbers, and short technical terms. Choose only entities that a reader could not work out \
from the rest of the passage, so that filling them in would require looking them up.

Rules:
- Copy each entity exactly as it is written in the passage, as whole words (not part of a word).
- Prefer the finest-grained entity: when entities are nested or adjacent, give the smallest meaningful one.
- List each entity once, and leave out entities that occur more than once in the passage.
- Keep entities short (at most about six words).

Reply with a JSON array of strings and nothing else, for example: ["Marie Curie", "Warsaw", "1867"]

Passage:
{passage}"""

_PROMPT_ZH = """请列出下面段落中的知识实体：人物、地点、机构、作品与事件的名称，日期、数字，以及简短的专业术语。\
只选择读者无法从段落其余部分推断出来、需要检索才能补全的实体。

要求：
- 每个实体必须与段落中的写法完全一致，且是完整的词，不能只取词的一部分。
- 优先选择最细粒度的实体：实体相互嵌套或相邻时，只给出最小的有意义的实体。
- 每个实体只列一次；在段落中出现不止一次的实体不要列出。
- 实体要简短（一般不超过十个字）。

只输出一个由字符串组成的 JSON 数组，不要输出其他内容，例如：["居里夫人", "华沙", "1867"]

段落：
{passage}"""

_SYSTEM_EN = "You extract entities from text for a fill-in-the-blank research exercise. You reply with JSON only."
_SYSTEM_ZH = "你负责从文本中抽取实体，用于需要检索才能完成的填空练习。你只输出 JSON。"


def extraction_messages(text: str, language: str | None = None) -> list[dict[str, str]]:
    """The chat request for one passage, in the passage's language."""
    language = language or detect_language(text)
    if language == "zh":
        return [{"role": "system", "content": _SYSTEM_ZH}, {"role": "user", "content": _PROMPT_ZH.format(passage=text)}]
    return [{"role": "system", "content": _SYSTEM_EN}, {"role": "user", "content": _PROMPT_EN.format(passage=text)}]


class SpanParseError(ValueError):
    """The model's reply is not a JSON list of strings."""


_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)


def parse_span_list(reply: str) -> list[str]:
    """Parse a reply into span strings: a JSON array (optionally inside a ```json fence, or surrounded by prose), or
    an object whose single list value holds them. Integers become strings; other non-strings are skipped.
    Raises :class:`SpanParseError` for anything else. Never evaluates the reply."""
    if not isinstance(reply, str) or not reply.strip():
        raise SpanParseError("empty reply")
    text = reply.strip()
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        start, end = text.find("["), text.rfind("]")
        if start < 0 or end <= start:
            raise SpanParseError(f"no JSON array in reply: {reply[:80]!r}") from None
        try:
            value = json.loads(text[start : end + 1])
        except (json.JSONDecodeError, RecursionError):
            raise SpanParseError(f"reply is not valid JSON: {reply[:80]!r}") from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise SpanParseError("JSON object without exactly one list of entities")
        value = lists[0]
    if not isinstance(value, list):
        raise SpanParseError(f"expected a JSON array, got {type(value).__name__}")
    spans = []
    for entry in value:
        if isinstance(entry, bool):
            continue
        if isinstance(entry, int):
            entry = str(entry)
        if isinstance(entry, str) and entry.strip():
            spans.append(entry.strip())
    return spans


def _parses(reply: str) -> bool:
    try:
        parse_span_list(reply)
    except SpanParseError:
        return False
    return True


class LLMExtractor:
    """Knowledge-entity extraction with an OpenAI-compatible chat model (the paper used Qwen-Turbo).

    Endpoint errors (after the client's bounded retries) propagate as ``LLMError`` so the pipeline can leave the
    passage for a later run; replies that don't parse come back as ``Extraction(parse_error=...)``.
    """

    name = "llm"

    def __init__(self, client: LLMClient, max_spans: int = 32):
        self.client = client
        self.max_spans = max_spans

    async def extract(self, passage: Passage, text: str | None = None) -> Extraction:
        text = passage.text if text is None else text
        reply = await self.client.chat(extraction_messages(text), accept=_parses)  # unparseable: not cached
        try:
            texts = parse_span_list(reply)
        except SpanParseError as err:
            return Extraction([], parse_error=str(err))
        return Extraction([Span(t, "llm") for t in texts[: self.max_spans]])
