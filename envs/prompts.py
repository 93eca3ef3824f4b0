"""Prompt templates and the tag protocol, in one place.

RL (verl parquet), SFT export, CoT construction and evaluation all build their prompts here, so a policy is always
trained and evaluated on the same text. The protocol (MaskSearch / Search-R1 style):

    <think> reasoning </think>
    <search> query </search>            -> the environment replies <information> ... </information>
    ...
    <answer> final answer </answer>

For RAMP the answer lists the filled spans in order, separated by `` | ``.
"""

from __future__ import annotations

from typing import Any

MASK_TOKEN = "[mask]"
ANSWER_SEPARATOR = " | "

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
INFO_OPEN, INFO_CLOSE = "<information>", "</information>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

# Generation stops at the end of a search call (the environment answers) or at the final answer.
STOP_STRINGS = [SEARCH_CLOSE, ANSWER_CLOSE]
PROTOCOL_TAGS = (THINK_OPEN, THINK_CLOSE, SEARCH_OPEN, SEARCH_CLOSE, INFO_OPEN, INFO_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# The hermes variant: the policy calls the search tool inside <tool_call> (JSON), and Qwen2.5-style chat templates
# wrap each tool reply in <tool_response>; the final answer uses the same <answer> tags.
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
HERMES_TAGS = (TOOL_CALL_OPEN, TOOL_CALL_CLOSE, TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE)

# The agent names rows carry in verl parquet (`agent_name`): our tag loop, and verl's built-in hermes tool loop.
TAG_AGENT_NAME = "masksearch_agent"
TOOL_AGENT_NAME = "tool_agent"

RAMP_INSTRUCTION = (
    "Fill in all the [mask] in the text below. Each [mask] hides a span of the original passage, such as a name, "
    "a place, a date, a number or a term. Search for the facts you need, then give the missing spans in the order "
    "they appear."
)

SYSTEM_PROMPT = (
    "You are a careful research assistant with access to a search engine. Work step by step.\n"
    "Think inside <think> and </think> whenever you receive new information. When you are missing a fact, "
    "search for it by writing a query inside <search> and </search>; the results will be returned to you inside "
    "<information> and </information>. You may search as often as you need. When you are confident, write only "
    "the final answer inside <answer> and </answer>, with no explanation, for example <answer> Paris </answer>."
)

# The hint names the number of masks: the format reward wants exactly one span per mask, and the count is part of
# the task's definition, not of its answer. A model then copies the number instead of counting [mask] tokens.
RAMP_ANSWER_HINT = (
    "The text has {count}. Write the missing spans in the order of the [mask] tokens, separated by ' | ', for "
    "example <answer> span 1 | span 2 </answer>."
)


def mask_count_phrase(num_masks: int) -> str:
    """``1 [mask]`` / ``3 [mask] tokens``: how the prompt and the oracle's thoughts name the number of masks."""
    return f"{num_masks} [mask]" + (" tokens" if num_masks != 1 else "")

TOOL_SYSTEM_PROMPT = (
    "You are a careful research assistant. Think step by step. When you are missing a fact, call the search tool. "
    "When you are confident, write only the final answer inside <answer> and </answer>."
)


def ramp_user_text(masked_passage: str, instruction: str = RAMP_INSTRUCTION) -> str:
    """The user turn of a RAMP prompt: instruction, the masked passage (the item's ``query``), the answer hint.

    The item's ``query`` is the masked passage alone, so ``query.count("[mask]") == num_masks`` holds exactly even
    though the paper's instruction names the token; the instruction is stored beside it and joined here.
    """
    hint = RAMP_ANSWER_HINT.format(count=mask_count_phrase(masked_passage.count(MASK_TOKEN)))
    return f"{instruction}\n\nText: {masked_passage}\n\n{hint}"


def ramp_messages(
    masked_passage: str, instruction: str = RAMP_INSTRUCTION, tool_variant: bool = False
) -> list[dict[str, str]]:
    """Chat messages for a RAMP item (``masked_passage`` is its ``query`` field)."""
    system = TOOL_SYSTEM_PROMPT if tool_variant else SYSTEM_PROMPT
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": ramp_user_text(masked_passage, instruction)},
    ]


def qa_messages(question: str, tool_variant: bool = False) -> list[dict[str, str]]:
    """Chat messages for a downstream QA question (HotpotQA, Musique, ...)."""
    system = TOOL_SYSTEM_PROMPT if tool_variant else SYSTEM_PROMPT
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": f"Question: {question.strip()}"},
    ]


# What the environment writes inside <information> when a search does not return results. The policy sees these
# texts during training, so they say plainly what went wrong and what to do next.
SEARCH_NO_RESULTS = "No results were found for this query."
SEARCH_EMPTY_QUERY = "Search error: the query is empty or missing, so nothing was searched. Write what to search for."
SEARCH_QUERY_TOO_LONG = (
    "Search error: the query is {length} characters long and the limit is {limit}, so nothing was searched. "
    "Write a shorter query."
)
SEARCH_FAILED = (
    "Search error: the search engine did not answer ({reason}). There are no results for this query; "
    "search again or answer with what you already know."
)
# It names the answer tags without writing them: a complete <answer>…</answer> here would be text the environment
# wrote that looks like an answer to anything that reads the response without the protocol (logs, fallbacks).
SEARCH_LIMIT_REACHED = (
    "Search limit reached: all {limit} searches are used up and nothing was searched. "
    "Do not search again: give your final answer now, inside the answer tags."
)
TRUNCATION_MARKER = " ... [truncated]"


def information_block(text: str) -> str:
    """What the environment appends after a ``</search>``: excluded from the loss (response_mask 0)."""
    return f"\n\n{INFO_OPEN}\n{text.strip()}\n{INFO_CLOSE}\n\n"


def answer_block(spans_or_answer: list[str] | str) -> str:
    if isinstance(spans_or_answer, str):
        return f"{ANSWER_OPEN} {spans_or_answer} {ANSWER_CLOSE}"
    return f"{ANSWER_OPEN} {ANSWER_SEPARATOR.join(spans_or_answer)} {ANSWER_CLOSE}"


# Tag parsing shared by the RL agent loop, the standalone rollout (eval, self-evolve) and tests; verl-free so that
# importing it stays cheap.
def find_stop(text: str) -> tuple[int, str] | None:
    """End offset and tag of the earliest stop string in ``text``, or None."""
    found = [(text.find(tag) + len(tag), tag) for tag in STOP_STRINGS if tag in text]
    return min(found) if found else None


def parse_query(turn_text: str) -> str:
    """The text between the last ``<search>`` and the first ``</search>``; "" when missing."""
    end = turn_text.find(SEARCH_CLOSE)
    if end < 0:
        return ""
    start = turn_text.rfind(SEARCH_OPEN, 0, end)
    return "" if start < 0 else turn_text[start + len(SEARCH_OPEN) : end].strip()


def tokens_through_stop(token_ids: list[int], tokenizer: Any) -> tuple[int, str | None]:
    """How many tokens to keep so the output ends with its first stop tag (all of them if there is none).

    The decoded prefix grows with the number of tokens, so the shortest prefix containing a stop tag is found by
    bisection: a few decodes even for long outputs.
    """
    full = find_stop(tokenizer.decode(token_ids))
    if full is None:
        return len(token_ids), None
    low, high = 1, len(token_ids)
    while low < high:
        mid = (low + high) // 2
        if find_stop(tokenizer.decode(token_ids[:mid])) is None:
            low = mid + 1
        else:
            high = mid
    return low, full[1]
