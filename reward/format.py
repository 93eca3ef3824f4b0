"""Format check of a search-agent response: is the tag protocol followed?

The response is what verl decodes after the prompt: the policy's text plus the environment's ``<information>``
blocks. A well-formed response is a sequence of blocks separated by whitespace::

    ( <think>…</think> | <search>query</search> <information>…</information> )*  <answer>…</answer>  [EOS]

* tags are never nested and every tag is closed; each ``<search>`` is followed directly by an ``<information>``
  block and every ``<information>`` block answers a search;
* ``<information>`` bodies are opaque: they come from the retriever, so tags quoted inside them are ignored;
* exactly one ``<answer>``, and nothing but whitespace or end-of-sequence tokens (``<|im_end|>`` ...) after it —
  decoding without ``skip_special_tokens`` leaves those in the text;
* for RAMP, the answer lists one span per mask (``a | b``), or, if allowed, is the reconstructed paragraph.

The result says *why* a response fails (a :class:`FormatReason`), because the reasons are logged as metrics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from envs.prompts import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    INFO_CLOSE,
    INFO_OPEN,
    SEARCH_CLOSE,
    SEARCH_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
)
from reward.answer_match import DEFAULT_PARAGRAPH_MIN_WORDS, SPAN_DELIMITER, is_paragraph_answer

# End-of-sequence / padding markers of common chat models, tolerated after the answer.
DEFAULT_EOS_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<eos>", "<|end|>")


class FormatReason(IntEnum):
    """Why a response is (not) well formed. The integer goes into verl's reward_extra_info as ``format_code``."""

    OK = 0
    NO_ANSWER = 1
    MULTIPLE_ANSWERS = 2
    TEXT_AFTER_ANSWER = 3
    UNCLOSED_TAG = 4
    UNEXPECTED_CLOSE = 5
    NESTED_TAG = 6
    SEARCH_WITHOUT_INFORMATION = 7
    INFORMATION_WITHOUT_SEARCH = 8
    EMPTY_SEARCH = 9
    EMPTY_ANSWER = 10
    UNTAGGED_TEXT = 11
    MISSING_THINK = 12
    SPAN_COUNT_MISMATCH = 13

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class FormatRules:
    """What counts as well formed; every field can be set from the reward config (``format.<field>``)."""

    require_think: bool = False  # at least one <think> block
    allow_untagged_text: bool = False  # free text between blocks (never after the answer)
    allow_paragraph: bool = True  # a multi-mask RAMP answer may be the reconstructed passage
    paragraph_min_words: int = DEFAULT_PARAGRAPH_MIN_WORDS
    eos_tokens: tuple[str, ...] = DEFAULT_EOS_TOKENS

    def __post_init__(self) -> None:
        if self.paragraph_min_words < 1:
            raise ValueError(f"format.paragraph_min_words must be >= 1, got {self.paragraph_min_words}")
        object.__setattr__(self, "eos_tokens", tuple(self.eos_tokens))


class FormatResult(NamedTuple):
    ok: bool
    reason: FormatReason
    answer: str | None = None  # the answer body (stripped) when an answer block was parsed
    num_searches: int = 0
    num_thinks: int = 0
    paragraph: bool = False  # a RAMP answer read as a reconstructed paragraph


_OPENERS = {THINK_OPEN: "think", SEARCH_OPEN: "search", INFO_OPEN: "information", ANSWER_OPEN: "answer"}
_CLOSERS = {THINK_CLOSE: "think", SEARCH_CLOSE: "search", INFO_CLOSE: "information", ANSWER_CLOSE: "answer"}
_CLOSER_OF = {name: tag for tag, name in _CLOSERS.items()}
_TAG_RE = re.compile("|".join(re.escape(tag) for tag in [*_OPENERS, *_CLOSERS]))

# The fast path (see _walk_well_formed) reads one well-formed block per regex match. After optional whitespace,
# _BLOCK_RE matches a think block, a search block with a non-blank query followed by the opening of its
# <information> block, or the answer block (its body in the group "answer"). A body runs up to its closer without
# any protocol tag inside: runs of "[^<]" joined by "<"s that do not start a tag. (_body_then spells out the usual
# case, no "<" at all, as its own branch: it is the cheapest for the regex engine.)
_NOT_A_TAG = "<(?!" + "|".join(re.escape(tag[1:]) for tag in [*_OPENERS, *_CLOSERS]) + ")"


def _body_then(closer: str) -> str:
    closer = re.escape(closer)
    return f"[^<]*(?:{closer}|(?:{_NOT_A_TAG}[^<]*)+{closer})"


_BLOCK_RE = re.compile(
    rf"\s*(?:{re.escape(THINK_OPEN)}{_body_then(THINK_CLOSE)}"
    rf"|(?P<search>{re.escape(SEARCH_OPEN)})(?!\s*{re.escape(SEARCH_CLOSE)}){_body_then(SEARCH_CLOSE)}"
    rf"\s*{re.escape(INFO_OPEN)}"
    rf"|{re.escape(ANSWER_OPEN)}(?P<answer>[^<]*(?:{_NOT_A_TAG}[^<]*)*){re.escape(ANSWER_CLOSE)})"
)

DEFAULT_RULES = FormatRules()


class _Walk(NamedTuple):
    """Where reading the blocks up to the answer ended: a failure, or the answer and the position after it."""

    failure: FormatReason | None
    answer: str | None
    num_searches: int
    num_thinks: int
    end: int


def check_format(response: str, *, num_masks: int | None = None, rules: FormatRules = DEFAULT_RULES) -> FormatResult:
    """Check ``response`` against the tag protocol; ``num_masks`` (RAMP) also checks the number of answer spans."""
    walk = _walk_well_formed(response)
    if walk is None:
        walk = _walk_tags(response, rules)
    failure, answer, num_searches, num_thinks, pos = walk
    if failure is not None:
        return FormatResult(False, failure, answer, num_searches, num_thinks)

    def fail(reason: FormatReason) -> FormatResult:
        return FormatResult(False, reason, answer, num_searches, num_thinks)

    if answer is None:
        return fail(FormatReason.NO_ANSWER)
    tail = response[pos:]
    if tail and not tail.isspace():
        for token in rules.eos_tokens:
            tail = tail.replace(token, "")
        if tail.strip():
            return fail(FormatReason.TEXT_AFTER_ANSWER)
    if not answer:
        return fail(FormatReason.EMPTY_ANSWER)
    if rules.require_think and num_thinks == 0:
        return fail(FormatReason.MISSING_THINK)

    paragraph = False
    # answer.count(delimiter) + 1 == len(split_spans(answer)), without building the list
    if num_masks is not None and answer.count(SPAN_DELIMITER) + 1 != num_masks:
        paragraph = rules.allow_paragraph and is_paragraph_answer(answer, num_masks, rules.paragraph_min_words)
        if not paragraph:
            return fail(FormatReason.SPAN_COUNT_MISMATCH)
    return FormatResult(True, FormatReason.OK, answer, num_searches, num_thinks, paragraph)


def _walk_tags(response: str, rules: FormatRules) -> _Walk:
    """The definition: read the response tag by tag, up to the end of the text (or the first failure)."""
    search = _TAG_RE.search
    pos = 0
    num_searches = num_thinks = 0
    awaiting_info = False
    answer: str | None = None

    def fail(reason: FormatReason) -> _Walk:
        return _Walk(reason, answer, num_searches, num_thinks, pos)

    while (match := search(response, pos)) is not None:
        tag = match.group()
        if answer is not None:
            return fail(FormatReason.MULTIPLE_ANSWERS if tag == ANSWER_OPEN else FormatReason.TEXT_AFTER_ANSWER)
        if not rules.allow_untagged_text and pos < match.start():
            between = response[pos : match.start()]
            if not between.isspace():
                return fail(FormatReason.UNTAGGED_TEXT)
        name = _OPENERS.get(tag)
        if name is None:
            return fail(FormatReason.UNEXPECTED_CLOSE)
        if awaiting_info and name != "information":
            return fail(FormatReason.SEARCH_WITHOUT_INFORMATION)
        body_start = match.end()

        if name == "information":
            if not awaiting_info:
                return fail(FormatReason.INFORMATION_WITHOUT_SEARCH)
            end = response.find(INFO_CLOSE, body_start)
            if end < 0:
                return fail(FormatReason.UNCLOSED_TAG)
            awaiting_info = False
            pos = end + len(INFO_CLOSE)
            continue

        closing = search(response, body_start)
        if closing is None:
            return fail(FormatReason.UNCLOSED_TAG)
        if closing.group() != _CLOSER_OF[name]:
            is_close = closing.group() in _CLOSERS
            return fail(FormatReason.UNEXPECTED_CLOSE if is_close else FormatReason.NESTED_TAG)
        body = response[body_start : closing.start()]
        pos = closing.end()
        if name == "search":
            if not body.strip():
                return fail(FormatReason.EMPTY_SEARCH)
            num_searches += 1
            awaiting_info = True
        elif name == "think":
            num_thinks += 1
        else:
            answer = body.strip()
    return _Walk(None, answer, num_searches, num_thinks, pos)


def _walk_well_formed(response: str) -> _Walk | None:
    """The fast path of :func:`_walk_tags` for responses whose blocks are all well formed (almost all of them).

    Reads whole blocks (``_BLOCK_RE``) separated by whitespace up to the answer, then looks for a tag after it.
    Returns None -- the caller then runs ``_walk_tags`` -- as soon as anything else shows up. On the blocks it
    accepts, ``_walk_tags`` finds every opener followed by its closer with only whitespace in between, so
    ``allow_untagged_text`` makes no difference and the result is the same (tests/test_reward.py checks it).
    """
    match_block = _BLOCK_RE.match
    pos = num_searches = num_thinks = 0
    while (block := match_block(response, pos)) is not None:
        pos = block.end()
        kind = block.lastgroup
        if kind is None:
            num_thinks += 1
        elif kind == "search":
            num_searches += 1
            # The retriever's text is opaque: skip to the first INFO_CLOSE. It seldom holds a "<", so the first "<"
            # (a memchr, much faster than a substring search) is usually where INFO_CLOSE starts.
            end = response.find("<", pos)
            if end >= 0 and not response.startswith(INFO_CLOSE, end):
                end = response.find(INFO_CLOSE, end)
            if end < 0:
                return None
            pos = end + len(INFO_CLOSE)
        else:
            answer = block.group("answer").strip()
            after = _TAG_RE.search(response, pos)
            if after is None:
                return _Walk(None, answer, num_searches, num_thinks, pos)
            reason = FormatReason.MULTIPLE_ANSWERS if after.group() == ANSWER_OPEN else FormatReason.TEXT_AFTER_ANSWER
            return _Walk(reason, answer, num_searches, num_thinks, pos)
    return None


def extract_answer(response: str) -> str | None:
    """Body of the last complete ``<answer>…</answer>`` block (stripped), or None: used to score even when the
    format check fails, so the answer metrics stay informative."""
    end = response.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = response.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    return response[start + len(ANSWER_OPEN) : end].strip()
