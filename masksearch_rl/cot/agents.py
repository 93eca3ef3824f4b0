"""The three roles of MaskSearch's agent-based CoT construction: Planner, Rewriter, Observer.

Each role is a prompt plus a strict parser of its JSON reply. Replies are parsed with ``json`` only (never
evaluated); a reply that does not parse, or parses to the wrong shape, raises :class:`ParseError` naming the role
and what was wrong, and :func:`ask_role` retries once with a correction turn before giving up.

Roles (one OpenAI-compatible endpoint each; they may differ):

* Planner: ``{"plan": str, "sub_queries": [str, ...]}`` -- the overall plan and the first things to look up;
  also asked again to re-plan, given what was found so far.
* Rewriter: ``{"queries": [str, str, str, ...]}`` -- at least ``min_queries`` short keyword queries for a sub-query.
* Observer: ``{"summary": str, "think": str, "found": bool, "action": "answer" | "search" | "replan",
  "answer": str | [str, ...], "sub_query": str}`` -- reads the latest observation, then answers, searches again or
  asks for a new plan. After repeated failures it is told it may answer from its own knowledge.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from envs.prompts import ANSWER_SEPARATOR
from masksearch_rl.llm import LLMClient

T = TypeVar("T")

ACTIONS = ("answer", "search", "replan")


class ParseError(ValueError):
    """A role's reply that is not the JSON the role promised."""


# ----------------------------------------------------------------------------------------------------- JSON
_FENCE = re.compile(r"```(?:json)?", re.IGNORECASE)


def extract_json_object(text: str) -> dict[str, Any]:
    """The JSON object in a reply: the whole text, or else the last object embedded in prose or a code fence."""
    text = _FENCE.sub("", text or "").strip()
    try:
        obj = json.loads(text)
        if isinstance(obj, dict):
            return obj
    except (json.JSONDecodeError, RecursionError):
        pass
    # Scan for top-level objects only: once one decodes, resume after its end, so a "{" inside one of its
    # strings or a nested object is never mistaken for the reply's own object.
    decoder = json.JSONDecoder()
    found: dict[str, Any] | None = None
    start = text.find("{")
    while start != -1:
        try:
            obj, end = decoder.raw_decode(text, start)
        except (json.JSONDecodeError, RecursionError):
            start = text.find("{", start + 1)
            continue
        if isinstance(obj, dict):
            found = obj
        start = text.find("{", end)
    if found is None:
        raise ParseError(f"no JSON object in reply {text[:120]!r}")
    return found


def _string(obj: dict, key: str, role: str, required: bool = True) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise ParseError(f"{role}: field {key!r} must be a non-empty string, got {value!r:.80}")
    return " ".join(value.split())


def _strings(value: Any, key: str, role: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ParseError(f"{role}: field {key!r} must be a list of strings, got {value!r:.80}")
    cleaned = [" ".join(v.split()) for v in value]
    return [v for v in dict.fromkeys(cleaned) if v]  # order kept, duplicates and blanks dropped


# ----------------------------------------------------------------------------------------------------- roles
PLANNER_SYSTEM = (
    "You are the Planner of a research team that answers questions and fills in masked text by searching. "
    "Break the task into the facts that must be looked up, in the order they can be found. Reply with a single JSON "
    'object and nothing else: {"plan": "<the overall plan, 1-3 sentences>", "sub_queries": ["<first thing to look '
    'up>", ...]}. Each sub-query is a short natural-language search request.'
)
REWRITER_SYSTEM = (
    "You are the Rewriter of a research team. Turn one search request into several short keyword queries for a "
    "search engine: different wordings, key entities and synonyms. Reply with a single JSON object and nothing "
    'else: {{"queries": ["...", "...", "..."]}} with at least {min_queries} distinct queries.'
)
OBSERVER_SYSTEM = (
    "You are the Observer of a research team. Read the latest search results, summarise what they say about the "
    "task, then decide the next step: answer when every needed fact is known, search for the next missing fact, or "
    "ask for a new plan when the current one is not working. Reply with a single JSON object and nothing else: "
    '{"summary": "<what the latest results say>", "think": "<your reasoning>", "found": true|false, '
    '"action": "answer"|"search"|"replan", "answer": "<final answer, when action is answer>", '
    '"sub_query": "<next search request, when action is search>"}.'
)
OBSERVER_RAMP_HINT = (
    "The task is to fill in masked text: give the answer as a JSON list with one span per [mask], in order."
)
OWN_KNOWLEDGE_HINT = (
    "Several searches have not found what is needed. If you know the answer from your own knowledge, you may "
    "answer now with it."
)
FORCE_ANSWER_HINT = "This is the last round: you must answer now (action \"answer\") with your best answer."
CORRECTION = "Your reply could not be used ({error}). Reply again with the JSON object only, exactly as specified."


@dataclass(frozen=True)
class Plan:
    plan: str
    sub_queries: tuple[str, ...]


@dataclass(frozen=True)
class Observation:
    summary: str
    think: str
    found: bool
    action: str
    answer: str | None = None
    sub_query: str | None = None


def planner_messages(task: str, history: str | None = None) -> list[dict[str, str]]:
    user = f"Task:\n{task}"
    if history:
        user += f"\n\nThe current plan is not working. What was found so far:\n{history}\n\nMake a new plan."
    return [{"role": "system", "content": PLANNER_SYSTEM}, {"role": "user", "content": user}]


def parse_plan(text: str) -> Plan:
    obj = extract_json_object(text)
    sub_queries = _strings(obj.get("sub_queries"), "sub_queries", "planner")
    if not sub_queries:
        raise ParseError("planner: 'sub_queries' is empty")
    return Plan(_string(obj, "plan", "planner"), tuple(sub_queries))


def rewriter_messages(task: str, sub_query: str, min_queries: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": REWRITER_SYSTEM.format(min_queries=min_queries)},
        {"role": "user", "content": f"Overall task:\n{task}\n\nSearch request: {sub_query}"},
    ]


def parse_queries(text: str, min_queries: int, max_queries: int) -> list[str]:
    queries = _strings(extract_json_object(text).get("queries"), "queries", "rewriter")
    if len(queries) < min_queries:
        raise ParseError(f"rewriter: {len(queries)} distinct queries, at least {min_queries} required")
    return queries[:max_queries]


def observer_messages(
    task: str, plan: str, history: list[str], sub_query: str, observation: str, searches_done: int,
    num_masks: int | None, own_knowledge: bool, force_answer: bool,
) -> list[dict[str, str]]:
    system = OBSERVER_SYSTEM + (f" {OBSERVER_RAMP_HINT}" if num_masks else "")
    lines = [f"Task:\n{task}", f"Plan: {plan}", f"Searches so far: {searches_done}"]
    if history:
        lines.append("Earlier findings:\n" + "\n".join(f"- {h}" for h in history))
    lines.append(f"Latest search request: {sub_query}\nLatest results:\n{observation}")
    if num_masks:
        lines.append(f"The answer needs {num_masks} span(s).")
    if own_knowledge:
        lines.append(OWN_KNOWLEDGE_HINT)
    if force_answer:
        lines.append(FORCE_ANSWER_HINT)
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(lines)}]


def parse_observation(text: str) -> Observation:
    obj = extract_json_object(text)
    action = obj.get("action")
    if action not in ACTIONS:
        raise ParseError(f"observer: 'action' must be one of {ACTIONS}, got {action!r:.40}")
    found = obj.get("found", True)
    if not isinstance(found, bool):
        raise ParseError(f"observer: 'found' must be true or false, got {found!r:.40}")
    summary = _string(obj, "summary", "observer", required=False)
    think = _string(obj, "think", "observer", required=False)
    if not (summary or think):
        raise ParseError("observer: 'summary' and 'think' are both empty")
    answer = sub_query = None
    if action == "answer":
        raw = obj.get("answer")
        if isinstance(raw, list):
            spans = [" ".join(str(s).split()) for s in raw if isinstance(s, (str, int, float))]
            if len(spans) != len(raw) or not any(spans):
                raise ParseError(f"observer: 'answer' list must hold strings, got {raw!r:.80}")
            answer = ANSWER_SEPARATOR.join(spans)
        else:
            answer = _string(obj, "answer", "observer")
    elif action == "search":
        sub_query = _string(obj, "sub_query", "observer")
    return Observation(summary, think, found, action, answer, sub_query)


# ------------------------------------------------------------------------------------------------- calling
@dataclass
class RoleCall:
    """What a role was asked and answered, kept in the raw agent log."""

    role: str
    replies: list[str]
    error: str | None = None


async def ask_role(
    client: LLMClient, role: str, messages: list[dict[str, str]], parse: Callable[[str], T], retries: int,
    log: list[dict[str, Any]],
) -> T:
    """Call ``role`` and parse its reply; on a parse error retry up to ``retries`` times with a correction turn.

    Raises :class:`ParseError` when no reply parses, and ``LLMError`` (from the client) when the endpoint fails.
    Every reply goes into ``log``.
    """
    conversation = list(messages)
    last_error = ""

    def parses(text: str) -> bool:  # the cache keeps only usable replies: a rerun asks again instead
        try:
            parse(text)
        except ParseError:
            return False
        return True

    for attempt in range(retries + 1):
        reply = await client.chat(conversation, use_cache=attempt == 0, accept=parses)
        try:
            parsed = parse(reply)
        except ParseError as err:
            last_error = str(err)
            log.append({"role": role, "reply": reply, "error": last_error})
            conversation = [*messages, {"role": "assistant", "content": reply},
                            {"role": "user", "content": CORRECTION.format(error=last_error)}]
            continue
        log.append({"role": role, "reply": reply})
        return parsed
    raise ParseError(f"{role}: no usable reply after {retries + 1} attempt(s): {last_error}")
