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

Ground truth (DESIGN.md): RAMP ``{"target": [...], "masks": [...], "masked_passage": str}`` (the spans in order,
each a string or a list of aliases; the masked passage the prompt shows, with which an answer written as the
reconstructed passage is read — without it such answers earn nothing); QA ``{"target": [aliases...]}``, a plain
string, or a list of aliases.

Answer credit cannot be bought by listing: every RAMP span and QA answer is scored with the commitment guard
(``max_extra_answer_tokens``, reward/answer_match.py) — a span holding a token its gold lacks earns nothing, a part
of the gold earns its share of token recall — and a passage-form answer is read where each mask stands
(reward/passage_reading.py). tests/test_reward_adversarial.py holds the adversaries this rules out.

Protocol: responses of our tag loop and of verl's hermes ``tool_agent`` loop are checked by different format rules
(reward/format.py). ``extra_info["agent_name"]`` picks them per sample (our ``masksearch`` reward manager copies the
row's ``agent_name`` there); rows without it follow ``format.protocol`` (default ``tags``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from typing import Any, NamedTuple

from reward.answer_match import ZERO, mean_scores, score_answer, score_each_span, split_spans
from reward.combine import RewardConfig, combine
from reward.format import AGENT_PROTOCOLS, extract_answer, format_fields, rules_for_protocol
from reward.judge import JudgeItem, get_judge, resolve_llm_config

# Extra keyword arguments verl's reward managers add at call time (not configuration).
RUNTIME_KWARGS = ("reward_router_address", "reward_model_tokenizer")

RESULT_KEYS = (
    "score", "acc", "format", "format_code", "em", "f1", "recall", "cover_em", "judge", "judge_fallback",
    "num_searches",
)  # fmt: skip


class Target(NamedTuple):
    """Parsed ground truth: the aliases of each blank (one blank for QA, one per mask for RAMP) and, for RAMP, the
    masked passage when the row carries it."""

    blanks: tuple[tuple[str, ...], ...]
    is_ramp: bool
    masked_passage: str | None = None


def parse_ground_truth(data_source: str, ground_truth: Any) -> Target:
    """Accept every ground-truth shape we write or meet (dicts, strings, lists, numpy arrays from parquet)."""
    return Target(*_parse_ground_truth(data_source, ground_truth))


def _parse_ground_truth(
    data_source: str, ground_truth: Any
) -> tuple[tuple[tuple[str, ...], ...], bool, str | None]:
    """:func:`parse_ground_truth` as a plain ``(blanks, is_ramp, masked_passage)`` tuple (the reward's hot path)."""
    source = str(data_source)
    masked_passage = None
    if type(ground_truth) is dict or isinstance(ground_truth, Mapping):  # (the exact-type test is much cheaper)
        masks = ground_truth.get("masks")
        is_ramp = masks is not None or source.lower().startswith("ramp")
        value = masks if (masks is not None and len(masks) > 0) else ground_truth.get("target")
        passage = ground_truth.get("masked_passage")
        masked_passage = passage if isinstance(passage, str) and passage else None
    else:
        is_ramp = source.lower().startswith("ramp")
        value = ground_truth
    if value is None:
        raise ValueError(f"ground truth for data_source={data_source!r} has no 'target': {ground_truth!r}")
    if is_ramp and type(value) is list and value:
        plain: list[tuple[str]] = []
        for span in value:  # the usual RAMP target, one plain string per mask, taken without conversions
            if type(span) is not str:
                break
            plain.append((span,))
        else:
            return tuple(plain), True, masked_passage
    if is_ramp:
        blanks = tuple([_strings(span) for span in _items(value)])
    else:  # the aliases of one answer, however nested
        blanks = (_strings(value),)
    if not blanks or not all(blanks):
        raise ValueError(f"ground truth for data_source={data_source!r} has an empty answer: {ground_truth!r}")
    return blanks, is_ramp, masked_passage if is_ramp else None


def _items(value: Any) -> list[Any]:
    """A string is one item; lists, tuples and numpy arrays (parquet gives object arrays of arrays) are several."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _strings(value: Any) -> tuple[str, ...]:
    """Every string in a (nested) list or array; numbers become strings."""
    if type(value) is not list and hasattr(value, "tolist"):  # (a plain list has no tolist: skip the lookup)
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        for item in value:
            if type(item) is not str:
                return tuple(s for item in value for s in _strings(item))
        return tuple(value)  # a flat list of aliases, the usual case
    return (str(value),)


_CONFIGS: dict[str, RewardConfig] = {}


def reward_config(kwargs: Mapping[str, Any]) -> RewardConfig:
    """RewardConfig for these reward kwargs, built once per distinct kwargs (environment read at that time)."""
    key = _config_key(kwargs) if kwargs else ""  # no kwargs: the usual case outside verl
    config = _CONFIGS.get(key)
    if config is None:
        config = _CONFIGS[key] = RewardConfig.from_kwargs(kwargs)
    return config


_PLAIN_KEY_TYPES = (str, bool, int, type(None))


def _config_key(kwargs: Mapping[str, Any]) -> Any:
    """A cache key that is equal only for kwargs that build the same config.

    verl passes the recipe's reward_kwargs with every call (``ramp_metric=recall qa_metric=em``): when every value
    is a plain string, the items themselves are the key, far cheaper than a repr. Other plain values carry their type
    too (``True == 1`` but they may coerce differently); anything else (floats: ``-0.0 == 0.0``; nested options)
    is keyed by its repr as before. A tuple key never equals a string key, and "" (no kwargs) is no list's repr.
    """
    if not kwargs:
        return ""
    items = tuple(kwargs.items())
    for _, value in items:
        if type(value) is not str:
            break
    else:
        return items
    if all(type(value) in _PLAIN_KEY_TYPES for _, value in items):
        return tuple((name, type(value), value) for name, value in items)
    return repr(sorted(kwargs.items()))


def reset_caches() -> None:
    """Forget built configs (tests that change environment variables call this)."""
    _CONFIGS.clear()


# What the rules give for one sample, before any judge call. A plain tuple -- it is built for every sample, and a
# named tuple costs a Python call -- unpacked where used, in this order:
#   config, blanks (the parsed ground truth), is_ramp, format_ok, format_reason, num_searches, answer (None when
#   there is none), match (MatchScores), paragraph (a RAMP answer read as the passage), metric (config.metric_for)
_RuleScores = tuple


def _judge_item(rules: _RuleScores, question: str | None) -> JudgeItem | None:
    """What to send to the judge, or None when no call is needed (no answer, gated out, exact match)."""
    config, blanks, _, format_ok, _, _, answer, match, paragraph, metric = rules
    if metric != "judge" or not answer:
        return None
    if config.format_gate and not format_ok:
        return None
    if config.judge_skip_exact and match.em == 1.0:
        return None
    multi = len(blanks) > 1 and not paragraph
    spans = tuple(split_spans(answer)) if multi else None
    return JudgeItem(golds=blanks, answer=answer, spans=spans, question=question)


def _options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The configuration part of the call's kwargs (verl's runtime kwargs removed, the call's dict left as it is)."""
    if "reward_router_address" in kwargs or "reward_model_tokenizer" in kwargs:
        return {name: value for name, value in kwargs.items() if name not in RUNTIME_KWARGS}
    return kwargs


def _rule_scores(
    data_source: str, solution_str: str, ground_truth: Any, extra_info: Mapping[str, Any] | None, kwargs: dict[str, Any]
) -> _RuleScores:
    config = reward_config(_options(kwargs) if kwargs else kwargs)
    blanks, is_ramp, masked_passage = _parse_ground_truth(data_source, ground_truth)
    format_rules = config.format
    if extra_info:  # the loop that wrote the response decides its protocol
        agent = extra_info.get("agent_name")
        protocol = AGENT_PROTOCOLS.get(agent) if isinstance(agent, str) else None
        if protocol is not None and protocol != format_rules.protocol:
            format_rules = rules_for_protocol(format_rules, protocol)
    # check_format's fields (FormatResult order)
    format_ok, format_reason, answer, num_searches, _, _ = format_fields(
        solution_str, len(blanks) if is_ramp else None, format_rules
    )
    if answer is None:
        answer = extract_answer(solution_str, format_rules.protocol)
    paragraph = False
    if not answer:
        match = ZERO
    elif is_ramp:
        per_span, mode = score_each_span(
            answer, blanks, format_rules.allow_paragraph, format_rules.paragraph_min_words, True, masked_passage,
            config.extra_token_allowance,
        )
        match, paragraph = mean_scores(per_span), mode == "paragraph"  # score_spans(...).mean and its mode
    else:
        match = score_answer(answer, blanks[0], max_extra_tokens=config.extra_token_allowance)
    metric = config.metric_for(is_ramp)
    return config, blanks, is_ramp, format_ok, format_reason, num_searches, answer, match, paragraph, metric


def _result(rules: _RuleScores, judge_score: float | None, judge_fallback: bool) -> dict[str, float]:
    config, _, is_ramp, format_ok, format_reason, num_searches, answer, match, _, metric = rules
    if metric != "judge":
        answer_score, judge_value = getattr(match, metric), 0.0  # RewardConfig only accepts known metrics
    elif judge_score is not None:
        answer_score = judge_value = judge_score
    elif judge_fallback:
        answer_score, judge_value = match.get(config.fallback_metric_for(is_ramp)), 0.0
    else:  # no call was needed: an exact match the judge need not see, or nothing to judge (no answer, gated out)
        gate_open = format_ok or not config.format_gate
        skipped_exact = gate_open and bool(answer) and match.em == 1.0 and config.judge_skip_exact
        answer_score = judge_value = 1.0 if skipped_exact else 0.0
    score, counted = combine(format_ok, answer_score, config)
    return {
        "score": float(score),
        "acc": float(counted),
        "format": 1.0 if format_ok else 0.0,
        "format_code": int(format_reason),
        "em": match.em,
        "f1": match.f1,
        "recall": match.recall,
        "cover_em": match.cover_em,
        "judge": float(judge_value),
        "judge_fallback": 1.0 if judge_fallback else 0.0,
        "num_searches": num_searches,
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
    rules = _rule_scores(data_source, solution_str, ground_truth, extra_info, kwargs)
    config, metric = rules[0], rules[-1]
    item = _judge_item(rules, _question(extra_info)) if metric == "judge" else None
    if item is None:
        return _result(rules, None, False)
    verdict = await _judge_for(kwargs, config).grade(item)
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
    rules = _rule_scores(data_source, solution_str, ground_truth, extra_info, kwargs)
    config, metric = rules[0], rules[-1]
    item = _judge_item(rules, _question(extra_info)) if metric == "judge" else None
    if item is None:
        return _result(rules, None, False)
    judge = _judge_for(kwargs, config)
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
