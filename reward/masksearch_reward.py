"""verl entry point: ``compute_score`` for RAMP and QA rows (format check + answer match or model judge).

Select it in a verl 0.9.1 config::

    reward.custom_reward_function.path=pkg://reward.masksearch_reward
    reward.custom_reward_function.name=compute_score            # async; compute_score_sync for sync callers
    +reward.custom_reward_function.reward_kwargs.ramp_metric=recall   # options: reward.combine.RewardConfig

verl's reward loop calls ``compute_score(data_source=, solution_str=, ground_truth=, extra_info=, **kw)`` for each
sample, where ``kw`` are the ``reward_kwargs`` above plus, when a reward model is enabled, ``reward_router_address``
and ``reward_model_tokenizer``. The returned dict's ``score`` is the reward; every other key lands in
``reward_extra_info``, so all keys are numeric and present in every result (verl stacks them into arrays, and
``algorithm.filter_groups.metric=acc`` can use them).

Ground truth (DESIGN.md): RAMP ``{"target": [...], "masks": [...]}`` (the spans in order; each a string or a list
of aliases); QA ``{"target": [aliases...]}``, a plain string, or a list of aliases.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from typing import Any, NamedTuple

from reward.answer_match import ZERO, MatchScores, score_answer, score_spans, split_spans
from reward.combine import RewardConfig, combine
from reward.format import FormatResult, check_format, extract_answer
from reward.judge import JudgeItem, get_judge, resolve_llm_config

# Extra keyword arguments verl's reward managers add at call time (not configuration).
RUNTIME_KWARGS = ("reward_router_address", "reward_model_tokenizer")

RESULT_KEYS = (
    "score", "acc", "format", "format_code", "em", "f1", "recall", "cover_em", "judge", "judge_fallback",
    "num_searches",
)  # fmt: skip


class Target(NamedTuple):
    """Parsed ground truth: the aliases of each blank (one blank for QA, one per mask for RAMP)."""

    blanks: tuple[tuple[str, ...], ...]
    is_ramp: bool


def parse_ground_truth(data_source: str, ground_truth: Any) -> Target:
    """Accept every ground-truth shape we write or meet (dicts, strings, lists, numpy arrays from parquet)."""
    source = data_source if type(data_source) is str else str(data_source)
    if type(ground_truth) is dict or isinstance(ground_truth, Mapping):  # (the exact-type test is much cheaper)
        masks = ground_truth.get("masks")
        is_ramp = masks is not None or source.lower().startswith("ramp")
        value = masks if (masks is not None and len(masks) > 0) else ground_truth.get("target")
    else:
        is_ramp = source.lower().startswith("ramp")
        value = ground_truth
    if value is None:
        raise ValueError(f"ground truth for data_source={data_source!r} has no 'target': {ground_truth!r}")
    if is_ramp and type(value) is list and value and all(type(span) is str for span in value):
        blanks = tuple([(span,) for span in value])  # the common case, kept cheap: no blank is empty
    else:
        if is_ramp:
            blanks = tuple([_strings(span) for span in _items(value)])
        else:  # the aliases of one answer, however nested
            blanks = (_strings(value),)
        if not blanks or not all(blanks):
            raise ValueError(f"ground truth for data_source={data_source!r} has an empty answer: {ground_truth!r}")
    return Target(blanks, is_ramp)


def _items(value: Any) -> list[Any]:
    """A string is one item; lists, tuples and numpy arrays (parquet gives object arrays of arrays) are several."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _strings(value: Any) -> tuple[str, ...]:
    """Every string in a (nested) list or array; numbers become strings."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if all(type(item) is str for item in value):
            return tuple(value)  # a flat list of aliases, the usual case
        return tuple(s for item in value for s in _strings(item))
    return (str(value),)


_CONFIGS: dict[str, RewardConfig] = {}


def reward_config(kwargs: Mapping[str, Any]) -> RewardConfig:
    """RewardConfig for these reward kwargs, built once per distinct kwargs (environment read at that time)."""
    key = repr(sorted(kwargs.items())) if kwargs else ""  # no kwargs: the usual case, and "" is no list's repr
    config = _CONFIGS.get(key)
    if config is None:
        config = _CONFIGS[key] = RewardConfig.from_kwargs(kwargs)
    return config


def reset_caches() -> None:
    """Forget built configs (tests that change environment variables call this)."""
    _CONFIGS.clear()


class _RuleScores(NamedTuple):
    config: RewardConfig
    target: Target
    fmt: FormatResult
    answer: str | None
    match: MatchScores
    paragraph: bool
    metric: str  # config.metric_for(target.is_ramp)

    def judge_item(self, question: str | None) -> JudgeItem | None:
        """What to send to the judge, or None when no call is needed (no answer, gated out, exact match)."""
        if self.metric != "judge" or not self.answer:
            return None
        if self.config.format_gate and not self.fmt.ok:
            return None
        if self.config.judge_skip_exact and self.match.em == 1.0:
            return None
        multi = len(self.target.blanks) > 1 and not self.paragraph
        spans = tuple(split_spans(self.answer)) if multi else None
        return JudgeItem(golds=self.target.blanks, answer=self.answer, spans=spans, question=question)


def _rule_scores(data_source: str, solution_str: str, ground_truth: Any, kwargs: dict[str, Any]) -> _RuleScores:
    for name in RUNTIME_KWARGS:
        kwargs.pop(name, None)
    config = reward_config(kwargs)
    target = parse_ground_truth(data_source, ground_truth)
    num_masks = len(target.blanks) if target.is_ramp else None
    fmt = check_format(solution_str, num_masks=num_masks, rules=config.format)
    answer = fmt.answer if fmt.answer is not None else extract_answer(solution_str)
    paragraph = False
    if not answer:
        match = ZERO
    elif target.is_ramp:
        rules = config.format
        scored = score_spans(
            answer, target.blanks, allow_paragraph=rules.allow_paragraph, paragraph_min_words=rules.paragraph_min_words
        )
        match, paragraph = scored.mean, scored.mode == "paragraph"
    else:
        match = score_answer(answer, target.blanks[0])
    return _RuleScores(config, target, fmt, answer, match, paragraph, config.metric_for(target.is_ramp))


def _result(rules: _RuleScores, judge_score: float | None, judge_fallback: bool) -> dict[str, float]:
    config, metric, match, fmt = rules.config, rules.metric, rules.match, rules.fmt
    if metric != "judge":
        answer_score, judge_value = getattr(match, metric), 0.0  # RewardConfig only accepts known metrics
    elif judge_score is not None:
        answer_score = judge_value = judge_score
    elif judge_fallback:
        answer_score, judge_value = match.get(config.fallback_metric_for(rules.target.is_ramp)), 0.0
    else:  # no call was needed
        skipped_exact = bool(rules.answer) and match.em == 1.0 and config.judge_skip_exact
        answer_score = judge_value = 1.0 if skipped_exact else 0.0
    score, counted = combine(fmt.ok, answer_score, config)
    return {
        "score": float(score),
        "acc": float(counted),
        "format": 1.0 if fmt.ok else 0.0,
        "format_code": int(fmt.reason),
        "em": match.em,
        "f1": match.f1,
        "recall": match.recall,
        "cover_em": match.cover_em,
        "judge": float(judge_value),
        "judge_fallback": 1.0 if judge_fallback else 0.0,
        "num_searches": fmt.num_searches,
    }


def _judge_for(kwargs: Mapping[str, Any], config: RewardConfig):
    llm_config = resolve_llm_config(
        config.judge, kwargs.get("reward_router_address"), kwargs.get("reward_model_tokenizer")
    )
    return get_judge(llm_config)


async def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """Reward of one response (async: the judge, when selected, is awaited on verl's reward loop)."""
    rules = _rule_scores(data_source, solution_str, ground_truth, dict(kwargs))
    item = rules.judge_item(_question(extra_info))
    if item is None:
        return _result(rules, None, False)
    verdict = await _judge_for(kwargs, rules.config).grade(item)
    return _result(rules, verdict.score, verdict.score is None)


def compute_score_sync(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """Synchronous variant (eval scripts, benchmarks, verl's thread-pool path for sync reward functions).

    Judge calls run on one background event loop shared by all threads, so the judge's concurrency limit, cache
    and in-flight sharing hold across threads; the calling thread blocks until its verdict is in.
    """
    rules = _rule_scores(data_source, solution_str, ground_truth, dict(kwargs))
    item = rules.judge_item(_question(extra_info))
    if item is None:
        return _result(rules, None, False)
    judge = _judge_for(kwargs, rules.config)
    verdict = asyncio.run_coroutine_threadsafe(judge.grade(item), _background_loop()).result()
    return _result(rules, verdict.score, verdict.score is None)


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _background_loop() -> asyncio.AbstractEventLoop:
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, name="masksearch-reward-judge", daemon=True).start()
        return _LOOP


def _question(extra_info: Mapping[str, Any] | None) -> str | None:
    if not extra_info:
        return None
    question = extra_info.get("question")
    return str(question) if question else None
