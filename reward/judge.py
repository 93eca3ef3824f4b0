"""Model judge: an LLM behind an OpenAI-compatible endpoint decides whether each answer matches the gold.

Used when string matching is too strict or too easy to game (the MaskSearch paper compares token recall with a
Qwen2.5-72B judge). The endpoint is either a served model (``judge.base_url``, e.g. vLLM) or verl's GenRM router,
whose address verl hands to the reward function as ``reward_router_address`` when ``reward.reward_model.enable``.

Calls go through :class:`masksearch_rl.llm.LLMClient`: timeout, bounded retries with backoff, a concurrency limit
and an on-disk cache (``judge.cache_dir``; identical item => no second call). Only replies that parse as a verdict
are cached: an unparseable reply is a failure of that call, not the item's answer, so the next time the item comes
up the judge is asked again. Identical items in flight at the same time share one call. The verdict is strict
JSON, ``{"correct": [true, false, ...]}`` with one boolean per blank, parsed with ``json`` only. Anything that fails
(endpoint error, timeout, unparseable reply) yields a verdict with ``score=None``; the caller then falls back to
answer matching and counts it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from masksearch_rl.llm import LLMClient, LLMConfig
from masksearch_rl.loop_local import LoopLocal

logger = logging.getLogger(__name__)

# Judge-specific defaults on top of LLMConfig's: a verdict is short, and a judge must be deterministic.
JUDGE_LLM_DEFAULTS: dict[str, Any] = {
    "timeout_s": 60.0,
    "max_retries": 2,
    "concurrency": 32,
    "temperature": 0.0,
    "max_tokens": 256,
}

JUDGE_SYSTEM_PROMPT = (
    "You are a strict, impartial grader of short answers. You compare a model's answer with gold answers and "
    "reply with a single JSON object and nothing else."
)


@dataclass(frozen=True)
class JudgeItem:
    """One graded answer. ``golds`` holds the aliases of each blank (one blank for QA, one per mask for RAMP);
    ``spans`` the model's answer split per blank when it was written that way (None: judge the whole answer)."""

    golds: tuple[tuple[str, ...], ...]
    answer: str
    spans: tuple[str, ...] | None = None
    question: str | None = None


@dataclass(frozen=True)
class Verdict:
    score: float | None  # mean of the per-blank verdicts; None => the judge failed, fall back
    correct: tuple[bool, ...] = ()
    error: str | None = None


def build_judge_messages(item: JudgeItem) -> list[dict[str, str]]:
    """Chat messages asking for ``{"correct": [...]}`` with one boolean per blank."""
    n = len(item.golds)
    lines = []
    if item.question:
        lines.append(f"Question or task:\n{item.question.strip()}\n")
    lines.append(f"The model's final answer:\n{item.answer.strip()}\n")
    lines.append(f"Blanks to grade ({n}):")
    for i, aliases in enumerate(item.golds, start=1):
        gold = " OR ".join(json.dumps(a, ensure_ascii=False) for a in aliases)
        if item.spans is not None and len(item.spans) == n:
            model = json.dumps(item.spans[i - 1], ensure_ascii=False)
        elif n == 1:
            model = "(the whole final answer)"
        else:
            model = "(find the model's answer for this blank in its final answer)"
        lines.append(f"{i}. gold: {gold}; model: {model}")
    lines.append(
        "\nFor each blank decide whether the model's answer means the same as one of the gold answers. Ignore case, "
        "articles, punctuation and harmless extra detail. A different entity, number or date is wrong; a list of "
        "alternative candidates is wrong; a missing answer is wrong.\n"
        f'Reply with JSON only, exactly {n} booleans in blank order: {{"correct": [true, false, ...]}}'
    )
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": "\n".join(lines)}]


_FENCE = re.compile(r"```(?:json)?", re.IGNORECASE)
_FLAT_OBJECT = re.compile(r"\{[^{}]*\}")


def parse_verdict(text: str, num_blanks: int) -> tuple[bool, ...] | None:
    """The per-blank booleans from a judge reply, or None when the reply is not a valid verdict.

    Accepts the bare object, the object in a code fence, or the last flat JSON object in surrounding prose;
    ``correct`` must be a list of exactly ``num_blanks`` booleans (a lone boolean is accepted for one blank).
    """
    text = _FENCE.sub("", text).strip()
    candidates = [text] + [m.group() for m in reversed(list(_FLAT_OBJECT.finditer(text)))]
    for candidate in candidates:
        try:
            obj = json.loads(candidate)
        except (json.JSONDecodeError, RecursionError):
            continue
        if not isinstance(obj, dict) or "correct" not in obj:
            continue
        correct = obj["correct"]
        if isinstance(correct, bool) and num_blanks == 1:
            return (correct,)
        if isinstance(correct, list) and len(correct) == num_blanks and all(isinstance(c, bool) for c in correct):
            return tuple(correct)
        return None  # a verdict object with the wrong shape: do not guess
    return None


class Judge:
    """Grades :class:`JudgeItem` s with one shared :class:`LLMClient` (its semaphore bounds concurrency)."""

    def __init__(self, client: LLMClient):
        self.client = client
        self.stats: Counter = Counter()
        # In-flight calls per event loop (a task cannot be awaited from another loop).
        self._in_flight: LoopLocal[dict[str, asyncio.Task]] = LoopLocal(dict)

    async def grade(self, item: JudgeItem) -> Verdict:
        messages = build_judge_messages(item)
        digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
        in_flight = self._in_flight.get()
        task = in_flight.get(digest)
        if task is None:
            task = asyncio.ensure_future(self._ask(messages, len(item.golds)))
            in_flight[digest] = task
            task.add_done_callback(lambda _t: in_flight.pop(digest, None))
        else:
            self.stats["shared_in_flight"] += 1
        return await asyncio.shield(task)

    async def grade_many(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        return list(await asyncio.gather(*(self.grade(item) for item in items)))

    async def _ask(self, messages: list[dict[str, str]], num_blanks: int) -> Verdict:
        self.stats["requests"] += 1
        try:
            reply = await self.client.chat(messages, accept=lambda text: parse_verdict(text, num_blanks) is not None)
        except Exception as err:  # endpoint down, timeout after retries, bad key, malformed HTTP reply ...
            return self._failed(f"judge call failed: {err}")
        correct = parse_verdict(reply, num_blanks)
        if correct is None:
            return self._failed(f"unparseable judge reply: {reply[:200]!r}")
        self.stats["verdicts"] += 1
        return Verdict(score=sum(correct) / num_blanks, correct=correct)

    def _failed(self, error: str) -> Verdict:
        self.stats["failures"] += 1
        if self.stats["failures"] <= 5:
            logger.warning("%s (%s; falling back to answer matching)", error, self.client.config.base_url)
        return Verdict(score=None, error=error)


def resolve_llm_config(
    settings: Mapping[str, Any],
    reward_router_address: str | None = None,
    reward_model_tokenizer: Any = None,
) -> LLMConfig:
    """The judge's :class:`LLMConfig`: defaults < settings; verl's GenRM router is used when no ``base_url`` is set.

    The router serves the reward model under its local path, which is also the reward tokenizer's
    ``name_or_path``; set ``judge.model`` when the served name differs.
    """
    data = {**JUDGE_LLM_DEFAULTS, **settings}
    if "base_url" not in settings:
        if not reward_router_address:
            raise ValueError(
                "the judge needs an endpoint: set reward.custom_reward_function.reward_kwargs.judge.base_url "
                "(or $MASKSEARCH_JUDGE_BASE_URL), or enable verl's reward model (reward.reward_model.enable=True) "
                "so that verl passes reward_router_address"
            )
        data["base_url"] = f"http://{reward_router_address}/v1"
        if "model" not in settings:
            served = getattr(reward_model_tokenizer, "name_or_path", None)
            if not served:
                raise ValueError("set reward_kwargs.judge.model: the GenRM router's model name is unknown")
            data["model"] = served
    return LLMConfig.from_dict(data)


_JUDGES: dict[str, Judge] = {}


def get_judge(config: LLMConfig) -> Judge:
    """One judge per configuration and process, so concurrent reward calls share its limit, cache and counters."""
    key = json.dumps(asdict(config), sort_keys=True, default=str)
    judge = _JUDGES.get(key)
    if judge is None:
        judge = _JUDGES[key] = Judge(LLMClient(config))
    return judge


def judge_stats() -> dict[str, dict[str, int]]:
    """Counters of every judge in this process (requests, verdicts, failures, LLM cache hits), for logs."""
    return {j.client.config.base_url: {**j.stats, **j.client.stats} for j in _JUDGES.values()}
