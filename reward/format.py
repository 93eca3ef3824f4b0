"""Format check of a search-agent response: is the tag protocol (or its hermes tool-call variant) followed?

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

The hermes variant (``FormatRules.protocol="hermes"``; verl's ``tool_agent`` loop with our search tool, chosen per
sample by the reward from the row's ``agent_name``) is what verl decodes from a Qwen2.5-style chat: the policy's
turns, each tool call ``<tool_call>{"name": …, "arguments": …}</tool_call>``, the chat template's tool turn
``user <tool_response>…</tool_response> assistant`` (role headers stay as plain text once special tokens are
skipped), and the final ``<answer>…</answer>``. It is checked as (:func:`_walk_hermes`):

* every group of tool calls is answered by one to as many tool responses before any other block, and no tool response
  comes unasked; a call's body is a JSON object with ``name`` and ``arguments`` (what verl's hermes parser accepts);
* ``<tool_response>`` bodies are opaque, ``<think>`` blocks optional, tags never nested and always closed;
* free text between blocks is part of the protocol (the policy's reasoning, the template's role headers);
* exactly one ``<answer>`` and nothing after it, as above. FormatReason's search codes stand for tool calls there:
  SEARCH_WITHOUT_INFORMATION is an unanswered call, INFORMATION_WITHOUT_SEARCH an unasked response, EMPTY_SEARCH an
  empty call; BAD_TOOL_CALL a call verl cannot parse.

Every rollout is checked, so speed matters: ``_walk_tags`` is the definition (read tag by tag), and ``_walk`` reads
the usual well-formed blocks one regex match per step, handing over to ``_walk_tags`` at the first irregularity;
tests/test_reward.py checks the result against a plain reference implementation on adversarial inputs.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import NamedTuple

from envs.prompts import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    INFO_CLOSE,
    INFO_OPEN,
    SEARCH_CLOSE,
    SEARCH_OPEN,
    TAG_AGENT_NAME,
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_AGENT_NAME,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_RESPONSE_CLOSE,
    TOOL_RESPONSE_OPEN,
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
    BAD_TOOL_CALL = 14  # hermes only: a tool call that is not {"name": ..., "arguments": ...} JSON
    ANSWER_TOO_LONG = 15  # QA: more words than format.max_answer_words

    @property
    def label(self) -> str:
        return self.name.lower()


PROTOCOLS = ("tags", "hermes")
# The protocol each agent loop's responses follow (rows name their loop in ``agent_name``).
AGENT_PROTOCOLS = {TAG_AGENT_NAME: "tags", TOOL_AGENT_NAME: "hermes"}


@dataclass(frozen=True)
class FormatRules:
    """What counts as well formed; every field can be set from the reward config (``format.<field>``)."""

    require_think: bool = False  # at least one <think> block
    allow_untagged_text: bool = False  # free text between blocks (never after the answer); hermes always allows it
    allow_paragraph: bool = True  # a multi-mask RAMP answer may be the reconstructed passage
    paragraph_min_words: int = DEFAULT_PARAGRAPH_MIN_WORDS
    eos_tokens: tuple[str, ...] = DEFAULT_EOS_TOKENS
    # "tags" (<search>/<information>) or "hermes" (<tool_call>/<tool_response>); a row's agent_name overrides it.
    protocol: str = "tags"
    # QA answers longer than this many words are ill-formed (0: no limit). A recall reward pays for every gold token
    # an answer contains, so without a limit a policy can list candidates; RAMP answers are never limited.
    max_answer_words: int = 0

    def __post_init__(self) -> None:
        if self.paragraph_min_words < 1:
            raise ValueError(f"format.paragraph_min_words must be >= 1, got {self.paragraph_min_words}")
        if self.max_answer_words < 0:
            raise ValueError(f"format.max_answer_words must be >= 0 (0: no limit), got {self.max_answer_words}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"format.protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        object.__setattr__(self, "eos_tokens", tuple(self.eos_tokens))


@functools.lru_cache(maxsize=64)
def rules_for_protocol(rules: FormatRules, protocol: str) -> FormatRules:
    """``rules`` with another protocol (cached: the reward asks for it per sample)."""
    return rules if rules.protocol == protocol else replace(rules, protocol=protocol)


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

# The fast path (see _walk) reads a well-formed response one step per regex match. A step is optional
# whitespace, then a think block, a search block up to the opening of its <information> block, or the answer block;
# a think block may be directly followed by one of the other two (think-search-information is the usual round).
# A body runs up to its closer without any protocol tag inside: runs of "[^<]" joined by "<"s that do not start a
# tag (_body_then spells out the usual case, no "<" at all, as its own branch: it is the cheapest for the engine).
# A search's query may not be blank. The named group that closes last says what the step read (_STEP_KINDS); the
# answer groups hold the answer's body.
_NOT_A_TAG = "<(?!" + "|".join(re.escape(tag[1:]) for tag in [*_OPENERS, *_CLOSERS]) + ")"


def _body_then(closer: str) -> str:
    closer = re.escape(closer)
    return f"[^<]*(?:{closer}|(?:{_NOT_A_TAG}[^<]*)+{closer})"


def _answer_block(group: str) -> str:
    return rf"{re.escape(ANSWER_OPEN)}(?P<{group}>[^<]*(?:{_NOT_A_TAG}[^<]*)*){re.escape(ANSWER_CLOSE)}"


_THINK_BLOCK = rf"{re.escape(THINK_OPEN)}{_body_then(THINK_CLOSE)}"
_SEARCH_BLOCK = (
    rf"{re.escape(SEARCH_OPEN)}(?!\s*{re.escape(SEARCH_CLOSE)}){_body_then(SEARCH_CLOSE)}\s*{re.escape(INFO_OPEN)}"
)
_STEP_RE = re.compile(
    rf"\s*(?:{_THINK_BLOCK}\s*(?:(?P<think_search>){_SEARCH_BLOCK}|{_answer_block('think_answer')}|(?P<think>))"
    rf"|(?P<search>){_SEARCH_BLOCK}"
    rf"|{_answer_block('answer')})"
)
_STEP_KINDS = {  # the step's last group -> (think blocks it read, the block that ended it)
    "think": (1, "think"),
    "think_search": (1, "search"),
    "think_answer": (1, "answer"),
    "search": (0, "search"),
    "answer": (0, "answer"),
}

DEFAULT_RULES = FormatRules()


# What reading the blocks up to the answer gives: (failure or None, answer or None, num_searches, num_thinks, the
# position after the answer).
_Walk = tuple[FormatReason | None, str | None, int, int, int]


def check_format(response: str, *, num_masks: int | None = None, rules: FormatRules = DEFAULT_RULES) -> FormatResult:
    """Check ``response`` against the tag protocol; ``num_masks`` (RAMP) also checks the number of answer spans."""
    return FormatResult(*format_fields(response, num_masks, rules))


def format_fields(
    response: str, num_masks: int | None, rules: FormatRules
) -> tuple[bool, FormatReason, str | None, int, int, bool]:
    """:func:`check_format`'s result as a plain tuple, in FormatResult's order (the reward's hot path uses it)."""
    walk = _walk if rules.protocol == "tags" else _walk_hermes
    failure, answer, num_searches, num_thinks, end = walk(response, rules)
    paragraph = False
    if failure is not None:
        pass
    elif answer is None:
        failure = FormatReason.NO_ANSWER
    elif end < len(response) and not _only_end_tokens(response[end:], rules.eos_tokens):
        failure = FormatReason.TEXT_AFTER_ANSWER
    elif not answer:
        failure = FormatReason.EMPTY_ANSWER
    elif rules.require_think and num_thinks == 0:
        failure = FormatReason.MISSING_THINK
    # answer.count(delimiter) + 1 == len(split_spans(answer)), without building the list
    elif num_masks is not None and answer.count(SPAN_DELIMITER) + 1 != num_masks:
        paragraph = rules.allow_paragraph and is_paragraph_answer(answer, num_masks, rules.paragraph_min_words)
        if not paragraph:
            failure = FormatReason.SPAN_COUNT_MISMATCH
    elif num_masks is None and rules.max_answer_words and len(answer.split()) > rules.max_answer_words:
        failure = FormatReason.ANSWER_TOO_LONG
    if failure is not None:
        return (False, failure, answer, num_searches, num_thinks, False)
    return (True, FormatReason.OK, answer, num_searches, num_thinks, paragraph)


def _only_end_tokens(tail: str, eos_tokens: tuple[str, ...]) -> bool:
    """Is the text after the answer nothing but whitespace once each end-of-sequence token is removed in turn?"""
    if tail.isspace() or (eos_tokens and tail == eos_tokens[0]):
        return True  # the usual tails, decided at once (the first token removed, every later removal keeps "")
    for token in eos_tokens:
        tail = tail.replace(token, "")
    return not tail.strip()


def _walk(response: str, rules: FormatRules) -> _Walk:
    """:func:`_walk_tags`, with a fast path for the well-formed blocks that almost every response consists of.

    Reads steps of whole blocks (``_STEP_RE``) separated by whitespace up to the answer, then looks for a tag after
    it. As soon as anything else shows up, ``_walk_tags`` reads on from the last step read. On the steps read here,
    ``_walk_tags`` finds each opener followed by its closer with only whitespace in between (so
    ``allow_untagged_text`` makes no difference) and ends in the same state; tests/test_reward.py checks that the
    results agree.
    """
    match_step = _STEP_RE.match
    pos = num_searches = num_thinks = 0
    while (step := match_step(response, pos)) is not None:
        kind = step.lastgroup
        thinks, last = _STEP_KINDS[kind]
        if last == "search":
            # The retriever's text is opaque: skip to the first INFO_CLOSE. It seldom holds a "<", so the first "<"
            # (a memchr, much faster than a substring search) is usually where INFO_CLOSE starts.
            end = response.find("<", step.end())
            if end >= 0 and not response.startswith(INFO_CLOSE, end):
                end = response.find(INFO_CLOSE, end)
            if end < 0:
                break  # an unclosed <information>: the reference reads this step again and says so
            num_searches += 1
            num_thinks += thinks
            pos = end + len(INFO_CLOSE)
        elif last == "answer":
            num_thinks += thinks
            answer = step.group(kind).strip()
            pos = step.end()
            after = _TAG_RE.search(response, pos)
            if after is None:
                return (None, answer, num_searches, num_thinks, pos)
            reason = FormatReason.MULTIPLE_ANSWERS if after.group() == ANSWER_OPEN else FormatReason.TEXT_AFTER_ANSWER
            return (reason, answer, num_searches, num_thinks, pos)
        else:
            num_thinks += thinks
            pos = step.end()
    return _walk_tags(response, rules, pos, num_searches, num_thinks)


def _walk_tags(response: str, rules: FormatRules, pos: int = 0, num_searches: int = 0, num_thinks: int = 0) -> _Walk:
    """The definition: read the response tag by tag, up to the end of the text (or the first failure).

    ``pos`` and the counts let it go on after blocks already read (where no answer was read and no search awaits
    its information).
    """
    search = _TAG_RE.search
    awaiting_info = False
    answer: str | None = None

    def fail(reason: FormatReason) -> _Walk:
        return (reason, answer, num_searches, num_thinks, pos)

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
    return (None, answer, num_searches, num_thinks, pos)


# ------------------------------------------------------------------------------------------------------ hermes
_HERMES_OPENERS = {THINK_OPEN: "think", TOOL_CALL_OPEN: "tool_call", TOOL_RESPONSE_OPEN: "tool_response",
                   ANSWER_OPEN: "answer"}
_HERMES_CLOSER_OF = {"think": THINK_CLOSE, "tool_call": TOOL_CALL_CLOSE, "answer": ANSWER_CLOSE}
_HERMES_TAG_RE = re.compile(
    "|".join(re.escape(tag) for tag in [*_HERMES_OPENERS, THINK_CLOSE, TOOL_CALL_CLOSE, TOOL_RESPONSE_CLOSE,
                                        ANSWER_CLOSE])
)


def _walk_hermes(response: str, rules: FormatRules) -> _Walk:
    """The hermes protocol read tag by tag (see the module docstring); ``num_searches`` counts tool calls.

    Hermes rows are few next to the tag protocol's, so there is no fast path: this is the definition.
    """
    search = _HERMES_TAG_RE.search
    pos = num_calls = num_thinks = 0
    calls = responses = 0  # of the current group of tool calls: calls made, responses read
    answer: str | None = None

    def fail(reason: FormatReason) -> _Walk:
        return (reason, answer, num_calls, num_thinks, pos)

    while (match := search(response, pos)) is not None:
        tag = match.group()
        if answer is not None:
            return fail(FormatReason.MULTIPLE_ANSWERS if tag == ANSWER_OPEN else FormatReason.TEXT_AFTER_ANSWER)
        name = _HERMES_OPENERS.get(tag)
        if name is None:
            return fail(FormatReason.UNEXPECTED_CLOSE)
        body_start = match.end()
        if name == "tool_response":
            if responses >= calls:  # nothing asked, or more answers than calls
                return fail(FormatReason.INFORMATION_WITHOUT_SEARCH)
            end = response.find(TOOL_RESPONSE_CLOSE, body_start)
            if end < 0:
                return fail(FormatReason.UNCLOSED_TAG)
            responses += 1
            pos = end + len(TOOL_RESPONSE_CLOSE)
            continue
        if name != "tool_call":
            if calls and not responses:
                return fail(FormatReason.SEARCH_WITHOUT_INFORMATION)
            calls = responses = 0  # any other block closes the group: later responses were not asked for
        closing = search(response, body_start)
        if closing is None:
            return fail(FormatReason.UNCLOSED_TAG)
        if closing.group() != _HERMES_CLOSER_OF[name]:
            is_open = closing.group() in _HERMES_OPENERS
            return fail(FormatReason.NESTED_TAG if is_open else FormatReason.UNEXPECTED_CLOSE)
        body = response[body_start : closing.start()]
        pos = closing.end()
        if name == "tool_call":
            if not body.strip():
                return fail(FormatReason.EMPTY_SEARCH)
            if not _is_tool_call(body):
                return fail(FormatReason.BAD_TOOL_CALL)
            if responses:  # calls after the responses: a new group
                calls = responses = 0
            calls += 1
            num_calls += 1
        elif name == "think":
            num_thinks += 1
        else:
            answer = body.strip()
    return (None, answer, num_calls, num_thinks, pos)


def _is_tool_call(body: str) -> bool:
    """What verl's hermes parser can call: a JSON object with a ``name`` and ``arguments``. Parsed with json only."""
    try:
        call = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(call, dict) and isinstance(call.get("name"), str) and "arguments" in call


# ------------------------------------------------------------------------------------------------------ answers
# The environment's text in each protocol: never the policy's answer, whatever it quotes.
_OPAQUE_BLOCKS = {"tags": (INFO_OPEN, INFO_CLOSE), "hermes": (TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE)}


def extract_answer(response: str, protocol: str = "tags") -> str | None:
    """Body of the last complete ``<answer>…</answer>`` block the policy wrote (stripped), or None: used to score
    even when the format check fails, so the answer metrics stay informative.

    Blocks the environment wrote (``<information>`` in the tag protocol, ``<tool_response>`` in hermes; an unclosed
    one runs to the end) are skipped: retrieved text and the environment's own notices may quote answer tags, and
    the policy must not be credited with them.
    """
    opener, closer = _OPAQUE_BLOCKS[protocol]
    if opener not in response:
        return _last_answer(response, 0, len(response))
    # The policy's own stretches of text, last first; an answer block must lie within one of them.
    stretches = []
    pos = 0
    while (start := response.find(opener, pos)) >= 0:
        stretches.append((pos, start))
        end = response.find(closer, start + len(opener))
        if end < 0:
            pos = len(response)
            break
        pos = end + len(closer)
    stretches.append((pos, len(response)))
    for start, end in reversed(stretches):
        answer = _last_answer(response, start, end)
        if answer is not None:
            return answer
    return None


def _last_answer(response: str, start: int, end: int) -> str | None:
    """The last complete answer block within ``response[start:end]``."""
    close = response.rfind(ANSWER_CLOSE, start, end)
    if close < 0:
        return None
    open_ = response.rfind(ANSWER_OPEN, start, close)
    if open_ < 0:
        return None
    return response[open_ + len(ANSWER_OPEN) : close].strip()
