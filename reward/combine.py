"""Reward configuration and the rule that combines the format check with the answer score.

    counted = answer            if format ok or not format_gate, else 0
    score   = answer_weight * counted + (format_weight if format ok else format_penalty)
    score   = clip(score, min_score, max_score)                 (bounds optional)

The defaults give ``score = format_ok * answer`` in [0, 1]. Options come from verl's
``reward.custom_reward_function.reward_kwargs`` (hydra), with environment variables as defaults:
``MASKSEARCH_REWARD_<FIELD>`` for the fields below, ``MASKSEARCH_REWARD_FORMAT_<FIELD>`` for ``format.*`` and
``MASKSEARCH_JUDGE_<FIELD>`` for ``judge.*`` (the judge's :class:`masksearch_rl.llm.LLMConfig` fields).
Unknown keys fail at once with the key's name.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from masksearch_rl.configs import reject_unknown
from masksearch_rl.llm import LLMConfig
from reward.answer_match import METRICS
from reward.format import DEFAULT_RULES, FormatRules

ANSWER_METRICS = (*METRICS, "judge")
ENV_PREFIX = "MASKSEARCH_REWARD_"
FORMAT_ENV_PREFIX = "MASKSEARCH_REWARD_FORMAT_"
JUDGE_ENV_PREFIX = "MASKSEARCH_JUDGE_"
KWARGS_PATH = "reward.custom_reward_function.reward_kwargs"


@dataclass(frozen=True)
class RewardConfig:
    ramp_metric: str = "recall"  # the MaskSearch paper's RAMP reward: token recall, averaged over masks
    qa_metric: str = "em"
    answer_weight: float = 1.0
    format_weight: float = 0.0  # bonus for a well-formed response
    format_penalty: float = 0.0  # added when the format check fails (use a negative value to punish)
    format_gate: bool = True  # answer credit only for well-formed responses
    min_score: float | None = None
    max_score: float | None = None
    judge_fallback_metric: str | None = None  # used when the judge fails; None: recall for RAMP, em for QA
    judge_skip_exact: bool = True  # an exact match needs no judge call: judge = 1
    # The commitment guard (reward/answer_match.py): a RAMP span or QA answer holding more tokens than this that its
    # gold lacks earns no answer credit, so listing candidates, padding or appending never pays. -1 turns it off:
    # the paper's plain token recall, which pays full marks for a list of candidates.
    max_extra_answer_tokens: int = 0
    format: FormatRules = DEFAULT_RULES
    judge: Mapping[str, Any] = field(default_factory=dict)  # LLMConfig overrides for the judge endpoint

    def __post_init__(self) -> None:
        for name in ("ramp_metric", "qa_metric"):
            if getattr(self, name) not in ANSWER_METRICS:
                raise ValueError(f"{KWARGS_PATH}.{name}={getattr(self, name)!r}: choose one of {ANSWER_METRICS}")
        if self.judge_fallback_metric is not None and self.judge_fallback_metric not in METRICS:
            raise ValueError(
                f"{KWARGS_PATH}.judge_fallback_metric={self.judge_fallback_metric!r}: choose one of {METRICS}"
            )
        if self.min_score is not None and self.max_score is not None and self.min_score > self.max_score:
            raise ValueError(f"{KWARGS_PATH}: min_score {self.min_score} > max_score {self.max_score}")
        if self.max_extra_answer_tokens < -1:
            raise ValueError(
                f"{KWARGS_PATH}.max_extra_answer_tokens={self.max_extra_answer_tokens}: use >= 0, or -1 for no guard"
            )
        reject_unknown(LLMConfig, self.judge, f"{KWARGS_PATH}.judge option")

    @property
    def extra_token_allowance(self) -> int | None:
        """``max_extra_tokens`` for the answer metrics (None: no guard)."""
        return None if self.max_extra_answer_tokens < 0 else self.max_extra_answer_tokens

    def metric_for(self, is_ramp: bool) -> str:
        return self.ramp_metric if is_ramp else self.qa_metric

    def fallback_metric_for(self, is_ramp: bool) -> str:
        if self.judge_fallback_metric is not None:
            return self.judge_fallback_metric
        return "recall" if is_ramp else "em"

    def bounds(self) -> tuple[float, float]:
        """The range every score falls in (answers are in [0, 1]); property tests check it."""
        low_answer, high_answer = min(0.0, self.answer_weight), max(0.0, self.answer_weight)
        ok = (low_answer + self.format_weight, high_answer + self.format_weight)
        if self.format_gate:
            failed = (self.format_penalty, self.format_penalty)
        else:
            failed = (low_answer + self.format_penalty, high_answer + self.format_penalty)
        low, high = min(ok[0], failed[0]), max(ok[1], failed[1])
        if self.min_score is not None:
            low, high = max(low, self.min_score), max(high, self.min_score)
        if self.max_score is not None:
            low, high = min(low, self.max_score), min(high, self.max_score)
        return low, high

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any], env: Mapping[str, str] | None = None) -> RewardConfig:
        """Build from reward kwargs (plain dicts or omegaconf nodes); unset fields come from ``env``."""
        env = os.environ if env is None else env
        data = _plain(kwargs)
        reject_unknown(cls, data, f"{KWARGS_PATH} option")
        values = _fields_with_env(cls, data, env, ENV_PREFIX, skip={"format", "judge"})
        format_data = data.get("format") or {}
        reject_unknown(FormatRules, format_data, f"{KWARGS_PATH}.format option")
        values["format"] = FormatRules(**_fields_with_env(FormatRules, format_data, env, FORMAT_ENV_PREFIX))
        judge_data = dict(data.get("judge") or {})
        for f in dataclasses.fields(LLMConfig):
            raw = env.get(JUDGE_ENV_PREFIX + f.name.upper())
            if f.name not in judge_data and raw is not None and f.name != "extra_body":
                judge_data[f.name] = _coerce(f"{JUDGE_ENV_PREFIX}{f.name.upper()}", raw, _default_of(f))
        values["judge"] = judge_data
        return cls(**values)


def combine(format_ok: bool, answer: float, config: RewardConfig) -> tuple[float, float]:
    """``(score, counted_answer)``: the reward and the answer credit it includes (verl's ``acc``)."""
    counted = answer if (format_ok or not config.format_gate) else 0.0
    score = config.answer_weight * counted + (config.format_weight if format_ok else config.format_penalty)
    if config.min_score is not None and score < config.min_score:
        score = config.min_score
    if config.max_score is not None and score > config.max_score:
        score = config.max_score
    return score, counted


# -------------------------------------------------------------------------------------------------------- helpers


def _plain(value: Any) -> Any:
    """omegaconf DictConfig/ListConfig (what verl passes) -> plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _fields_with_env(cls: type, data: Mapping[str, Any], env: Mapping[str, str], prefix: str, skip=()) -> dict:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = _default_of(f)
        if f.name in data:
            values[f.name] = _coerce(f"{KWARGS_PATH}.{f.name}", data[f.name], default, f.type)
        elif (prefix + f.name.upper()) in env:
            values[f.name] = _coerce(prefix + f.name.upper(), env[prefix + f.name.upper()], default, f.type)
    return values


def _coerce(where: str, value: Any, default: Any, annotation: Any = None) -> Any:
    """Convert a hydra or environment value to the type of the field's default; clear error on nonsense."""
    try:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            if default is None:
                return None
            raise ValueError("may not be null")
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected a boolean")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float) or (default is None and "float" in str(annotation)):
            return float(value)
        if isinstance(default, tuple):
            return tuple(value.split(",")) if isinstance(value, str) else tuple(str(v) for v in value)
        return value if not isinstance(default, str) else str(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}={value!r}: {err}") from None
